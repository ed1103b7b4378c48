"""Latent-to-RGB preview factors: the least-squares fit recovers a known linear map."""

from __future__ import annotations

import torch

from node_pack import pack_module

preview = pack_module("nodes.preview")
vae_mod = pack_module("unifusion.vae")


def test_fit_recovers_a_linear_decoder():
    gen = torch.Generator().manual_seed(0)
    factors = torch.randn(4, 3, generator=gen) * 0.3
    bias = torch.tensor([0.1, -0.2, 0.05])
    latents = torch.randn(6, 4, 5, 7, generator=gen)
    rgb = torch.einsum("nchw,cd->ndhw", latents, factors) + bias[None, :, None, None]  # in [-1, 1] units
    images = ((rgb + 1) / 2).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # 8x upsampled
    got_f, got_b = preview.fit_latent_rgb(latents, images)
    assert torch.allclose(torch.tensor(got_f), factors, atol=1e-5)
    assert torch.allclose(torch.tensor(got_b), bias, atol=1e-5)


def test_gray_fallback_shape():
    factors, bias = preview.gray_factors(3)
    assert factors == [[1 / 3] * 3] * 3 and bias == [0.0, 0.0, 0.0]


def test_factors_from_a_vae_file_beat_gray(tmp_path):
    torch.manual_seed(0)
    vae = vae_mod.TinyAutoencoder(4)
    path = vae_mod.save_vae(vae, tmp_path / "vae.safetensors")
    fitted = preview.factors_from_vae_file(path, 4)
    assert fitted is not None and len(fitted[0]) == 4 and len(fitted[1]) == 3
    assert preview.factors_from_vae_file(path, 8) is None  # other channel count: not this autoencoder
    assert preview.factors_from_vae_file(tmp_path / "missing.safetensors", 4) is None

    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(8, 4, 6, 6, generator=gen)
    with torch.no_grad():
        target = torch.nn.functional.adaptive_avg_pool2d(vae.decode(latents) * 2 - 1, (6, 6))

    def error(f, b):
        pred = torch.einsum("nchw,cd->ndhw", latents, torch.tensor(f)) + torch.tensor(b)[None, :, None, None]
        return float((pred - target).square().mean())

    assert error(*fitted) < error(*preview.gray_factors(4))
