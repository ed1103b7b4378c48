"""Turn whatever image a user has into a sane RGB PIL image, and tile it InternVL-style.

Accepted inputs: PIL images of any mode, numpy arrays and torch tensors laid out
``(H, W)``, ``(H, W, C)`` (ComfyUI's float ``[0, 1]`` layout), ``(1, H, W, C)`` or
``(C, H, W)`` with C in 1..4, uint8/uint16/bool or float values in ``[0, 1]``.
Transparency is composited on white; tiny images are upscaled and huge ones
downscaled before tiling so the processors never see a degenerate size.

Tile budget for the Qwen families: they see images at native resolution, so
``max_tiles`` maps to a pixel cap, ``max_pixels = max_tiles * 448 * 448`` (the area of
``max_tiles`` InternVL tiles; 256 tokens per tile for Qwen2.5-VL's 28-pixel tokens,
about 196 for Qwen3-VL's 32-pixel tokens). No thumbnail is added: a native-resolution
image already carries the global view.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError

TILE_AREA = 448 * 448
MIN_SIDE = 32
MAX_SIDE = 4096
MAX_ASPECT = 50.0
_RESIZABLE_MODES = {"L", "LA", "RGB", "RGBA", "RGBa", "La", "I", "F"}


def _white_composite(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale: scale to 8 bits instead of clipping at 255."""
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        values = values * 255.0 if values.size and np.nanmax(values) <= 1.0 else values
    elif values.size and values.max() > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8), "L").convert("RGB")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return _white_composite(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_bit_depth(image)
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise InputError(
            f"{name} has shape {tuple(array.shape)}; expected (H, W), (H, W, C) or (1, H, W, C) with C in 1..4 "
            "(split a batch of images into a list)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} is empty ({tuple(array.shape)}); pass an image with pixels")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32))
        low, high = float(array.min()), float(array.max())
        if low < -1e-3 or high > 1.0 + 1e-3:
            raise InputError(
                f"{name} has float values in [{low:.3g}, {high:.3g}]; float images must be in [0, 1] as ComfyUI "
                "gives them (divide 0-255 data by 255)"
            )
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    mode = "L" if array.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(array), mode))


def _resize_for_model(image: Image.Image, min_side: int, max_side: int, max_aspect: float) -> Image.Image:
    width, height = image.size
    if max(width, height) / min(width, height) > max_aspect:
        # Pad extreme strips (e.g. 1x5000) with white: processors reject aspect ratios over ~200.
        side = int(np.ceil(max(width, height) / max_aspect))
        size = (max(width, side), max(height, side))
        canvas = Image.new("RGB", size, (255, 255, 255))
        canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
        image, (width, height) = canvas, size
    if min(width, height) < min_side:
        scale = min_side / min(width, height)
        image = image.resize((max(min_side, round(width * scale)), max(min_side, round(height * scale))),
                             Image.Resampling.BICUBIC)
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def to_pil(
    image: Any,
    min_side: int = MIN_SIDE,
    max_side: int = MAX_SIDE,
    max_aspect: float = MAX_ASPECT,
    name: str = "image",
) -> Image.Image:
    """One image (PIL, numpy, torch) as RGB, sides within ``[min_side, max_side]``."""
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise InputError(f"{name} is empty ({image.width}x{image.height}); pass an image with pixels")
        if max(image.size) > max_side and image.mode in _RESIZABLE_MODES:  # shrink before converting
            image = image.copy()
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
        rgb = _pil_to_rgb(image)
    elif isinstance(image, np.ndarray):
        rgb = _array_to_pil(image, name)
    elif hasattr(image, "detach") and hasattr(image, "cpu"):
        tensor = image.detach().cpu()
        # bf16/fp16 have no numpy dtype; integer tensors keep theirs so uint8 stays 0..255
        rgb = _array_to_pil((tensor.float() if tensor.is_floating_point() else tensor).numpy(), name)
    else:
        raise InputError(f"{name} is a {type(image).__name__}; pass a PIL image, a numpy array or a torch tensor")
    return _resize_for_model(rgb, min_side, max_side, max_aspect)


def to_pil_list(images: Any) -> list[Image.Image]:
    """Images from one image, a list of images, or a batch ``(B, H, W, C)`` (ComfyUI IMAGE)."""
    if images is None:
        return []
    if isinstance(images, (np.ndarray,)) or hasattr(images, "detach"):
        if images.ndim == 4 and images.shape[0] > 1:
            return [to_pil(images[i], name=f"image {i}") for i in range(images.shape[0])]
        return [to_pil(images)]
    if isinstance(images, Image.Image):
        return [to_pil(images)]
    out: list[Image.Image] = []
    for item in images:
        out.extend(to_pil_list(item))
    return out


def tile_grid(
    width: int, height: int, tile_size: int = 448, max_tiles: int = 12, min_tiles: int = 1
) -> tuple[int, int]:
    """(columns, rows) of the grid whose aspect ratio is closest to the image's, with
    ``min_tiles <= columns * rows <= max_tiles``; on ties the larger grid wins while the
    image covers more than half of it (InternVL's ``find_closest_aspect_ratio``)."""
    if max_tiles < 1 or min_tiles < 1 or min_tiles > max_tiles:
        raise InputError(f"max_tiles must be >= min_tiles >= 1, got max_tiles={max_tiles}, min_tiles={min_tiles}")
    grids = sorted(
        ((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles),
        key=lambda g: g[0] * g[1],
    )
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(
    image: Any, tile_size: int = 448, max_tiles: int = 12, use_thumbnail: bool = True
) -> list[Image.Image]:
    """InternVL dynamic tiling: resize to the best grid, cut ``tile_size`` tiles, then add a
    thumbnail of the whole image when there is more than one tile."""
    image = to_pil(image)
    cols, rows = tile_grid(image.width, image.height, tile_size, max_tiles)
    canvas = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    tiles = [
        canvas.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def max_pixels_for_tiles(max_tiles: int) -> int:
    """Qwen pixel cap equivalent to `max_tiles` InternVL tiles (see the module docstring)."""
    if max_tiles < 1:
        raise InputError(f"max_tiles must be >= 1, got {max_tiles}")
    return max_tiles * TILE_AREA

