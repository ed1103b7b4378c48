"""Pure helpers behind the reliability fixes: reference pixels converted in bands (same values as
the library's float path) and the NaN/Inf check the MODEL runs before each DiT call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unifusion.vlm.images import to_pil


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_reference_pixels_match_the_library_float_path(pack, channels: int) -> None:
    values = pack("nodes.values")
    gen = torch.Generator().manual_seed(channels)
    image = torch.rand(600, 70, channels, generator=gen)  # taller than one band of rows
    image[0, 0, 0] = float("nan")
    image[3, 3, 0] = 0.5 / 255 * 3  # an exact .5 after scaling: round half to even on both paths
    image[7, 7, 0] = 1.0005  # within the library's tolerance
    pixels = values.reference_pixels(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (600, 70, channels)
    assert np.array_equal(np.asarray(to_pil(pixels)), np.asarray(to_pil(image)))


@pytest.mark.parametrize("bad", [1.5, float("inf"), -0.2])
def test_reference_pixels_refuse_values_outside_0_1(pack, bad: float) -> None:
    values, errors = pack("nodes.values"), pack("unifusion.errors")
    image = torch.rand(300, 10, 3)
    image[290, 1, 1] = bad  # in the second band
    with pytest.raises(errors.InputError, match=r"image: a reference has values in .*ComfyUI images are in \[0, 1\]"):
        values.reference_pixels(image)


def test_reference_pixels_keep_integer_images(pack) -> None:
    values = pack("nodes.values")
    image = torch.randint(0, 256, (5, 6, 3), dtype=torch.uint8)
    assert np.array_equal(values.reference_pixels(image), image.numpy())


def _options(step: int) -> dict:
    schedule = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    return {"sample_sigmas": schedule, "sigmas": schedule[step - 1:step].expand(2)}


def test_finite_inputs_pass(pack) -> None:
    finite = pack("nodes.finite")
    assert finite.nonfinite_problem(torch.zeros(2, 4, 8, 8), torch.zeros(2, 3, 16), _options(1)) is None


def test_non_finite_latent_blames_the_input_at_the_first_step_and_overflow_later(pack) -> None:
    finite = pack("nodes.finite")
    x = torch.zeros(2, 4, 8, 8)
    x[1, 2, 3, 4] = float("nan")
    first = finite.nonfinite_problem(x, None, _options(1))
    assert "latent_image" in first and "Connect a clean latent" in first
    later = finite.nonfinite_problem(x, None, _options(3))
    assert "at step 3 of 4" in later and "weight_dtype bf16 or fp32" in later
    assert "latent_image" in finite.nonfinite_problem(x, None, None)  # no schedule: treated as the input


def test_non_finite_conditioning_blames_the_encoder(pack) -> None:
    finite = pack("nodes.finite")
    context = torch.zeros(2, 3, 16)
    context[0, 1, 2] = float("-inf")
    problem = finite.nonfinite_problem(torch.zeros(2, 4, 8, 8), context, _options(2))
    assert "conditioning" in problem and "VLM with dtype bf16 or fp32" in problem
