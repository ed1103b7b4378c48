"""Latent-to-RGB factors for ComfyUI's fast live previews (Latent2RGB); pure, no ComfyUI.

Latent2RGB maps each latent pixel through a linear layer, ``rgb = latent @ factors + bias``,
and shows ``(rgb + 1) / 2``. For an autoencoder whose decoder we can run, the best such
map is a least-squares fit from latents to the decoded images averaged over each latent
pixel's patch.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..unifusion.vae import TinyAutoencoder, VAEFileError, load_vae

logger = logging.getLogger(__name__)

RGBFactors = tuple[list[list[float]], list[float]]


def fit_latent_rgb(latents: torch.Tensor, images: torch.Tensor) -> RGBFactors:
    """Least-squares ``factors (C, 3)`` and ``bias (3,)`` with ``latent @ factors + bias ~ 2 * image - 1``.

    ``latents (N, C, h, w)``; ``images (N, 3, H, W)`` in [0, 1] with H, W multiples of h, w."""
    if latents.ndim != 4 or images.ndim != 4 or images.shape[1] != 3 or latents.shape[0] != images.shape[0]:
        raise ValueError(f"need latents (N, C, h, w) and images (N, 3, H, W), got {tuple(latents.shape)} "
                         f"and {tuple(images.shape)}")
    target = F.adaptive_avg_pool2d(images.double() * 2 - 1, latents.shape[-2:])  # (N, 3, h, w)
    x = latents.double().movedim(1, -1).reshape(-1, latents.shape[1])  # (M, C)
    y = target.movedim(1, -1).reshape(-1, 3)  # (M, 3)
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)  # (M, C + 1)
    solution = torch.linalg.lstsq(design, y).solution  # (C + 1, 3)
    factors, bias = solution[:-1], solution[-1]
    return [[round(float(v), 6) for v in row] for row in factors], [round(float(v), 6) for v in bias]


def gray_factors(channels: int) -> RGBFactors:
    """A neutral fallback: the channel mean as gray (shows structure, not colour)."""
    return [[1.0 / channels] * 3 for _ in range(channels)], [0.0, 0.0, 0.0]


@torch.no_grad()
def factors_from_decoder(vae: TinyAutoencoder, samples: int = 32, size: int = 8, seed: int = 0) -> RGBFactors:
    """Fit on decodes of standard-normal latents (the normalised latent space the DiT samples in)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(samples, vae.latent_channels, size, size, generator=gen)
    images = vae.decode(latents.to(vae.vae_scale.dtype)).float()  # (N, 3, 8*size, 8*size)
    return fit_latent_rgb(latents, images)


@lru_cache(maxsize=8)
def _cached_factors(path: str, mtime: float, channels: int) -> Optional[RGBFactors]:
    try:
        vae = load_vae(path)
    except VAEFileError as exc:
        logger.info("no preview colours from %s: %s", path, exc)
        return None
    if not isinstance(vae, TinyAutoencoder) or vae.latent_channels != channels:
        return None
    return factors_from_decoder(vae)


def factors_from_vae_file(path: Optional[Path], channels: int) -> Optional[RGBFactors]:
    """Factors fitted to a TAESD-layout autoencoder file with ``channels`` latent channels,
    or None when the file is absent or of another kind (cached per file version)."""
    if path is None or not Path(path).is_file():
        return None
    return _cached_factors(str(path), Path(path).stat().st_mtime, channels)
