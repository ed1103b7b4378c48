"""Trainer: overfitting, exact resume, Ctrl-C, config checks, dropout wiring, release export."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_dit

from unifusion.checkpoint import load_model
from unifusion.flow import add_noise
from unifusion.model import UniFusionModel
from unifusion.train.cache import collate
from unifusion.train.errors import TrainConfigError, TrainStateError
from unifusion.train.export import export_release, with_extra_blocks, with_image_injection
from unifusion.train.recipe import TrainConfig
from unifusion.train.run import model_config_for_cache, train
from unifusion.train.state import list_states
from unifusion.train.trainer import Trainer, TrainingModel, check_compiler

BASE = TrainConfig(steps=4, batch_size=2, grad_accum=2, lr=2e-3, warmup_steps=2, save_every=2, log_every=1,
                   stage="mixed", cond_dropout=0.3, recon_prob=0.3, verifi_prob=0.5, ema_decay=0.9)


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"w.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in trainer.ema.shadow.items()})
    for index, slots in trainer.optimizer.state_dict()["state"].items():
        out.update({f"opt.{index}.{s}": t.clone() for s, t in slots.items()})
    return out


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _fixed_loss(model: UniFusionModel, cache, indices: list[int]) -> float:
    """Loss at fixed timesteps and noise, no dropout: a yardstick independent of the training draws."""
    items = [cache.get(i) for i in indices]
    batch = collate([it.features["plain"] for it in items], [it.latent for it in items])
    gen = torch.Generator().manual_seed(123)
    noise = torch.randn(batch.latents.shape, generator=gen)
    t = torch.linspace(0.15, 0.85, len(indices))
    with torch.no_grad():
        context = model.encode_condition(batch.features, batch.mask)
        v = model(add_noise(batch.latents, noise, t), t, context, batch.mask)
    return float((v - (noise - batch.latents)).square().mean())


def test_training_overfits_a_tiny_batch(cache, model_config, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=40, batch_size=6, lr=3e-3, warmup_steps=3, cond_dropout=0.0, recon_prob=0.0,
                      ema_decay=0.0, save_every=100, log_every=10)
    trainer = Trainer(model_config, cache, cfg, tmp_path, progress=False)
    before = _fixed_loss(trainer.model, cache, trainer.pool)
    result = trainer.train()
    after = _fixed_loss(trainer.model, cache, trainer.pool)
    assert after < 0.5 * before, (before, after)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    rows = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[0]["loss"] == pytest.approx(sum(result.losses[:10]) / 10)
    assert [p.name for p in list_states(tmp_path)] == ["step-00000040"]


def test_exact_resume(cache, model_config, tmp_path: Path) -> None:
    straight = Trainer(model_config, cache, BASE, tmp_path / "a", progress=False)
    full = straight.train()
    first = Trainer(model_config, cache, replace(BASE, steps=2), tmp_path / "b", progress=False)
    first.train()
    second = Trainer(model_config, cache, BASE, tmp_path / "b", progress=False)
    second.resume(tmp_path / "b" / "states" / "step-00000002")
    rest = second.train()
    assert rest.losses == full.losses[2:]
    _assert_identical(_snapshot(straight), _snapshot(second))
    log_a = [json.loads(x)["loss"] for x in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()]
    assert log_a == log_b


def test_ctrl_c_saves_a_resumable_state(cache, model_config, tmp_path: Path) -> None:
    reference = Trainer(model_config, cache, BASE, tmp_path / "ref", progress=False)
    reference.train()

    def interrupt_at_3(info) -> None:
        if info.step == 3:
            raise KeyboardInterrupt

    result = train(cache.folder, tmp_path / "run", model_config, BASE, callbacks=[interrupt_at_3], progress=False)
    assert result.interrupted and result.step == 3 and result.state_dir.name == "step-00000003"
    resumed = Trainer(model_config, cache, BASE, tmp_path / "run", progress=False)
    resumed.resume(result.state_dir)
    assert resumed.train().step == 4
    _assert_identical(_snapshot(reference), _snapshot(resumed))


def test_real_sigint_stops_after_the_step(cache, model_config, tmp_path: Path) -> None:
    def press_ctrl_c(info) -> None:
        if info.step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    result = train(cache.folder, tmp_path, model_config, BASE, callbacks=[press_ctrl_c], progress=False)
    assert result.interrupted and result.step == 1 and (result.state_dir / "trainer.json").is_file()
    assert signal.getsignal(signal.SIGINT) is before
    again = train(cache.folder, tmp_path, model_config, BASE, progress=False)  # resume="auto"
    assert not again.interrupted and again.step == 4 and len(again.losses) == 3


def test_resume_refuses_other_configs(cache, model_config, tmp_path: Path) -> None:
    Trainer(model_config, cache, replace(BASE, steps=2), tmp_path, progress=False).train()
    state = tmp_path / "states" / "step-00000002"
    deeper = model_config_for_cache(cache, tiny_dit(depth=3), lap_heads=2, refiner_blocks=1)
    with pytest.raises(TrainStateError, match=r"another model config \(dit\.depth: 2 vs 3; saved vs this run\)"):
        Trainer(deeper, cache, BASE, tmp_path, progress=False).resume(state)
    with pytest.raises(TrainStateError, match=r"lr: saved 0\.002, now 0\.001"):
        Trainer(model_config, cache, replace(BASE, lr=1e-3), tmp_path, progress=False).resume(state)
    longer = Trainer(model_config, cache, replace(BASE, steps=3, save_every=5), tmp_path, progress=False)
    longer.resume(state)
    assert longer.step == 2
    with pytest.raises(TrainStateError, match="not a training state"):
        longer.resume(tmp_path)
    # a state from before LAP had its own optimizer group (one group, no lr_scale)
    saved = json.loads((state / "optimizer.json").read_text())
    merged = dict(saved["param_groups"][0], params=sum((g["params"] for g in saved["param_groups"]), []))
    merged.pop("lr_scale")
    (state / "optimizer.json").write_text(json.dumps(dict(saved, param_groups=[merged])))
    with pytest.raises(TrainStateError, match="older version"):
        Trainer(model_config, cache, BASE, tmp_path, progress=False).resume(state)


def test_options_the_cache_cannot_serve(cache, model_config, tmp_path: Path) -> None:
    from unifusion.train.cache import FeatureCache

    plain_only = FeatureCache(cache.folder)
    plain_only.key = replace(cache.key, verifi_system_prompt=None, recon_tiles=None)
    with pytest.raises(TrainConfigError, match="no Verifi features"):
        Trainer(model_config, plain_only, replace(BASE, recon_prob=0.0), tmp_path, progress=False)
    with pytest.raises(TrainConfigError, match="no reconstruction features"):
        Trainer(model_config, plain_only, replace(BASE, verifi_prob=0.0), tmp_path, progress=False)
    with pytest.raises(TrainConfigError, match="LoRA training needs init_from"):
        Trainer(model_config, cache, replace(BASE, lora={"rank": 2}), tmp_path, progress=False)


def test_dropout_feeds_the_null_condition_and_keeps_the_mask(model_config) -> None:
    model = UniFusionModel(model_config)
    seen = {}
    model.dit.register_forward_hook(lambda m, args, out: seen.update(context=args[2], mask=args[3]))
    features = torch.randn(3, 5, 2, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    drop = torch.tensor([True, False, True])
    TrainingModel(model)(torch.randn(3, 4, 8, 8), torch.rand(3), features, mask, drop)
    assert torch.equal(seen["context"][0], torch.zeros(5, 32)) and torch.equal(seen["context"][2], torch.zeros(5, 32))
    torch.testing.assert_close(seen["context"][1], model.encode_condition(features, mask)[1])
    assert torch.equal(seen["mask"], mask)
    assert TrainingModel(model).state_dict().keys() == model.state_dict().keys()


def test_release_export_and_edit_stage_from_it(cache, model_config, tmp_path: Path) -> None:
    cfg = replace(BASE, stage="t2i", steps=2)
    trainer = Trainer(model_config, cache, cfg, tmp_path / "t2i", progress=False)
    result = trainer.train()
    release = export_release(tmp_path / "t2i", tmp_path / "t2i.safetensors")
    model, config = load_model(release)
    assert config.extra["sampling_shift"] == pytest.approx(trainer.shift) and config.extra["ema"] is True
    for name, value in model.state_dict().items():
        assert torch.equal(value, trainer.ema.shadow[name].to(value.dtype)), name
    raw, _ = load_model(export_release(result.state_dir, tmp_path / "raw.safetensors", use_ema=False))
    for name, value in raw.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name
    edit_cfg = replace(BASE, stage="edit", steps=1, init_from=str(release))
    edit = train(cache.folder, tmp_path / "edit", None, edit_cfg, progress=False)
    assert edit.step == 1
    editor = Trainer(model_config, cache, replace(edit_cfg, steps=1), tmp_path / "x", progress=False)
    assert torch.equal(editor.model.dit.x_embedder.weight, model.dit.x_embedder.weight)
    assert all(cache.samples[i].kind == "edit" for i in editor.pool)
    other = model_config_for_cache(cache, tiny_dit(depth=3), lap_heads=2, refiner_blocks=1)
    with pytest.raises(TrainConfigError, match=r"another model config than this run \(dit\.depth: 2 vs 3"):
        Trainer(other, cache, edit_cfg, tmp_path / "y", progress=False)


def test_with_image_injection_adds_a_zero_injection_that_an_edit_finetune_learns(cache, model_config,
                                                                                tmp_path: Path) -> None:
    Trainer(model_config, cache, replace(BASE, stage="t2i", steps=1), tmp_path / "t2i", progress=False).train()
    release = export_release(tmp_path / "t2i", tmp_path / "t2i.safetensors")
    widened = with_image_injection(release, tmp_path / "wide.safetensors")
    (base, _), (wide, config) = load_model(release), load_model(widened)
    assert config.dit.image_injection and not base.cfg.dit.image_injection
    assert set(wide.state_dict()) - set(base.state_dict()) == {"dit.image_injection.weight"}
    assert not wide.dit.image_injection.weight.any()
    for name, value in base.state_dict().items():
        assert torch.equal(wide.state_dict()[name], value), name
    with pytest.raises(TrainStateError, match="already has image_injection"):
        with_image_injection(widened, tmp_path / "again.safetensors")
    assert cache.key.frame_positions  # edit samples' image tokens carry their place, which the injection reads
    edit = train(cache.folder, tmp_path / "edit", None, replace(BASE, stage="edit", steps=2, init_from=str(widened)),
                 progress=False)
    tuned, _ = load_model(export_release(edit.state_dir, tmp_path / "edit.safetensors", use_ema=False))
    assert tuned.dit.image_injection.weight.abs().sum() > 0


def test_with_extra_blocks_adds_identity_blocks_that_an_edit_finetune_trains(cache, model_config,
                                                                            tmp_path: Path) -> None:
    Trainer(model_config, cache, replace(BASE, stage="t2i", steps=1), tmp_path / "t2i", progress=False).train()
    release = export_release(tmp_path / "t2i", tmp_path / "t2i.safetensors")
    deeper = with_extra_blocks(release, tmp_path / "deep.safetensors", 2, seed=3)
    (base, _), (deep, config) = load_model(release), load_model(deeper)
    depth = base.cfg.dit.depth
    assert config.dit.depth == depth + 2
    added = {name.split(".")[2] for name in set(deep.state_dict()) - set(base.state_dict())}
    assert added == {str(depth), str(depth + 1)}
    for name, value in base.state_dict().items():
        assert torch.equal(deep.state_dict()[name], value), name
    new_qkv = deep.dit.blocks[depth].attn.qkv.weight
    assert new_qkv.std() > 0 and not deep.dit.blocks[depth].modulation.weight.any()
    again, _ = load_model(with_extra_blocks(release, tmp_path / "again.safetensors", 2, seed=3))
    assert torch.equal(again.dit.blocks[depth].attn.qkv.weight, new_qkv)  # the seed fixes the new weights
    torch.manual_seed(0)
    x, t = torch.randn(2, model_config.dit.in_channels, 4, 4), torch.tensor([0.3, 0.9])
    context = torch.randn(2, 5, model_config.dit.hidden_size)
    with torch.no_grad():
        assert torch.equal(deep.dit(x, t, context), base.dit(x, t, context))  # the identity until trained
    with pytest.raises(ValueError, match="positive integer"):
        with_extra_blocks(release, tmp_path / "none.safetensors", 0)
    edit = train(cache.folder, tmp_path / "edit", None, replace(BASE, stage="edit", steps=2, init_from=str(deeper)),
                 progress=False)
    tuned, _ = load_model(export_release(edit.state_dir, tmp_path / "edit.safetensors", use_ema=False))
    assert tuned.dit.blocks[depth + 1].modulation.weight.abs().sum() > 0


def test_condition_lr_scale_moves_lap_slower_and_zero_freezes_it(cache, model_config, tmp_path: Path) -> None:
    def lap_and_dit_change(scale: float) -> tuple[float, float]:
        cfg = replace(BASE, steps=3, grad_accum=1, save_every=100, condition_lr_scale=scale)
        trainer = Trainer(model_config, cache, cfg, tmp_path / str(scale), progress=False)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        after = trainer.model.state_dict()
        change = {part: sum(float((after[k] - before[k]).abs().sum()) for k in before if k.startswith(part))
                  for part in ("lap.", "dit.")}
        assert [g["lr_scale"] for g in trainer.optimizer.param_groups] == [scale, 1.0]
        return change["lap."], change["dit."]

    full_lap, full_dit = lap_and_dit_change(1.0)
    tenth_lap, tenth_dit = lap_and_dit_change(0.1)
    frozen_lap, frozen_dit = lap_and_dit_change(0.0)
    assert frozen_lap == 0.0 < tenth_lap < 0.5 * full_lap
    assert min(full_dit, tenth_dit, frozen_dit) > 0
    with pytest.raises(TrainConfigError, match="condition_lr_scale"):
        TrainConfig(condition_lr_scale=-1.0)


def test_a_placing_dit_trains_on_the_cached_frame_positions(cache, model_config, tmp_path: Path) -> None:
    """Reconstruction batches hand the DiT each image token's place from the cache; the loss trains."""
    from dataclasses import replace

    config = replace(model_config, dit=replace(model_config.dit, image_positions=True))
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, recon_prob=1.0, save_every=100, log_every=1)
    trainer = Trainer(config, cache, cfg, tmp_path, progress=False)
    seen = []
    trainer.model.dit.register_forward_hook(lambda m, args, out: seen.append(args[4]))
    result = trainer.train()
    assert all(math.isfinite(loss) for loss in result.losses) and len(seen) == 2
    placed = torch.isfinite(seen[0]).all(dim=-1)  # (B, S)
    assert placed.sum(dim=1).tolist() == [16] * 4  # one tile of the target per sample


def test_edit_repeat_weights_the_mixed_pool(cache) -> None:
    from unifusion.train.errors import TrainConfigError
    from unifusion.train.trainer import training_pool

    edits = cache.indices(("edit",))
    t2i = cache.indices(("t2i",))
    assert edits and t2i
    pool = training_pool(cache, TrainConfig(stage="mixed", edit_repeat=3))
    assert sorted(pool) == sorted(t2i + edits * 3)
    assert training_pool(cache, TrainConfig(stage="mixed")) == cache.indices(("t2i", "edit"))
    assert training_pool(cache, TrainConfig(stage="edit", edit_repeat=3)) == edits  # one kind: nothing to weigh
    with pytest.raises(TrainConfigError, match="edit_repeat must be >= 1"):
        TrainConfig(edit_repeat=0)


def test_mixed_precision_can_change_between_runs_of_one_process(cache, model_config, tmp_path: Path) -> None:
    """accelerate keeps one process-wide state; the demo's stages and these tests switch precision."""
    losses = {}
    for precision in ("no", "bf16", "no"):
        cfg = replace(BASE, steps=2, save_every=2, mixed_precision=precision)
        trainer = Trainer(model_config, cache, cfg, tmp_path / precision, progress=False)
        assert trainer.accelerator.mixed_precision == precision
        losses.setdefault(precision, []).append(trainer.train().losses)
    assert losses["no"][0] == losses["no"][1]  # float32 again after bf16: the same run exactly
    assert losses["bf16"][0] != losses["no"][0]  # the forward did run in bf16
    assert losses["bf16"][0] == pytest.approx(losses["no"][0], rel=0.05)


@pytest.mark.needs_cpp_compiler
def test_compiled_training_follows_eager_and_resumes_exactly(cache, model_config, tmp_path: Path) -> None:
    """TrainConfig.compile trains the same model as eager up to kernel rounding (padded batches of several
    condition lengths through one dynamic graph), and a compiled run resumes to the same bits."""
    eager = Trainer(model_config, cache, BASE, tmp_path / "eager", progress=False).train().losses
    compiled = replace(BASE, compile=True)
    straight = Trainer(model_config, cache, compiled, tmp_path / "a", progress=False)
    full = straight.train().losses
    assert full == pytest.approx(eager, rel=1e-3)
    Trainer(model_config, cache, replace(compiled, steps=2), tmp_path / "b", progress=False).train()
    second = Trainer(model_config, cache, compiled, tmp_path / "b", progress=False)
    second.resume(tmp_path / "b" / "states" / "step-00000002")
    assert second.train().losses == full[2:]
    _assert_identical(_snapshot(straight), _snapshot(second))
    # The compiled forward shares the module's parameters: the state keeps the module's names.
    assert set(straight.model.state_dict()) == set(Trainer(model_config, cache, BASE, tmp_path / "c",
                                                           progress=False).model.state_dict())


def test_fused_optimizer_takes_the_same_steps_up_to_rounding(cache, model_config, tmp_path: Path) -> None:
    loop = Trainer(model_config, cache, BASE, tmp_path / "loop", progress=False)
    fused = Trainer(model_config, cache, replace(BASE, fused_optimizer=True), tmp_path / "fused", progress=False)
    assert fused.optimizer.optimizer.defaults["fused"] and not loop.optimizer.optimizer.defaults["fused"]
    assert fused.train().losses == pytest.approx(loop.train().losses, rel=1e-4)
    for (name, a), b in zip(loop.model.state_dict().items(), fused.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_without_a_cpp_compiler_names_the_fix(monkeypatch) -> None:
    """A CPU run needs the C++ compiler even where a GPU is present; a CUDA run needs Triton and a C compiler."""
    import importlib.util

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(TrainConfigError, match="C\\+\\+ compiler.*apt install g\\+\\+.*compile off"):
        check_compiler(torch.device("cpu"))
    real_find_spec = importlib.util.find_spec

    def triton_spec(found):
        return lambda name, *args: found if name == "triton" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", triton_spec(None))
    with pytest.raises(TrainConfigError, match="triton package.*pip install triton.*compile off"):
        check_compiler(torch.device("cuda", 0))
    monkeypatch.setattr(importlib.util, "find_spec", triton_spec(object()))
    with pytest.raises(TrainConfigError, match="C compiler.*apt install gcc.*compile off"):
        check_compiler(torch.device("cuda", 0))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "gcc" else None)
    check_compiler(torch.device("cuda", 0))  # Triton and gcc: nothing missing
    check_compiler(torch.device("mps"))  # other devices are not checked


@pytest.mark.needs_cpp_compiler
def test_resume_refuses_a_change_of_compile(cache, model_config, tmp_path: Path) -> None:
    """Compiled kernels round differently: an exact resume keeps the setting it was trained with."""
    Trainer(model_config, cache, replace(BASE, steps=2), tmp_path, progress=False).train()
    other = Trainer(model_config, cache, replace(BASE, compile=True), tmp_path, progress=False)
    with pytest.raises(TrainStateError, match="compile"):
        other.resume(tmp_path / "states" / "step-00000002")


@pytest.mark.needs_cpp_compiler
def test_every_compiled_run_in_a_process_compiles_afresh(cache, model_config, tmp_path: Path, monkeypatch) -> None:
    """A second compiled run in the process trains the first one's bits: past dynamo's recompile limit (here
    1) it would otherwise fall back to eager, whose kernels round differently (the demo's third edit cycle)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    # bf16: accelerate wraps each run's forward in a new autocast closure, which dynamo guards on.
    cfg = replace(BASE, steps=2, save_every=2, compile=True, mixed_precision="bf16")
    first = Trainer(model_config, cache, cfg, tmp_path / "a", progress=False).train().losses
    second = Trainer(model_config, cache, cfg, tmp_path / "b", progress=False).train().losses
    assert second == first
