"""Tiny autoencoder: ComfyUI TAESD key parity, ComfyUI's encode/decode arithmetic, file
round trips and errors, the pixel-space pseudo-VAE, and a quick fit on demo-world images."""

import copy
import random
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unifusion.demo.world import random_scene, render
from unifusion.vae import (
    LIGHT_IDENTITY_BLOCKS,
    Block,
    PixelSpaceVAE,
    SoftClamp,
    TinyAutoencoder,
    VAEFileError,
    calibrate_latents,
    finetune_decoder,
    foreground_weights,
    load_vae,
    save_pixel_space_vae,
    save_vae,
    train_vae,
)

# Layout of ComfyUI's TAESD (comfy/taesd/taesd.py at ComfyUI a125cd84, Oct 2025), written down
# once from its source and checked key for key against TAESD(latent_channels=4 and 16).state_dict():
# Encoder and Decoder are nn.Sequential; a Block holds conv.0/conv.2/conv.4 (3x3, 64->64, bias)
# with an identity skip; the stride-2 and upsample convs have no bias; Clamp, ReLU and Upsample
# have no weights; vae_scale and vae_shift are scalar parameters of the TAESD module itself.
ENCODER_BLOCKS = (1, 3, 4, 5, 7, 8, 9, 11, 12, 13)
DECODER_BLOCKS = (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)
# index: (out, in, has_bias) of the plain convs; "C" stands for the latent channel count.
ENCODER_CONVS = {0: (64, 3, True), 2: (64, 64, False), 6: (64, 64, False), 10: (64, 64, False), 14: ("C", 64, True)}
DECODER_CONVS = {1: (64, "C", True), 7: (64, 64, False), 12: (64, 64, False), 17: (64, 64, False), 19: (3, 64, True)}


def comfy_taesd_shapes(latent_channels):
    shapes = {"vae_scale": (), "vae_shift": ()}
    for prefix, blocks, convs in (("taesd_encoder", ENCODER_BLOCKS, ENCODER_CONVS),
                                  ("taesd_decoder", DECODER_BLOCKS, DECODER_CONVS)):
        for i in blocks:
            for j in (0, 2, 4):
                shapes[f"{prefix}.{i}.conv.{j}.weight"] = (64, 64, 3, 3)
                shapes[f"{prefix}.{i}.conv.{j}.bias"] = (64,)
        for i, (out, inp, bias) in convs.items():
            out, inp = (latent_channels if v == "C" else v for v in (out, inp))
            shapes[f"{prefix}.{i}.weight"] = (out, inp, 3, 3)
            if bias:
                shapes[f"{prefix}.{i}.bias"] = (out,)
    return shapes


@pytest.fixture(autouse=True)
def one_thread():
    """The models and batches here are tiny: one thread avoids thread hand-off costs (large
    on a busy 2-core machine) and keeps the file fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def demo_images(n, seed, size=64):
    rng = random.Random(seed)
    arrays = [np.array(render(random_scene(rng), image_size=size)) for _ in range(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)


def randomized(model, seed=0, scale=1.7, shift=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        model.vae_scale.fill_(scale)
        model.vae_shift.fill_(shift)
    return model


@pytest.mark.parametrize("channels", [4, 16])
def test_state_dict_matches_comfyui_taesd(channels):
    model = TinyAutoencoder(latent_channels=channels)
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert found == comfy_taesd_shapes(channels)
    assert len(found) == 136
    # ComfyUI reads the latent channel count from this key.
    assert found["taesd_decoder.1.weight"][1] == channels
    enc = sum(p.numel() for p in model.taesd_encoder.parameters())
    dec = sum(p.numel() for p in model.taesd_decoder.parameters())
    assert 1.1e6 < enc < 1.3e6 and 1.1e6 < dec < 1.3e6  # width 64 is fixed by ComfyUI


def test_operations_dtype_and_device_are_used():
    built = []

    class CountingConv(torch.nn.Conv2d):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("dtype"))
            super().__init__(*args, **kwargs)

    ops = types.SimpleNamespace(Conv2d=CountingConv)
    model = TinyAutoencoder(4, dtype=torch.float64, device="cpu", operations=ops)
    assert len(built) == 70 and set(built) == {torch.float64}  # 35 convs per half
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert isinstance(model.taesd_decoder[0], SoftClamp)


def test_encode_decode_follow_comfyui_arithmetic():
    """ComfyUI's VAE wrapper does image*2-1 -> TAESD.encode (x*0.5+0.5 -> encoder, / vae_scale
    + vae_shift) and TAESD.decode ((z - vae_shift) * vae_scale -> decoder, then *2-1) ->
    clamp((x+1)/2, 0, 1). Recompute that sequence from the raw halves and compare."""
    model = randomized(TinyAutoencoder(4, width=16)).eval()
    images = torch.rand(2, 3, 32, 48)
    z = torch.randn(2, 4, 4, 6) * 2
    with torch.no_grad():
        ref_latent = model.taesd_encoder((images * 2 - 1) * 0.5 + 0.5) / 1.7 + 0.3
        raw = model.taesd_decoder((z - 0.3) * 1.7)
        ref_image = torch.clamp(((raw - 0.5) * 2 + 1) / 2, 0, 1)
        latent, image = model.encode(images), model.decode(z)
        assert latent.shape == (2, 4, 4, 6) and image.shape == (2, 3, 32, 48)
        torch.testing.assert_close(latent, ref_latent, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(image, ref_image, rtol=1e-5, atol=1e-6)
        assert image.min() >= 0 and image.max() <= 1
        torch.testing.assert_close(model.taesd_decoder[0](z), torch.tanh(z / 3) * 3)
        assert not torch.equal(model.decode(z, clamp=False), image)
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        model.decode(torch.rand(1, 3, 4, 4))


def test_save_load_round_trip(tmp_path):
    model = randomized(TinyAutoencoder(4))
    path = save_vae(model, tmp_path / "sub" / "vae.safetensors", metadata={"note": "demo"})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(comfy_taesd_shapes(4))
    assert meta["latent_channels"] == "4" and meta["width"] == "64" and meta["note"] == "demo"
    loaded = load_vae(path)
    assert isinstance(loaded, TinyAutoencoder) and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = demo_images(2, 0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))
    half = load_vae(path, dtype=torch.float64)
    assert {p.dtype for p in half.parameters()} == {torch.float64}
    # Narrow models (tests, experiments) keep their width.
    narrow = load_vae(save_vae(TinyAutoencoder(16, width=8), tmp_path / "narrow.safetensors"))
    assert (narrow.latent_channels, narrow.width) == (16, 8)


def test_file_without_scale_and_shift_loads_like_comfyui(tmp_path):
    model = randomized(TinyAutoencoder(4, width=8))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vae_")}
    save_file(state, str(tmp_path / "plain.safetensors"))
    loaded = load_vae(tmp_path / "plain.safetensors")
    assert float(loaded.vae_scale) == 1.0 and float(loaded.vae_shift) == 0.0


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(VAEFileError, match="not found: .*missing.safetensors"):
        load_vae(tmp_path / "missing.safetensors")
    with pytest.raises(VAEFileError, match="is a folder"):
        load_vae(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x02}q\x00. not a safetensors file at all")
    with pytest.raises(VAEFileError, match="junk.safetensors is not a readable safetensors file"):
        load_vae(junk)
    other = tmp_path / "other.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(other))
    with pytest.raises(VAEFileError, match=r"other.safetensors is not an autoencoder in the TAESD layout.*"
                                           r"taesd_decoder\.1\.weight"):
        load_vae(other)
    state = TinyAutoencoder(4, width=8).state_dict()
    broken = dict(state)
    broken["taesd_encoder.3.conv.2.weight"] = torch.zeros(8, 8, 1, 1)
    del broken["taesd_decoder.19.bias"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(VAEFileError, match=r"broken.safetensors.*missing: taesd_decoder.19.bias.*"
                                           r"wrong shape: taesd_encoder.3.conv.2.weight"):
        load_vae(tmp_path / "broken.safetensors")


def test_pixel_space_vae(tmp_path):
    path = save_pixel_space_vae(tmp_path / "pixel_space.safetensors")
    vae = load_vae(path)
    assert isinstance(vae, PixelSpaceVAE) and vae.downscale == 1 and vae.latent_channels == 3
    # ComfyUI's own pixel-space file holds just this key.
    save_file({"pixel_space_vae": torch.tensor(1.0)}, str(tmp_path / "comfy_pixel.safetensors"))
    assert isinstance(load_vae(tmp_path / "comfy_pixel.safetensors"), PixelSpaceVAE)
    x = demo_images(2, 1)
    z = vae.encode(x)
    torch.testing.assert_close(z, x * 2 - 1)
    torch.testing.assert_close(vae.decode(z), x)
    assert vae.decode(torch.full((1, 3, 2, 2), 3.0)).max() == 1.0


def test_quick_fit_lowers_reconstruction_error():
    # A narrow model on 32x32 demo renders keeps this fast; the shipped model is width 64.
    images = demo_images(64, 2, size=32)
    losses = []
    model = train_vae(images, steps=300, seed=0, width=8, batch_size=8, lr=3e-3,
                      callback=lambda step, loss: losses.append(loss))
    torch.manual_seed(0)
    untrained = TinyAutoencoder(4, width=8)
    with torch.no_grad():
        before = float((untrained.decode(untrained.encode(images)) - images).pow(2).mean())
        after = float((model.decode(model.encode(images)) - images).pow(2).mean())
        latents = model.encode(images)
    assert len(losses) == 300
    assert after < 0.25 * before, (before, after)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    # Calibration leaves latents standardised over the training images.
    assert abs(float(latents.mean())) < 1e-3 and abs(float(latents.std()) - 1) < 1e-3


def test_training_is_deterministic_and_checks_inputs():
    images = demo_images(8, 3, size=16)
    a = train_vae(images, steps=3, seed=5, width=4, batch_size=2, crop=8)
    b = train_vae(images, steps=3, seed=5, width=4, batch_size=2, crop=8)
    c = train_vae(images, steps=3, seed=6, width=4, batch_size=2, crop=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    with pytest.raises(ValueError, match="crop must be a multiple of 8"):
        train_vae(images, steps=1, width=4, crop=12)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        train_vae(images[:, :2], steps=1)
    with pytest.raises(ValueError, match="foreground_margin"):
        train_vae(images, steps=1, width=4, foreground_weight=4.0, foreground_margin=-1)


def test_foreground_margin_weighs_the_background_around_shapes():
    """A drawn circle where a small diamond should be errs in the grey just around the diamond: the
    margin gives those pixels the shapes' weight, the pixels farther out keep weight 1."""
    x = torch.full((1, 3, 9, 9), 0.5)
    x[0, :, 4, 4] = torch.tensor([0.9, 0.1, 0.1])  # one red pixel on grey
    plain, wide = foreground_weights(x, 4.0), foreground_weights(x, 4.0, margin=1)
    assert plain.shape == (1, 1, 9, 9)
    assert plain.sum() == 81 + 4 and plain[0, 0, 4, 4] == 5
    assert (wide[0, 0, 3:6, 3:6] == 5).all() and wide.sum() == 81 + 4 * 9
    images = demo_images(8, 3, size=16)
    a = train_vae(images, steps=2, seed=5, width=4, batch_size=2, foreground_weight=4.0)
    b = train_vae(images, steps=2, seed=5, width=4, batch_size=2, foreground_weight=4.0, foreground_margin=2)
    assert not torch.equal(a.taesd_decoder[-1].weight, b.taesd_decoder[-1].weight)


def test_calibrate_latents_sets_scale_and_shift():
    model = randomized(TinyAutoencoder(4, width=8), scale=1.0, shift=0.0)
    images = demo_images(16, 4, size=16)
    with torch.no_grad():
        raw = model.taesd_encoder(images)
        mean, std = calibrate_latents(model, images)
        assert mean == pytest.approx(float(raw.mean()), rel=1e-5)
        assert std == pytest.approx(float(raw.std()), rel=1e-5)
        torch.testing.assert_close(model.encode(images), (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-5)
        # Decoding is unchanged by calibration: only the latent coordinates move.
        torch.testing.assert_close(model.decode(model.encode(images)), model.taesd_decoder(raw).clamp(0, 1),
                                   rtol=1e-4, atol=1e-5)


def test_identity_blocks_train_cheaper_and_stay_exact():
    images = demo_images(8, 5, size=16)
    model = train_vae(images, steps=3, seed=0, width=4, batch_size=2, identity_blocks=LIGHT_IDENTITY_BLOCKS)
    assert set(model.state_dict()) == set(TinyAutoencoder(4, width=4).state_dict())
    for name in LIGHT_IDENTITY_BLOCKS:
        block = model.get_submodule(name)
        assert isinstance(block, Block) and not block.conv[4].weight.any() and not block.conv[4].bias.any()
    # The file's full network (as ComfyUI runs it) equals the bypassed one used in training.
    bypassed = copy.deepcopy(model)
    for name in LIGHT_IDENTITY_BLOCKS:
        half, index = name.split(".")
        getattr(bypassed, half)[int(index)] = torch.nn.ReLU()
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(images)), bypassed.decode(bypassed.encode(images)))
    trained = [k for k in ("taesd_encoder.3", "taesd_decoder.13")
               if model.get_submodule(k).conv[4].weight.any()]
    assert trained == ["taesd_encoder.3", "taesd_decoder.13"]
    with pytest.raises(ValueError, match="not a Block"):
        train_vae(images, steps=1, width=4, identity_blocks=("taesd_decoder.0",))


def test_finetune_decoder_keeps_the_latents_and_the_cache_fingerprint():
    from unifusion.train.fingerprint import vae_fingerprint

    images = demo_images(32, 4, size=32)
    model = train_vae(images, steps=40, seed=0, width=8, batch_size=8, lr=3e-3, identity_blocks=())
    with torch.no_grad():
        latents, before = model.encode(images), model.decode(model.encode(images))
    fingerprint = vae_fingerprint(model)
    decoder = copy.deepcopy(model.taesd_decoder.state_dict())
    model.requires_grad_(False)  # as load_vae hands it over
    finetune_decoder(model, images, steps=60, seed=1, batch_size=8, lr=3e-3, edge_weight=1.0)
    with torch.no_grad():
        assert torch.equal(model.encode(images), latents)  # encoder and latent statistics untouched
        after = model.decode(latents)
    assert vae_fingerprint(model) == fingerprint  # a feature cache of these latents stays valid
    assert any(not torch.equal(v, model.taesd_decoder.state_dict()[k]) for k, v in decoder.items())
    assert float((after - images).pow(2).mean()) < float((before - images).pow(2).mean())
    assert not any(p.requires_grad for p in model.parameters())  # flags restored


def test_latent_noise_reaches_the_decoder_at_its_scale():
    images = demo_images(8, 6, size=16)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(model: TinyAutoencoder) -> None:
        encoded: list[torch.Tensor] = []
        model.taesd_encoder.register_forward_hook(lambda m, i, out: encoded.append(out.detach()))
        model.taesd_decoder.register_forward_pre_hook(lambda m, args: seen.append((encoded[-1], args[0].detach())))

    torch.manual_seed(0)
    model = TinyAutoencoder(4, width=4)
    record(model)
    train_vae(images, steps=2, seed=0, batch_size=4, model=model, latent_noise=0.5)
    for clean, noisy in seen[:2]:
        ratio = float((noisy - clean).std() / clean.std())
        assert 0.3 < ratio < 0.7, ratio  # 0.5 latent standard deviations
    seen.clear()
    torch.manual_seed(0)
    plain = TinyAutoencoder(4, width=4)
    record(plain)
    train_vae(images, steps=2, seed=0, batch_size=4, model=plain)
    assert all(torch.equal(clean, decoded) for clean, decoded in seen[:2])  # off by default
    with pytest.raises(ValueError, match="latent_noise must be >= 0"):
        train_vae(images, steps=1, width=4, latent_noise=-0.1)


def test_bf16_decoder_finetune_runs_in_bfloat16_and_keeps_float32_weights():
    """``bf16`` runs the forward passes under autocast (convolutions in bfloat16) but the last one,
    which writes the pixels; weights, the optimizer and the loss stay float32, so the file and its
    loaders are unchanged. Deterministic, and not the float32 result."""
    images = demo_images(16, 7, size=16)
    base = train_vae(images, steps=3, seed=0, width=4, batch_size=4, identity_blocks=())
    blocks: list[torch.dtype] = []
    pixels: list[torch.dtype] = []

    def finetuned(bf16: bool) -> TinyAutoencoder:
        model = copy.deepcopy(base)
        hooks = [model.taesd_decoder[-2].register_forward_hook(lambda m, i, out: blocks.append(out.dtype)),
                 model.taesd_decoder[-1].register_forward_hook(lambda m, i, out: pixels.append(out.dtype))]
        finetune_decoder(model, images, steps=3, seed=1, batch_size=4, bf16=bf16)
        for hook in hooks:
            hook.remove()
        return model

    plain, half, again = finetuned(False), finetuned(True), finetuned(True)
    assert blocks == [torch.float32] * 3 + [torch.bfloat16] * 6 and pixels == [torch.float32] * 9
    assert all(p.dtype == torch.float32 for p in half.parameters())
    assert all(torch.equal(a, b) for a, b in zip(half.state_dict().values(), again.state_dict().values()))
    decoder = {k: v for k, v in half.state_dict().items() if k.startswith("taesd_decoder")}
    assert not all(torch.equal(v, plain.state_dict()[k]) for k, v in decoder.items())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in half.state_dict().items() if k not in decoder)
