"""The UniFusion checkpoint as a native ComfyUI MODEL.

``BaseModel.diffusion_model`` is the whole `UniFusionModel` (``lap.*`` + ``dit.*``, the
checkpoint's own key names), so LoRA keys ``diffusion_model.dit.<...>`` / ``dit.<...>``
reach the DiT through LoraLoaderModelOnly, model merging sees every weight, and the LAP
Pool node runs ``diffusion_model.lap`` with whatever patches ComfyUI applied. Sampling is
ComfyUI's: ``ModelType.FLOW`` (the model predicts ``v = noise - x0``, t = sigma in [0, 1],
multiplier 1.0); the shift comes from the checkpoint and ModelSamplingAuraFlow changes it.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
from comfy.ldm.modules.attention import optimized_attention

from ..unifusion.checkpoint import load_state_dict
from ..unifusion.config import UniFusionConfig
from ..unifusion.errors import CheckpointError, InputError
from ..unifusion.model import UniFusionModel
from .finite import nonfinite_problem
from .memory import batch_scaled_cond_shapes, memory_usage_factor
from .preview import factors_from_vae_file, gray_factors

logger = logging.getLogger(__name__)

DEFAULT_SHIFT = 3.0
WEIGHT_DTYPES = {
    "default": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
}


class UniFusionLatentFormat(comfy.latent_formats.LatentFormat):
    """Latent statistics and preview colours of the autoencoder a checkpoint was trained with.
    Identity by default: the demo autoencoder normalises its latents itself (vae_scale/vae_shift)."""

    def __init__(self, channels: int = 4, rgb_factors: Optional[list] = None, rgb_bias: Optional[list] = None,
                 scale_factor: float = 1.0, shift_factor: float = 0.0) -> None:
        self.latent_channels = channels
        self.scale_factor = scale_factor
        self.shift_factor = shift_factor
        self.latent_rgb_factors = rgb_factors
        self.latent_rgb_factors_bias = rgb_bias

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale_factor + self.shift_factor


# Under ComfyUI's TorchCompileModel the check reads tensor values, which dynamo cannot trace: run it
# eagerly by design instead of letting dynamo find that out and print a graph-break warning each compile.
_checked_outside_compile = torch.compiler.disable(nonfinite_problem)


class UniFusionDiffusionModel(UniFusionModel):
    """LAP + DiT with the call ComfyUI makes: ``(x, t, context=, control=, transformer_options=, **conds)``."""

    def __init__(self, unifusion_config: str, dtype=None, device=None, operations=None, **_: Any) -> None:
        cfg = UniFusionConfig.from_json(unifusion_config)
        # Built on the meta device, then given real (uninitialised) storage: every weight comes
        # from the checkpoint, and init kernels do not exist for fp8 storage dtypes.
        super().__init__(cfg, dtype=dtype, device="meta", operations=operations, attention=optimized_attention)
        self.to_empty(device=device or torch.device("cpu"))
        self.dtype = dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                control: Any = None, transformer_options: Optional[dict] = None,
                context_mask: Optional[torch.Tensor] = None, context_positions: Optional[torch.Tensor] = None,
                **_: Any) -> torch.Tensor:
        problem = _checked_outside_compile(x, context, transformer_options)
        if problem:
            raise InputError(problem)
        # The mask may arrive cast to the model dtype (ComfyUI casts non-integer conds).
        mask = None if context_mask is None else context_mask > 0.5  # (B, S) bool
        if mask is not None and context is not None and mask.shape[1] < context.shape[1]:
            # ConditioningConcat appends tokens but keeps the first condition's mask: they are real.
            mask = F.pad(mask, (0, context.shape[1] - mask.shape[1]), value=True)  # (B, S)
        if context_positions is not None and context is not None and context_positions.shape[1] != context.shape[1]:
            # ... and the first condition's positions: the appended tokens get no place (NaN).
            extra = context.shape[1] - context_positions.shape[1]
            context_positions = (F.pad(context_positions.float(), (0, 0, 0, extra), value=float("nan")) if extra > 0
                                 else context_positions[:, : context.shape[1]])
        return self.dit(x, timesteps, context, mask, context_positions)  # (B, C, H, W)


class UniFusionModelConfig(comfy.supported_models_base.BASE):
    unet_config: dict = {}
    unet_extra_config: dict = {}  # the default would add num_heads/num_head_channels kwargs
    sampling_settings = {"multiplier": 1.0, "shift": DEFAULT_SHIFT}
    latent_format = UniFusionLatentFormat
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def get_model(self, state_dict: dict, prefix: str = "", device=None) -> "UniFusionBaseModel":
        return UniFusionBaseModel(self, device=device)


class UniFusionBaseModel(comfy.model_base.BaseModel):
    """Conditioning: the CONDITIONING tensor is the condition tokens (B, S, D); its
    ``attention_mask`` (B, S) marks real tokens and ``image_positions`` (B, S, 2) places image tokens
    on the frame. All batch with CONDRegular (no token repeats)."""

    def __init__(self, model_config: UniFusionModelConfig, model_type=comfy.model_base.ModelType.FLOW,
                 device=None) -> None:
        super().__init__(model_config, model_type, device=device, unet_model=UniFusionDiffusionModel)
        self.unifusion_config: UniFusionConfig = self.diffusion_model.cfg
        self.memory_usage_factor_conds = ("c_crossattn",)
        self.unifusion_checkpoint = "the UniFusion checkpoint"  # file name, for error messages

    def extra_conds(self, **kwargs: Any) -> dict:
        out = super().extra_conds(**kwargs)
        cross = kwargs.get("cross_attn")
        if cross is not None:
            out["c_crossattn"] = comfy.conds.CONDRegular(cross)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["context_mask"] = comfy.conds.CONDRegular(mask)
        positions = kwargs.get("image_positions")
        if positions is not None:
            out["context_positions"] = comfy.conds.CONDRegular(positions)
        return out

    def memory_required(self, input_shape: list[int], cond_shapes: dict = {}) -> float:  # noqa: B006 (ComfyUI's signature)
        """ComfyUI's estimate with the condition tokens counted once per latent of the batch."""
        return super().memory_required(input_shape, cond_shapes=batch_scaled_cond_shapes(input_shape, cond_shapes))

    def extra_conds_shapes(self, **kwargs: Any) -> dict:
        """Condition tokens in latent-pixel units (one token covers patch^2 latent pixels)."""
        cross = kwargs.get("cross_attn")
        if cross is None:
            return {}
        p = self.unifusion_config.dit.patch_size
        return {"c_crossattn": [1, 1, int(cross.shape[1]) * p * p]}


def latent_format_for(cfg: UniFusionConfig, vae_path: Optional[Path], checkpoint: Path) -> comfy.latent_formats.LatentFormat:
    """From the checkpoint's notes: a named ComfyUI latent format (e.g. "Flux"), or our identity
    format with stored preview colours, else colours fitted to its autoencoder, else gray."""
    channels = cfg.dit.in_channels
    name = cfg.extra.get("latent_format")
    if name:
        cls = getattr(comfy.latent_formats, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, comfy.latent_formats.LatentFormat)):
            raise CheckpointError(f"{checkpoint}: latent_format {name!r} is not a ComfyUI latent format "
                                  "(e.g. 'Flux', 'SD3'); fix the checkpoint's extra notes")
        fmt = cls()
        if fmt.latent_channels != channels:
            raise CheckpointError(f"{checkpoint}: latent_format {name} has {fmt.latent_channels} channels but "
                                  f"the DiT takes {channels}")
        return fmt
    factors, bias = cfg.extra.get("latent_rgb_factors"), cfg.extra.get("latent_rgb_factors_bias")
    if factors is None:
        factors, bias = factors_from_vae_file(vae_path, channels) or gray_factors(channels)
    return UniFusionLatentFormat(channels, factors, bias, float(cfg.extra.get("latent_scale_factor", 1.0)),
                                 float(cfg.extra.get("latent_shift_factor", 0.0)))


def _stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(t.dtype for t in state.values())
    return counts.most_common(1)[0][0] if counts else torch.float32


def load_model_patcher(path: Path, weight_dtype: str = "default", vae_path: Optional[Path] = None,
                       ) -> comfy.model_patcher.ModelPatcher:
    """Validate and load a checkpoint the way comfy.sd.load_diffusion_model_state_dict does."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"weight_dtype {weight_dtype!r} is not one of {list(WEIGHT_DTYPES)}")
    state, head = load_state_dict(path)  # raises CheckpointError naming the file and the problem
    cfg = head.config
    mm = comfy.model_management
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    model_config = UniFusionModelConfig({"unifusion_config": cfg.to_json()})
    model_config.sampling_settings["shift"] = float(cfg.extra.get("sampling_shift", DEFAULT_SHIFT))
    model_config.latent_format = latent_format_for(cfg, vae_path, path)
    model_config.memory_usage_factor = memory_usage_factor(cfg.dit)
    unet_dtype = WEIGHT_DTYPES[weight_dtype]
    if unet_dtype is None:
        params = sum(t.numel() for t in state.values())
        unet_dtype = mm.unet_dtype(model_params=params, supported_dtypes=model_config.supported_inference_dtypes,
                                   weight_dtype=_stored_dtype(state))
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    model = model_config.get_model(state)
    model = model.to(offload_device)
    model.load_model_weights(state, "")
    model.unifusion_checkpoint = path.name
    logger.info("UniFusion model %s: weights %s, compute %s, shift %s", path.name, unet_dtype,
                manual_cast or unet_dtype, model_config.sampling_settings["shift"])
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def compute_dtype(patcher: comfy.model_patcher.ModelPatcher) -> torch.dtype:
    """The dtype activations use: the manual-cast dtype for fp8 or cast storage, else the weights'."""
    model = patcher.model
    return model.manual_cast_dtype or model.get_dtype()
