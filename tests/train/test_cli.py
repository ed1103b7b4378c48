"""The training command line end to end: cache, train (+ export), export, lora; errors exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from unifusion.checkpoint import read_checkpoint_header
from unifusion.demo.grammar import sample_edits, sample_t2i
from unifusion.demo.world import render
from unifusion.train.cache import FeatureCache
from unifusion.train.cli import main, rope_axes_for
from unifusion.train.state import latest_state, read_meta


@pytest.fixture()
def data(tmp_path: Path) -> tuple[Path, Path]:
    rows = []
    for i, s in enumerate(sample_t2i(3, seed=1)):
        render(s.scene).save(tmp_path / f"t{i}.png")
        rows.append({"image": f"t{i}.png", "caption": s.caption})
    t2i = tmp_path / "t2i.jsonl"
    t2i.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    rows = []
    for i, s in enumerate(sample_edits(2, seed=1)):
        render(s.source).save(tmp_path / f"s{i}.png")
        render(s.target).save(tmp_path / f"g{i}.png")
        rows.append({"sources": [f"s{i}.png"], "instruction": s.instruction, "target": f"g{i}.png"})
    edit = tmp_path / "edit.jsonl"
    edit.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return t2i, edit


def test_rope_axes_for() -> None:
    assert rope_axes_for(32) == (8, 12, 12) and rope_axes_for(128) == (32, 48, 48) and sum(rope_axes_for(22)) == 22


def test_cache_train_export_lora(tiny_vlm, tiny_vae, data, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from unifusion.vae import save_vae

    vae = save_vae(tiny_vae, tmp_path / "vae.safetensors")
    cache = tmp_path / "cache"
    common = ["--vlm", str(tiny_vlm.folder), "--vae", str(vae), "--out", str(cache), "--dtype", "float32"]
    assert main(["cache", "--data", str(data[0]), "--data", str(data[1]), *common, "--layers", "3", "6"]) == 0
    assert "5 samples, variants plain, recon" in capsys.readouterr().out
    assert FeatureCache(cache).key.vlm.selected_layers == (3, 6)

    run = tmp_path / "run"
    recipe = ["--steps", "2", "--batch-size", "2", "--warmup", "1", "--no-progress", "--save-every", "1"]
    model = ["--width", "32", "--heads", "2", "--depth", "1", "--time-embed-dim", "16", "--lap-heads", "2"]
    release = tmp_path / "release.safetensors"
    code = main(["train", "--cache", str(cache), "--out", str(run), *recipe, *model, "--stage", "mixed",
                 "--loss-whitening", "0.5", "--export", str(release)])
    assert code == 0 and capsys.readouterr().out.strip() == str(release)
    assert read_meta(latest_state(run))["train_config"]["loss_whitening"] == 0.5
    head = read_checkpoint_header(release)
    assert head.config.dit.hidden_size == 32 and head.config.vlm.selected_layers == (3, 6)
    assert head.config.extra["trained_steps"] == 2 and "sampling_shift" in head.config.extra

    raw = tmp_path / "raw.safetensors"
    assert main(["export", str(run), str(raw), "--no-ema", "--shift", "2.5"]) == 0
    assert read_checkpoint_header(raw).config.extra["sampling_shift"] == 2.5

    adapter = tmp_path / "adapter.safetensors"
    code = main(["lora", "--cache", str(cache), "--out", str(tmp_path / "lora"), "--init-from", str(release),
                 *recipe, "--rank", "2", "--targets", "blocks.*.mlp.fc1", "--stage", "edit", "--export", str(adapter)])
    assert code == 0
    assert sorted(load_file(str(adapter))) == ["diffusion_model.dit.blocks.0.mlp.fc1.alpha",
                                               "diffusion_model.dit.blocks.0.mlp.fc1.lora_down.weight",
                                               "diffusion_model.dit.blocks.0.mlp.fc1.lora_up.weight"]


def test_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(tmp_path), str(tmp_path / "x.safetensors")]) == 2
    assert "holds no training state" in capsys.readouterr().err
    assert main(["train", "--cache", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a feature cache" in capsys.readouterr().err


def test_package_exports_resolve() -> None:
    import unifusion.train as package

    for name in package.__all__:
        assert getattr(package, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        package.nope  # noqa: B018


def test_compile_flags_reach_the_recipe_of_train_and_lora() -> None:
    from unifusion.train.cli import _recipe, build_parser

    base = ["--cache", "c", "--out", "o"]
    for command in (["train"], ["lora", "--init-from", "x.safetensors"]):
        parser = build_parser()
        assert _recipe(parser.parse_args([*command, *base])).compile is False
        assert _recipe(parser.parse_args([*command, *base, "--compile"])).compile is True
        assert _recipe(parser.parse_args([*command, *base, "--fused-optimizer"])).fused_optimizer is True
