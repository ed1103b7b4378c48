"""Standalone UniFusion generation and editing, without ComfyUI.

Flow of one call: VLM encode (or Verifi rewrite) -> condition tokens picked by the paper's
rule -> LAP + refiner once -> Euler sampling of the DiT with classifier-free guidance against
the all-zero condition -> VAE decode. The ComfyUI nodes run the same library pieces, so the
two paths give the same images for the same seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .checkpoint import check_vlm_identity, load_model
from .config import DEFAULT_GUIDANCE_MAX_T, DEFAULT_GUIDANCE_MIN_T, UniFusionConfig
from .errors import InputError
from .flow import euler_sample, sampling_schedule, seeded_noise
from .model import UniFusionModel
from .vae import load_vae
from .vlm.encode import VLMFeatures, encode
from .vlm.loader import LoadedVLM, load_vlm
from .vlm.verifi import verifi_rewrite

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(step, total)``; raising from it cancels the run."""

DEFAULT_SHIFT = 3.0
MAX_SIDE = 4096


@dataclass
class Condition:
    """Condition tokens at DiT width, ready for sampling."""

    tokens: Tensor  # (B, S, D)
    mask: Tensor  # (B, S) bool, True = real token
    rewritten: Optional[str] = None  # Verifi's rewritten prompt, when Verifi ran
    positions: Optional[Tensor] = None  # (B, S, 2) frame positions of image tokens (VLMFeatures.condition_positions)


def condition_from_features(
    model: UniFusionModel, features: VLMFeatures, gains: Optional[Sequence[float]] = None
) -> tuple[Tensor, Tensor]:
    """Pick the condition tokens (paper rule, see VLMFeatures.keep) and run LAP + refiner once."""
    feats, mask = features.condition_tokens()  # (B, S', L, H), (B, S')
    if feats.shape[1] == 0:
        raise InputError("nothing to condition on: the prompt produced no kept tokens; write a prompt or add an image")
    param = next(model.parameters())
    gains_t = None if gains is None else torch.as_tensor(list(gains), dtype=torch.float32, device=param.device)
    with torch.no_grad():
        tokens = model.encode_condition(feats.to(device=param.device, dtype=param.dtype), mask.to(param.device), gains_t)
    return tokens, mask.to(param.device)


def vlm_for_checkpoint(vlm: LoadedVLM, config: UniFusionConfig, checkpoint_name: str = "the checkpoint") -> LoadedVLM:
    """The VLM, checked against the checkpoint's expected identity, capturing the checkpoint's layers.

    The check comes first so a wrong VLM is reported as such (not as an out-of-range layer)."""
    check_vlm_identity(config.vlm, vlm.identity, checkpoint_name)
    if tuple(vlm.selected_layers) == tuple(config.vlm.selected_layers):
        return vlm
    return replace(vlm, selected_layers=tuple(config.vlm.selected_layers))


class UniFusionPipeline:
    """A loaded VLM, UniFusion model and VAE, checked to belong together."""

    def __init__(self, vlm: LoadedVLM, model: UniFusionModel, config: UniFusionConfig, vae: Any,
                 checkpoint_name: str = "the checkpoint") -> None:
        self.vlm = vlm_for_checkpoint(vlm, config, checkpoint_name)
        self.model, self.config, self.vae = model, config, vae

    @classmethod
    def from_files(
        cls,
        vlm_folder: str | Path,
        checkpoint: str | Path,
        vae: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> "UniFusionPipeline":
        """Load all three parts; the VLM's captured layers come from the checkpoint."""
        model, config = load_model(checkpoint, device=device, dtype=dtype)
        vlm = load_vlm(vlm_folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        vae_model = load_vae(vae, device=device, dtype=torch.float32)
        return cls(vlm, model, config, vae_model, checkpoint_name=Path(checkpoint).name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(
        self,
        prompt: str,
        images: Sequence[Any] = (),
        max_tiles: int = 6,
        verifi: bool = False,
        system_prompt: Optional[str] = None,
        seed: int = 0,
        max_new_tokens: int = 128,
        layer_gains: Optional[Sequence[float]] = None,
        progress: Optional[Progress] = None,
    ) -> Condition:
        """Prompt (+ reference images) to condition tokens; with Verifi the VLM rewrites first."""
        images = [load_image(i) for i in images]
        rewritten = None
        if verifi:
            result = verifi_rewrite(self.vlm, prompt, images, system_prompt=system_prompt,
                                    max_new_tokens=max_new_tokens, seed=seed, max_tiles=max_tiles, progress=progress)
            features, rewritten = result.features, result.text
            log.info("Verifi rewrite: %s", rewritten)
        else:
            features = encode(self.vlm, prompt, images, max_tiles=max_tiles, system_prompt=system_prompt,
                              progress=progress)
        return self.condition(features, rewritten, layer_gains)

    def condition(self, features: VLMFeatures, rewritten: Optional[str] = None,
                  layer_gains: Optional[Sequence[float]] = None) -> Condition:
        """Condition tokens of captured VLM features (LAP + refiner once), with the frame positions of
        their image tokens; ``rewritten`` is the Verifi text they are the states of, if any."""
        tokens, mask = condition_from_features(self.model, features, layer_gains)
        return Condition(tokens, mask, rewritten, features.condition_positions().to(tokens.device))

    def sample(
        self,
        condition: Condition,
        width: int,
        height: int,
        steps: int = 20,
        cfg_scale: float = 4.0,
        seed: int = 0,
        batch_size: int = 1,
        shift: Optional[float] = None,
        progress: Optional[Progress] = None,
        guidance_min_t: float = DEFAULT_GUIDANCE_MIN_T,
        guidance_max_t: float = DEFAULT_GUIDANCE_MAX_T,
    ) -> list[Image.Image]:
        """Sample latents for one condition and decode them. Image ``i`` of a batch uses seed ``seed + i``,
        so any image of a batch can be reproduced on its own. CFG applies at noise levels from
        ``guidance_min_t`` to ``guidance_max_t`` ((0, 1): every step; see `config.DEFAULT_GUIDANCE_MAX_T`)."""
        factor = int(getattr(self.vae, "downscale", 8))
        check_size(width, height, factor * self.config.dit.patch_size)
        channels = self.config.dit.in_channels
        param = next(self.model.parameters())
        noise = torch.cat([seeded_noise((1, channels, height // factor, width // factor), seed + i)
                           for i in range(batch_size)]).to(device=param.device, dtype=param.dtype)
        tokens = condition.tokens.expand(batch_size, -1, -1) if condition.tokens.shape[0] == 1 else condition.tokens
        mask = condition.mask.expand(batch_size, -1) if condition.mask.shape[0] == 1 else condition.mask
        positions = condition.positions
        if positions is not None and positions.shape[0] == 1:
            positions = positions.expand(batch_size, -1, -1)
        schedule = sampling_schedule(steps, shift if shift is not None else self.sampling_shift)

        def velocity(x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor,
                     context_positions: Optional[Tensor] = None) -> Tensor:
            return self.model(x, t.to(x.dtype), context, context_mask, context_positions)

        def callback(step: int, total: int, _x: Tensor) -> None:
            if progress is not None:
                progress(step, total)

        with torch.no_grad():
            latents = euler_sample(
                velocity, noise, schedule, cfg_scale=cfg_scale, callback=callback,
                guidance_min_t=guidance_min_t, guidance_max_t=guidance_max_t,
                uncond_kwargs={"context": UniFusionModel.null_condition(tokens), "context_mask": mask,
                               "context_positions": positions},
                context=tokens, context_mask=mask, context_positions=positions,
            )
            pixels = self.vae.decode(latents.float())  # (B, 3, H, W) in [0, 1]
        return [to_pil(p) for p in pixels]

    @property
    def sampling_shift(self) -> float:
        """The time shift the checkpoint was trained for (stored in its config), else the default."""
        return float(self.config.extra.get("sampling_shift", DEFAULT_SHIFT))

    def generate(self, prompt: str, images: Sequence[Any] = (), width: int = 64, height: int = 64, steps: int = 20,
                 cfg_scale: float = 4.0, seed: int = 0, batch_size: int = 1, verifi: bool = False,
                 system_prompt: Optional[str] = None, max_tiles: int = 6,
                 layer_gains: Optional[Sequence[float]] = None, progress: Optional[Progress] = None,
                 guidance_min_t: float = DEFAULT_GUIDANCE_MIN_T, guidance_max_t: float = DEFAULT_GUIDANCE_MAX_T,
                 ) -> tuple[list[Image.Image], Condition]:
        """Text-to-image, or editing when ``images`` are given (any number of references)."""
        condition = self.encode(prompt, images, max_tiles=max_tiles, verifi=verifi, system_prompt=system_prompt,
                                seed=seed, layer_gains=layer_gains)
        images_out = self.sample(condition, width, height, steps=steps, cfg_scale=cfg_scale, seed=seed,
                                 batch_size=batch_size, progress=progress,
                                 guidance_min_t=guidance_min_t, guidance_max_t=guidance_max_t)
        return images_out, condition


def check_size(width: int, height: int, multiple: int) -> None:
    """Sizes must map onto whole latent patches; say which sizes would work."""
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value > MAX_SIDE:
            raise InputError(f"{name} {value} is out of range: use {multiple}..{MAX_SIDE}")
        if value % multiple:
            lower = value // multiple * multiple
            raise InputError(
                f"{name} {value} is not a multiple of {multiple} (VAE downscale x DiT patch size): "
                f"use {max(lower, multiple)} or {lower + multiple}"
            )


def load_image(image: Any) -> Any:
    """Paths are opened here (with a clear error); images and tensors pass through to the VLM."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"reference image not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except OSError as exc:
            raise InputError(f"{path} is not a readable image ({exc})") from exc
    return image


def to_pil(pixels: Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] to an 8-bit RGB image."""
    arr = (pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")
