"""A tiny convolutional autoencoder in the TAESD layout, so ComfyUI's native VAELoader,
VAEEncode and VAEDecode use the demo's file unchanged.

ComfyUI (comfy/sd.py) recognises a single safetensors file holding ``taesd_encoder.*`` and
``taesd_decoder.*`` weights, reads the latent channel count from
``taesd_decoder.1.weight`` and builds its TAESD module: width 64, 8x downscale, plus two
scalar parameters ``vae_scale`` and ``vae_shift`` that it loads from the file when present.
Through its VAE wrapper the numbers are

    encode(image in [0, 1]) = taesd_encoder(image) / vae_scale + vae_shift
    decode(latent)          = clamp(taesd_decoder((latent - vae_shift) * vae_scale), 0, 1)

and the decoder's first module soft-clamps its input to (-3, 3) with 3 * tanh(x / 3). This
module has the same module tree (hence the same state-dict keys) and the same arithmetic,
so our encode/decode and ComfyUI's give the same numbers. The demo stores the latent
statistics in ``vae_scale``/``vae_shift``, which makes latents roughly zero-mean,
unit-variance for the DiT in both worlds.

Only safetensors files are read; nothing is ever unpickled.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import UniFusionError
from .safetensors_file import write_safetensors

logger = logging.getLogger(__name__)

COMFY_WIDTH = 64  # ComfyUI builds TAESD with 64 channels; other widths do not load there
DOWNSCALE = 8
PIXEL_SPACE_KEY = "pixel_space_vae"
FORMAT_NAME = "unifusion-taesd"


class VAEFileError(UniFusionError, ValueError):
    """An autoencoder file is missing, unreadable or of another layout."""


class SoftClamp(nn.Module):
    """3 * tanh(x / 3): keeps decoder inputs in (-3, 3) while staying linear near zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _conv(n_in: int, n_out: int, ops: Any, dtype: Any, device: Any, **kwargs: Any) -> nn.Module:
    return ops.Conv2d(n_in, n_out, 3, padding=1, dtype=dtype, device=device, **kwargs)


class Block(nn.Module):
    """Three 3x3 convs with a residual: relu(conv(x) + skip(x))."""

    def __init__(self, n_in: int, n_out: int, dtype: Any = None, device: Any = None, operations: Any = None):
        super().__init__()
        ops = operations or nn
        self.conv = nn.Sequential(
            _conv(n_in, n_out, ops, dtype, device), nn.ReLU(),
            _conv(n_out, n_out, ops, dtype, device), nn.ReLU(),
            _conv(n_out, n_out, ops, dtype, device),
        )
        self.skip = (ops.Conv2d(n_in, n_out, 1, bias=False, dtype=dtype, device=device)
                     if n_in != n_out else nn.Identity())
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))  # (B, n_out, H, W)


def build_encoder(latent_channels: int, width: int = COMFY_WIDTH, **kw: Any) -> nn.Sequential:
    """Image (B, 3, H, W) -> raw latent (B, C, H/8, W/8); Sequential indices are the key names."""
    ops = kw.get("operations") or nn
    dd = {"dtype": kw.get("dtype"), "device": kw.get("device")}

    def down() -> nn.Module:
        return _conv(width, width, ops, stride=2, bias=False, **dd)

    def blocks(n: int) -> list[nn.Module]:
        return [Block(width, width, **kw) for _ in range(n)]

    return nn.Sequential(
        _conv(3, width, ops, **dd), *blocks(1),
        down(), *blocks(3),
        down(), *blocks(3),
        down(), *blocks(3),
        _conv(width, latent_channels, ops, **dd),
    )


def build_decoder(latent_channels: int, width: int = COMFY_WIDTH, **kw: Any) -> nn.Sequential:
    """Raw latent (B, C, h, w) -> image (B, 3, 8h, 8w), unclamped."""
    ops = kw.get("operations") or nn
    dd = {"dtype": kw.get("dtype"), "device": kw.get("device")}

    def up() -> list[nn.Module]:
        return [nn.Upsample(scale_factor=2), _conv(width, width, ops, bias=False, **dd)]

    def blocks(n: int) -> list[nn.Module]:
        return [Block(width, width, **kw) for _ in range(n)]

    return nn.Sequential(
        SoftClamp(), _conv(latent_channels, width, ops, **dd), nn.ReLU(),
        *blocks(3), *up(),
        *blocks(3), *up(),
        *blocks(3), *up(),
        *blocks(1), _conv(width, 3, ops, **dd),
    )


class TinyAutoencoder(nn.Module):
    """TAESD-layout autoencoder: images in [0, 1] <-> latents at 1/8 resolution."""

    downscale = DOWNSCALE

    def __init__(self, latent_channels: int = 4, width: int = COMFY_WIDTH,
                 dtype: Any = None, device: Any = None, operations: Any = None):
        super().__init__()
        if latent_channels < 1 or width < 1:
            raise ValueError(f"latent_channels and width must be >= 1, got {latent_channels} and {width}")
        self.latent_channels = latent_channels
        self.width = width
        kw = {"dtype": dtype, "device": device, "operations": operations}
        self.taesd_encoder = build_encoder(latent_channels, width, **kw)
        self.taesd_decoder = build_decoder(latent_channels, width, **kw)
        # Latent statistics (set by calibrate_latents); ComfyUI reads both from the file.
        self.vae_scale = nn.Parameter(torch.tensor(1.0, dtype=dtype, device=device), requires_grad=False)
        self.vae_shift = nn.Parameter(torch.tensor(0.0, dtype=dtype, device=device), requires_grad=False)

    def _check(self, x: torch.Tensor, what: str, channels: int, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"{what} height and width must be multiples of {multiple}, got {tuple(x.shape[-2:])}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H/8, W/8)."""
        self._check(images, "images", 3, DOWNSCALE)
        return self.taesd_encoder(images) / self.vae_scale + self.vae_shift

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, 8h, 8w) in [0, 1] (unclamped with clamp=False, for training)."""
        self._check(latents, "latents", self.latent_channels, 1)
        images = self.taesd_decoder((latents - self.vae_shift) * self.vae_scale)
        return images.clamp(0, 1) if clamp else images


class PixelSpaceVAE(nn.Module):
    """ComfyUI's pixel-space pseudo-VAE: the latent is the image itself, scaled to [-1, 1]
    (ComfyUI's VAE wrapper maps images x -> 2x - 1 and back, clamping to [0, 1])."""

    downscale = 1
    latent_channels = 3

    def __init__(self, dtype: Any = None, device: Any = None):
        super().__init__()
        self.pixel_space_vae = nn.Parameter(torch.tensor(1.0, dtype=dtype, device=device), requires_grad=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2.0 - 1.0  # (B, 3, H, W)

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        images = (latents + 1.0) / 2.0
        return images.clamp(0, 1) if clamp else images


def save_vae(model: TinyAutoencoder | PixelSpaceVAE, path: str | Path,
             metadata: Mapping[str, str] | None = None) -> Path:
    """One safetensors file that ComfyUI's VAELoader (models/vae/) and `load_vae` both read."""
    path = Path(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if isinstance(model, PixelSpaceVAE):
        meta.update({"format": FORMAT_NAME, "kind": "pixel_space"})
        return write_safetensors(path, {PIXEL_SPACE_KEY: torch.tensor(1.0)}, meta)
    if model.width != COMFY_WIDTH:
        logger.warning("saving a width-%d autoencoder to %s: ComfyUI only loads width %d", model.width, path, COMFY_WIDTH)
    meta.update({
        "format": FORMAT_NAME, "kind": "taesd", "latent_channels": str(model.latent_channels),
        "width": str(model.width), "downscale": str(DOWNSCALE), "image_range": "0..1",
        "vae_scale": f"{float(model.vae_scale):.6g}", "vae_shift": f"{float(model.vae_shift):.6g}",
    })
    return write_safetensors(path, model.state_dict(), meta)


def _read(path: Path, device: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise VAEFileError(f"autoencoder file not found: {path}. Check the name, or put the file in that folder.")
    if not path.is_file():
        raise VAEFileError(f"{path} is a folder; an autoencoder is a single .safetensors file.")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise VAEFileError(
            f"{path} is not a readable safetensors file ({exc}). Autoencoders load from .safetensors only; "
            "pickled .pt/.ckpt files are never opened. Save or download it again as .safetensors."
        ) from exc


def expected_keys(latent_channels: int = 4, width: int = COMFY_WIDTH) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of a TinyAutoencoder, built on the meta device."""
    model = TinyAutoencoder(latent_channels, width, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_vae(path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> TinyAutoencoder | PixelSpaceVAE:
    """Read a TAESD-layout autoencoder or a pixel-space pseudo-VAE file (eval mode)."""
    path = Path(path)
    state = _read(path, "cpu")
    if PIXEL_SPACE_KEY in state:
        return PixelSpaceVAE(dtype=dtype).to(device).eval()
    probe = state.get("taesd_decoder.1.weight")
    if probe is None or probe.ndim != 4 or not any(k.startswith("taesd_encoder.") for k in state):
        shown = ", ".join(sorted(state)[:4]) or "no tensors"
        raise VAEFileError(
            f"{path} is not an autoencoder in the TAESD layout: expected 'taesd_encoder.*' and "
            f"'taesd_decoder.*' weights (e.g. 'taesd_decoder.1.weight'), or a '{PIXEL_SPACE_KEY}' key; "
            f"found {len(state)} tensors ({shown}). Pick the autoencoder the checkpoint was trained with."
        )
    width, latent_channels = int(probe.shape[0]), int(probe.shape[1])
    expected = expected_keys(latent_channels, width)
    found = {k: tuple(v.shape) for k, v in state.items()}
    optional = {"vae_scale", "vae_shift"}  # ComfyUI also accepts files without them (scale 1, shift 0)
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    wrong = [k for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                    if keys]
        raise VAEFileError(
            f"{path} does not match the TAESD layout for {latent_channels} latent channels and width {width} "
            f"({'; '.join(problems)}). The file is damaged or of another model; re-export it with save_vae."
        )
    model = TinyAutoencoder(latent_channels, width, dtype=dtype)
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()


def save_pixel_space_vae(path: str | Path) -> Path:
    """The pixel-space pseudo-VAE file (latent = image scaled to [-1, 1])."""
    return save_vae(PixelSpaceVAE(), path)


# --- training -------------------------------------------------------------------------------

def _zero_init_residuals(model: TinyAutoencoder) -> None:
    """Start every Block as an identity (last conv zero): a deep plain stack trains faster."""
    for module in model.modules():
        if isinstance(module, Block):
            nn.init.zeros_(module.conv[4].weight)
            nn.init.zeros_(module.conv[4].bias)


# Blocks a cheaper training run leaves as exact identities (the two at full resolution and two
# of the three at half resolution on each side: ~3x fewer multiply-adds per step).
LIGHT_IDENTITY_BLOCKS = (
    "taesd_encoder.1", "taesd_encoder.4", "taesd_encoder.5",
    "taesd_decoder.14", "taesd_decoder.15", "taesd_decoder.18",
)


class _Bypassed:
    """Swap Blocks for ReLU while training and put them back afterwards. With its last conv
    zeroed a Block computes relu(0 + x) exactly, so the saved file keeps the full TAESD layout
    and ComfyUI's forward pass gives the same numbers as the bypassed one."""

    def __init__(self, model: TinyAutoencoder, names: Sequence[str]):
        self.model, self.names, self.saved = model, list(names), {}

    def __enter__(self) -> None:
        for name in self.names:
            half, index = name.split(".")
            seq = getattr(self.model, half)
            block = seq[int(index)]
            if not isinstance(block, Block):
                raise ValueError(f"{name} is not a Block of the autoencoder; pick from the Block indices")
            nn.init.zeros_(block.conv[4].weight)
            nn.init.zeros_(block.conv[4].bias)
            self.saved[name] = block
            seq[int(index)] = nn.ReLU()

    def __exit__(self, *exc: object) -> None:
        for name, block in self.saved.items():
            half, index = name.split(".")
            getattr(self.model, half)[int(index)] = block


@torch.no_grad()
def calibrate_latents(model: TinyAutoencoder, images: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """Set vae_scale/vae_shift so encoded latents have mean 0 and std 1 over ``images``;
    returns the raw (mean, std)."""
    raw = torch.cat([model.taesd_encoder(images[i:i + batch_size].to(model.vae_scale))
                     for i in range(0, len(images), batch_size)])
    mean, std = float(raw.mean()), float(raw.std())
    model.vae_scale.fill_(std)
    model.vae_shift.fill_(-mean / std)
    return mean, std


def train_vae(
    images: torch.Tensor,
    steps: int,
    seed: int = 0,
    batch_size: int = 16,
    lr: float = 2e-3,
    latent_channels: int = 4,
    width: int = COMFY_WIDTH,
    model: TinyAutoencoder | None = None,
    l1_weight: float = 0.1,
    crop: int | None = None,
    foreground_weight: float = 0.0,
    edge_weight: float = 0.0,
    foreground_margin: int = 0,
    identity_blocks: Sequence[str] = (),
    latent_noise: float = 0.0,
    callback: Callable[[int, float], None] | None = None,
) -> TinyAutoencoder:
    """Fit an autoencoder to ``images`` (N, 3, H, W) in [0, 1]: AdamW on MSE + l1_weight * L1,
    cosine learning rate, random horizontal flips; then calibrate the latent statistics.
    ``foreground_weight`` adds that much weight to pixels that differ from the image's median
    colour: on sparse images (a few shapes on a plain background) the loss otherwise sits for
    a long time on "paint the background" before it learns the shapes. ``foreground_margin``
    widens those pixels by that many on every side: a small diamond drawn as a circle is wrong
    in the background pixels around it, which the plain mask weighs least. ``edge_weight`` adds
    that much of an L1 loss on pixel differences, which keeps corners sharp.
    ``identity_blocks`` (e.g. LIGHT_IDENTITY_BLOCKS) are kept as exact identities and skipped
    during training, which makes steps cheaper while the file keeps ComfyUI's layout.
    ``crop`` trains on random crop x crop windows (a multiple of 8, on the latent grid): the
    network is convolutional, so small windows teach it the same thing at a fraction of the
    cost. ``latent_noise`` adds Gaussian noise of that many latent standard deviations to the
    latents the decoder sees: images that differ only a little (a small diamond and a small
    circle) must then lie farther apart than the noise, which is what a diffusion model on these
    latents needs to tell them apart at high noise levels. ``callback(step, loss)`` is called
    after every step. Deterministic for a given seed.
    Float32 only: under bfloat16 autocast the demo autoencoder stalled from scratch (loss about 0.1
    from step 500 to 3,600, against 0.01 in float32; nothing read back out of its images)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    if latent_noise < 0:
        raise ValueError(f"latent_noise must be >= 0 (latent standard deviations), got {latent_noise}")
    size = min(images.shape[-2:])
    if crop is not None and (crop % DOWNSCALE or not DOWNSCALE <= crop <= size):
        raise ValueError(f"crop must be a multiple of {DOWNSCALE} between {DOWNSCALE} and {size}, got {crop}")
    gen = torch.Generator().manual_seed(seed)
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TinyAutoencoder(latent_channels, width)
        _zero_init_residuals(model)
    with _Bypassed(model, identity_blocks):
        _fit(model, images, steps, gen, batch_size, lr, l1_weight, crop, foreground_weight, edge_weight, callback,
             latent_noise, foreground_margin)
    model.eval()
    calibrate_latents(model, images)
    return model


def finetune_decoder(
    model: TinyAutoencoder,
    images: torch.Tensor,
    steps: int,
    seed: int = 0,
    batch_size: int = 16,
    lr: float = 5e-4,
    l1_weight: float = 0.1,
    crop: int | None = None,
    foreground_weight: float = 0.0,
    edge_weight: float = 0.0,
    foreground_margin: int = 0,
    bf16: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> TinyAutoencoder:
    """Train only the decoder of a trained autoencoder, every Block included (a run with
    ``identity_blocks`` left some as identities, which this fills in). The encoder and the
    latent statistics stay exactly as they were, so latents already computed with it (a
    feature cache, a DiT trained on them) stay valid. Same loss and options as `train_vae`.
    ``bf16`` runs the forward passes under bfloat16 autocast but the last convolution (weights,
    optimizer and loss stay float32): on a CPU with AVX512-BF16 and AMX a demo decoder step on one
    thread takes 0.132 s against 0.314 s (`benchmarks/decoder_precision.py`), and 300 steps from
    the demo's autoencoder ended 1-2% above float32's loss."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(seed)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    model.taesd_decoder.requires_grad_(True)
    try:
        _fit(model, images, steps, gen, batch_size, lr, l1_weight, crop, foreground_weight, edge_weight, callback,
             foreground_margin=foreground_margin, bf16=bf16)
    finally:
        for param, flag in frozen:
            param.requires_grad_(flag)
    return model.eval()


def _edge_error(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences of ``out`` and ``x``: MSE alone
    is content with soft edges, which turns a small square or triangle into a blob."""
    dx = (out[..., :, 1:] - out[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    dy = (out[..., 1:, :] - out[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def foreground_weights(x: torch.Tensor, weight: float, margin: int = 0) -> torch.Tensor:
    """(B, 1, H, W) loss weights for images ``x`` (B, 3, H, W): 1 + ``weight`` on pixels that differ
    from the image's median colour and on those within ``margin`` pixels of them, 1 elsewhere."""
    background = x.flatten(2).median(-1).values[:, :, None, None]  # (B, 3, 1, 1)
    shapes = ((x - background).abs().amax(1, keepdim=True) > 0.05).to(x.dtype)  # (B, 1, H, W)
    if margin:
        shapes = F.max_pool2d(shapes, 2 * margin + 1, stride=1, padding=margin)
    return 1 + weight * shapes


def _fit(model: TinyAutoencoder, images: torch.Tensor, steps: int, gen: torch.Generator, batch_size: int,
         lr: float, l1_weight: float, crop: int | None, foreground_weight: float, edge_weight: float,
         callback: Callable[[int, float], None] | None, latent_noise: float = 0.0, foreground_margin: int = 0,
         bf16: bool = False) -> None:
    """The optimisation loop of `train_vae`."""
    if foreground_margin < 0:
        raise ValueError(f"foreground_margin must be >= 0 pixels, got {foreground_margin}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, min(100, steps // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    param = next(iter(params))
    for step in range(steps):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
        x = images[idx].to(param)  # (B, 3, H, W)
        if crop is not None:
            top, left = (DOWNSCALE * int(torch.randint(0, (d - crop) // DOWNSCALE + 1, (1,), generator=gen))
                         for d in images.shape[-2:])
            x = x[:, :, top:top + crop, left:left + crop]  # (B, 3, crop, crop)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            latent = model.taesd_encoder(x)  # (B, C, H/8, W/8)
            if latent_noise:
                noise = torch.randn(latent.shape, generator=gen).to(latent)
                latent = latent + latent_noise * latent.detach().std() * noise
            hidden = model.taesd_decoder[:-1](latent)
        # The last convolution writes the pixels in float32: in bfloat16 (8 bits of mantissa) they would
        # round to steps of 1/256 near 1, coarser than the errors the decoder learns to remove.
        out = model.taesd_decoder[-1](hidden.float())  # (B, 3, H, W), unclamped
        err = out - x
        if foreground_weight:
            weight = foreground_weights(x, foreground_weight, foreground_margin)
            err = err * weight / weight.mean()
        loss = err.pow(2).mean() + l1_weight * err.abs().mean()
        if edge_weight:
            loss = loss + edge_weight * _edge_error(out, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if callback is not None:
            callback(step, float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.5f", step + 1, steps, float(loss.detach()))
