"""Reference lists: immutable chaining, batches split into references, clear errors."""

from __future__ import annotations

import pytest
import torch

from node_pack import pack_module

values = pack_module("nodes.values")
InputError = pack_module("unifusion.errors").InputError


def test_chaining_returns_new_tuples_in_order():
    a, b = torch.rand(1, 8, 8, 3), torch.rand(2, 4, 6, 3)
    first = values.add_references(None, a, 6)
    second = values.add_references(first, b, 2)
    assert len(first) == 1 and len(second) == 3  # the first list is unchanged
    images, tiles = values.split_references(second)
    assert tiles == [6, 2, 2]
    assert torch.equal(images[0], a[0]) and torch.equal(images[1], b[0]) and torch.equal(images[2], b[1])
    assert values.split_references(None) == ([], [])


def test_single_image_without_batch_axis_and_gray():
    refs = values.add_references((), torch.rand(5, 7, 1), 1)
    assert refs[0].image.shape == (5, 7, 1)


@pytest.mark.parametrize("image, match", [
    (torch.rand(1, 8, 8, 5), "1-4 channels"),
    (torch.rand(8, 8), "expected a ComfyUI IMAGE"),
    (torch.rand(0, 8, 8, 3), "empty"),
    ("image.png", "IMAGE tensor"),
])
def test_bad_images(image, match):
    with pytest.raises(InputError, match=match):
        values.add_references(None, image, 6)


@pytest.mark.parametrize("tiles", [0, 13, 2.5])
def test_bad_tile_budget(tiles):
    with pytest.raises(InputError, match="max_tiles"):
        values.add_references(None, torch.rand(1, 8, 8, 3), tiles)
