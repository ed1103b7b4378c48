"""Odd images become sane RGB; dynamic tiling matches InternVL's image processor exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from unifusion.errors import InputError
from unifusion.vlm.images import (
    MAX_SIDE, MIN_SIDE, dynamic_tiles, max_pixels_for_tiles, tile_grid, to_pil, to_pil_list,
)


def test_modes_become_rgb():
    gray = to_pil(Image.new("L", (40, 40), 77))
    assert gray.mode == "RGB" and gray.getpixel((5, 5)) == (77, 77, 77)
    clear = to_pil(Image.new("RGBA", (40, 40), (255, 0, 0, 0)))
    assert clear.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    half = to_pil(Image.new("RGBA", (40, 40), (0, 0, 0, 128)))
    assert half.getpixel((5, 5)) == (127, 127, 127)
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert to_pil(palette).getpixel((0, 0)) == (10, 200, 30)
    palette.info["transparency"] = 1
    assert to_pil(palette).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))
    assert to_pil(deep).getpixel((0, 0)) == (255, 255, 255)
    assert to_pil(Image.new("1", (40, 40), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_pil(Image.new("CMYK", (40, 40), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_arrays_and_comfy_tensors():
    values = torch.rand(50, 60, 3)
    image = to_pil(values)  # ComfyUI (H, W, C) float in [0, 1]
    assert image.size == (60, 50)
    expected = (values * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(image), expected)
    assert to_pil(values[None]).size == (60, 50)  # (1, H, W, C)
    assert to_pil(values.permute(2, 0, 1)).size == (60, 50)  # (C, H, W)
    assert to_pil(values.to(torch.bfloat16)).size == (60, 50)
    assert to_pil(np.zeros((50, 60), dtype=np.uint8)).getpixel((0, 0)) == (0, 0, 0)
    assert to_pil(np.ones((50, 60, 1), dtype=bool)).getpixel((0, 0)) == (255, 255, 255)
    rgba = np.zeros((50, 60, 4), dtype=np.float32)
    assert to_pil(rgba).getpixel((0, 0)) == (255, 255, 255)
    batch = to_pil_list(torch.rand(3, 40, 40, 3))
    assert len(batch) == 3 and all(im.size == (40, 40) for im in batch)
    assert len(to_pil_list([Image.new("RGB", (40, 40)), torch.rand(2, 40, 40, 3)])) == 3


def test_bad_inputs_name_the_fix():
    with pytest.raises(InputError, match=r"float values .*\[0, 1\]"):
        to_pil(np.full((10, 10, 3), 200.0))
    with pytest.raises(InputError, match="split a batch"):
        to_pil(torch.rand(2, 10, 10, 3))
    with pytest.raises(InputError, match="empty"):
        to_pil(np.zeros((0, 10, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="PIL image, a numpy array or a torch tensor"):
        to_pil("cat.png")


def test_sizes_are_clamped():
    assert min(to_pil(Image.new("RGB", (1, 1), (9, 9, 9))).size) == MIN_SIDE
    strip = to_pil(Image.new("RGB", (5000, 1), (0, 0, 0)))
    assert max(strip.size) / min(strip.size) <= 50.0 + 1e-6
    assert strip.getpixel((2500, 0)) == (255, 255, 255)  # padded with white, line kept in the middle
    huge = to_pil(Image.new("L", (8000, 8000), 128))
    assert huge.size == (MAX_SIDE, MAX_SIDE) and huge.getpixel((10, 10)) == (128, 128, 128)
    assert to_pil(Image.new("RGB", (8000, 2000))).size == (MAX_SIDE, 1024)


def _reference_grid(width, height, max_tiles, tile=448):
    """InternVL's original find_closest_aspect_ratio, written out independently."""
    ratios = sorted({(i, j) for n in range(1, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if i * j <= max_tiles}, key=lambda x: x[0] * x[1])
    best_diff, best = float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(width / height - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * tile * tile * ratio[0] * ratio[1]:
            best = ratio
    return best


@pytest.mark.parametrize("max_tiles", [1, 2, 6, 12])
def test_tile_grid_matches_internvl(max_tiles):
    rng = np.random.default_rng(max_tiles)
    sizes = [(448, 448), (896, 448), (1000, 10), (10, 1000), (1344, 896)] + [
        tuple(int(x) for x in rng.integers(1, 4000, 2)) for _ in range(200)
    ]
    for width, height in sizes:
        cols, rows = tile_grid(width, height, 448, max_tiles)
        assert (cols, rows) == _reference_grid(width, height, max_tiles)
        assert cols * rows <= max_tiles


@pytest.mark.parametrize("size,max_tiles,count", [((900, 300), 6, 4), ((448, 448), 6, 1), ((100, 700), 4, 5),
                                                  ((2000, 1000), 12, 9), ((640, 480), 1, 1)])
def test_dynamic_tiles_equal_the_image_processor(tiny_dirs, size, max_tiles, count):
    processor = AutoImageProcessor.from_pretrained(tiny_dirs["internvl"], local_files_only=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    tiles = dynamic_tiles(image, 448, max_tiles)
    assert len(tiles) == count and all(t.size == (448, 448) for t in tiles)
    reference = processor(images=[image], crop_to_patches=True, max_patches=max_tiles, return_tensors="pt")
    assert reference["num_patches"].tolist() == [count]
    ours = processor(images=tiles, crop_to_patches=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, reference["pixel_values"], atol=1e-6, rtol=0)


def test_tiles_without_thumbnail_and_qwen_budget():
    assert len(dynamic_tiles(Image.new("RGB", (896, 448)), 448, 6, use_thumbnail=False)) == 2
    assert max_pixels_for_tiles(6) == 6 * 448 * 448
    with pytest.raises(InputError, match="max_tiles"):
        max_pixels_for_tiles(0)
    with pytest.raises(InputError, match="max_tiles"):
        tile_grid(10, 10, 448, 0)


def test_uint8_torch_tensor_reads_like_numpy():
    arr = (np.arange(48 * 40 * 3) % 256).astype(np.uint8).reshape(48, 40, 3)
    from_torch = to_pil(torch.from_numpy(arr))
    assert np.array_equal(np.asarray(from_torch), np.asarray(to_pil(arr)))
