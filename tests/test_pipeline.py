"""End to end: prompt (+ reference images) -> VLM -> LAP -> DiT sampling -> VAE decode."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unifusion.checkpoint import save_checkpoint
from unifusion.cli import main as cli_main
from unifusion.config import tiny_preset
from unifusion.errors import InputError, VLMMismatchError
from unifusion.model import UniFusionModel
from unifusion.pipeline import UniFusionPipeline
from unifusion.vae import TinyAutoencoder, save_vae
from unifusion.vlm.tiny import build_tiny_vlm


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    vlm = build_tiny_vlm(root / "vlm", "internvl", seed=0)
    torch.manual_seed(0)
    cfg = tiny_preset()  # matches the tiny InternVL: 8 layers, width 64, layers (4, 7)
    model = UniFusionModel(cfg)
    # adaLN-Zero starts at exactly zero output; perturb so conditioning visibly matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = save_checkpoint(root / "model.safetensors", model.state_dict(), cfg)
    vae = save_vae(TinyAutoencoder(latent_channels=cfg.dit.in_channels), root / "vae.safetensors")
    refs = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        path = root / f"ref{i}.png"
        Image.new("RGB", (64, 48), colour).save(path)
        refs.append(path)
    return {"vlm": vlm, "checkpoint": ckpt, "vae": Path(vae), "refs": refs, "root": root}


@pytest.fixture(scope="module")
def pipe(files):
    return UniFusionPipeline.from_files(files["vlm"], files["checkpoint"], files["vae"])


def _arr(image):
    return np.asarray(image, dtype=np.int16)


def test_edit_with_two_references_gives_a_decoded_image(pipe, files):
    images, condition = pipe.generate("put both shapes side by side", images=files["refs"], width=64, height=64,
                                      steps=3, cfg_scale=2.0, seed=3, max_tiles=1)
    assert len(images) == 1 and images[0].size == (64, 64) and images[0].mode == "RGB"
    text_only = pipe.encode("put both shapes side by side")
    # reference images add image tokens to the condition
    assert condition.tokens.shape[1] > text_only.tokens.shape[1]
    assert condition.tokens.shape[-1] == pipe.config.dit.hidden_size


def test_same_seed_same_image_other_seed_differs(pipe):
    cond = pipe.encode("a red circle")
    a = pipe.sample(cond, 64, 64, steps=2, seed=5)[0]
    b = pipe.sample(cond, 64, 64, steps=2, seed=5)[0]
    c = pipe.sample(cond, 64, 64, steps=2, seed=6)[0]
    assert np.array_equal(_arr(a), _arr(b))
    assert not np.array_equal(_arr(a), _arr(c))


def test_batch_image_i_equals_single_run_with_seed_plus_i(pipe):
    cond = pipe.encode("a red circle")
    batch = pipe.sample(cond, 64, 64, steps=2, seed=10, batch_size=2)
    single = pipe.sample(cond, 64, 64, steps=2, seed=11)[0]
    assert np.abs(_arr(batch[1]) - _arr(single)).max() <= 1


def test_prompt_changes_the_image(pipe):
    a = pipe.sample(pipe.encode("a red circle"), 64, 64, steps=2, seed=1)[0]
    b = pipe.sample(pipe.encode("two blue squares in the corner"), 64, 64, steps=2, seed=1)[0]
    assert not np.array_equal(_arr(a), _arr(b))


def test_guidance_is_limited_to_lower_noise_by_default(pipe):
    cond = pipe.encode("a red circle")
    default = _arr(pipe.sample(cond, 64, 64, steps=4, seed=3)[0])
    same = pipe.sample(cond, 64, 64, steps=4, seed=3, guidance_min_t=0.5, guidance_max_t=0.8)[0]
    assert np.array_equal(default, _arr(same))
    every = pipe.sample(cond, 64, 64, steps=4, seed=3, guidance_min_t=0.0, guidance_max_t=1.0)[0]
    assert not np.array_equal(default, _arr(every))
    # without CFG the interval changes nothing
    plain = [_arr(pipe.sample(cond, 64, 64, steps=4, seed=3, cfg_scale=1.0, guidance_min_t=lo, guidance_max_t=hi)[0])
             for lo, hi in ((0.2, 0.5), (0.0, 1.0))]
    assert np.array_equal(*plain)


def test_verifi_conditions_on_the_rewrite(pipe):
    cond = pipe.encode("a red circle", verifi=True, max_new_tokens=6)
    assert isinstance(cond.rewritten, str)
    assert cond.tokens.shape[1] <= 6


def test_layer_gains_change_the_condition(pipe):
    base = pipe.encode("a red circle").tokens
    dropped = pipe.encode("a red circle", layer_gains=[1.0, 0.0]).tokens
    assert not torch.allclose(base, dropped)
    with pytest.raises(InputError):
        pipe.encode("a red circle", layer_gains=[1.0, -1.0])


def test_bad_sizes_and_missing_reference_are_named(pipe, files):
    cond = pipe.encode("a red circle")
    with pytest.raises(InputError, match="width 60 is not a multiple of 8"):
        pipe.sample(cond, 60, 64, steps=1)
    with pytest.raises(InputError, match="not found"):
        pipe.encode("edit", images=[files["root"] / "missing.png"])


def test_mismatched_vlm_is_refused(files, tmp_path):
    other = build_tiny_vlm(tmp_path / "qwen", "qwen2_5_vl", seed=0, num_layers=6, hidden_size=96)
    with pytest.raises(VLMMismatchError, match="Qwen2_5_VLForConditionalGeneration"):
        UniFusionPipeline.from_files(other, files["checkpoint"], files["vae"])


def test_cli_generate_and_edit_write_pngs(files, tmp_path, capsys):
    common = ["--vlm", str(files["vlm"]), "--checkpoint", str(files["checkpoint"]), "--vae", str(files["vae"]),
              "--steps", "2", "--max-tiles", "1"]
    out = tmp_path / "gen.png"
    assert cli_main(["generate", "a red circle", "-o", str(out), *common]) == 0
    assert Image.open(out).size == (64, 64)
    out2 = tmp_path / "edit.png"
    assert cli_main(["edit", "make it blue", "-i", str(files["refs"][0]), "-o", str(out2), *common]) == 0
    assert out2.exists()
    assert cli_main(["generate", "x", "--width", "63", "-o", str(tmp_path / "bad.png"), *common]) == 2
    assert "not a multiple" in capsys.readouterr().err
    assert cli_main(["generate", "x", "--guidance-max-t", "1.5", "-o", str(tmp_path / "bad.png"), *common]) == 2
    assert "guidance interval needs 0 <= guidance_min_t" in capsys.readouterr().err
    assert cli_main(["info", str(files["checkpoint"])]) == 0
    assert "InternVLForConditionalGeneration" in capsys.readouterr().out


def test_reference_tokens_carry_their_place_to_a_placing_dit(pipe):
    """Each reference's frame tokens come with their place; a DiT with image_positions samples
    another image from them than from the same tokens without places, and text-only prompts
    have no placed tokens."""
    from dataclasses import replace

    condition = pipe.encode("make it blue", [Image.new("RGB", (64, 64), (255, 0, 0))], max_tiles=1)
    placed = torch.isfinite(condition.positions).all(dim=-1)
    assert placed.shape == condition.mask.shape and int(placed.sum()) == 16
    assert not torch.isfinite(pipe.encode("a red circle").positions).any()
    config = replace(pipe.config, dit=replace(pipe.config.dit, image_positions=True))
    model = UniFusionModel(config).eval()
    model.load_state_dict(pipe.model.state_dict())
    placing = UniFusionPipeline(pipe.vlm, model, config, pipe.vae)
    with_places = _arr(placing.sample(condition, 64, 64, steps=2, seed=1)[0])
    without = _arr(placing.sample(replace(condition, positions=None), 64, 64, steps=2, seed=1)[0])
    assert np.abs(with_places - without).max() > 0
