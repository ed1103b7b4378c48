"""Values that travel between the pack's nodes (custom socket types); pure, no ComfyUI.

They are immutable: ComfyUI caches node outputs and hands the same object to every
consumer, so a node that "adds" a reference returns a new tuple instead of appending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..unifusion.config import VLMIdentity
from ..unifusion.errors import InputError
from ..unifusion.vlm.encode import VLMFeatures

MAX_TILES = 12
_BAND_ROWS = 256
_RANGE_SLACK = 1e-3


@dataclass(frozen=True)
class Reference:
    """One reference image for the VLM and its own tile budget."""

    image: torch.Tensor  # (H, W, C) float in [0, 1], ComfyUI's layout without the batch axis
    max_tiles: int


References = tuple[Reference, ...]


def add_references(previous: Optional[References], image: torch.Tensor, max_tiles: int) -> References:
    """``previous`` followed by every image of ``image`` (a ComfyUI IMAGE batch (B, H, W, C)),
    each with ``max_tiles``. Returns a new tuple; ``previous`` is left as it is."""
    if not isinstance(max_tiles, int) or not 1 <= max_tiles <= MAX_TILES:
        raise InputError(f"max_tiles must be a whole number in 1..{MAX_TILES}, got {max_tiles!r}")
    if not isinstance(image, torch.Tensor):
        raise InputError(f"image must be a ComfyUI IMAGE tensor, got {type(image).__name__}; connect an image output")
    batch = image if image.ndim == 4 else image.unsqueeze(0) if image.ndim == 3 else None
    if batch is None or batch.shape[-1] not in (1, 2, 3, 4):
        raise InputError(
            f"image has shape {tuple(image.shape)}; expected a ComfyUI IMAGE (batch, height, width, channels) "
            "with 1-4 channels: connect an IMAGE output, not a mask or a latent"
        )
    if batch.shape[0] == 0 or batch.shape[1] == 0 or batch.shape[2] == 0:
        raise InputError(f"image is empty {tuple(batch.shape)}; connect an image with pixels")
    added = tuple(Reference(batch[i].detach(), max_tiles) for i in range(batch.shape[0]))
    return tuple(previous or ()) + added


def split_references(references: Optional[Sequence[Reference]]) -> tuple[list[torch.Tensor], list[int]]:
    """(images, tile budgets) in order, as the library's encode/verifi take them."""
    refs = list(references or ())
    return [r.image for r in refs], [r.max_tiles for r in refs]


def reference_pixels(image: torch.Tensor) -> np.ndarray:
    """A reference ``(H, W, C)`` float in [0, 1] as uint8 ``(H, W, C)``, converted a band of rows at
    a time. The values equal what the library makes of the float image (NaN as 0, round half to
    even), without the library's full-size float copies: turning an 8000x8000 reference into
    tiles peaked at about 0.9 GB extra this way against 2.4 GB from the float tensor."""
    if not image.is_floating_point():
        return image.detach().cpu().numpy()
    out = torch.empty(image.shape, dtype=torch.uint8)
    low, high = float("inf"), float("-inf")
    for start in range(0, image.shape[0], _BAND_ROWS):
        band = torch.nan_to_num(image[start:start + _BAND_ROWS].detach().to("cpu", torch.float32), nan=0.0)
        if band.numel():
            low, high = min(low, float(band.min())), max(high, float(band.max()))
        out[start:start + _BAND_ROWS] = band.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    if low < -_RANGE_SLACK or high > 1.0 + _RANGE_SLACK:
        raise InputError(
            f"image: a reference has values in [{low:.3g}, {high:.3g}]; ComfyUI images are in [0, 1]. Fix the node "
            "that made it (or divide 0-255 data by 255)"
        )
    return out.numpy()


@dataclass(frozen=True)
class ConditionFeatures:
    """Encoded VLM features plus what the LAP node must check: the VLM they came from."""

    features: VLMFeatures
    vlm: VLMIdentity
    summary: str
    rewritten: Optional[str] = None  # Verifi's rewritten prompt, when Verifi produced the features
