"""`train-demo --quick`: every stage runs with the real pipeline, the result loads through
UniFusionPipeline, a re-run with the same seed writes the same model files, and finished
stages are reused only while their settings and inputs stay the same."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import torch
from PIL import Image

from unifusion.bundled import DEMO_CHECKPOINT, DEMO_VAE_PATH, DEMO_VLM
from unifusion.checkpoint import read_checkpoint_header
from unifusion.demo.grammar import EDIT_OPS
from unifusion.demo.train_demo import (
    REPORT_NAME,
    REPRODUCIBILITY_PACKAGES,
    STAGE_PARAMS,
    DemoRecipe,
    build_parser,
    file_digests,
    library_versions,
    main,
    quick_recipe,
    recipe_from_args,
    stage_fingerprints,
)
from unifusion.pipeline import UniFusionPipeline


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("demo_out"), tmp_path_factory.mktemp("demo_work")
    assert main(["--quick", "--out", str(out), "--work", str(work), "--seed", "3", "--grid", str(work / "grid.png"),
                 "--ablations"]) == 0
    return out, work


def test_quick_run_writes_a_loadable_demo(quick_run):
    out, work = quick_run
    report = json.loads((out / REPORT_NAME).read_text())
    grid = Image.open(work / "grid.png")
    assert grid.width > 4 * 128 and grid.height > 3 * 128
    assert set(report["stages"]) == {"vlm", "vae", "cache", "t2i", "edit", "decoder", "ablations", "eval"}
    assert all(s["wall_s"] >= 0 for s in report["stages"].values())
    assert {"exact", "psnr"} <= set(report["metrics"]["vae"]) and {"exact", "psnr"} <= set(report["metrics"]["decoder"])
    benchmark = report["metrics"]["benchmark"]
    assert report["recipe"]["seed"] == 3 and "exact" in benchmark["t2i"]
    assert report["libraries"] == library_versions()
    assert {"ablation: deepest selected layer only", "ablation: mean of the selected layers",
            "t2i before the edit finetune", "reconstruction, 4 tiles + thumbnail",
            "edit, one reference, Verifi rewrite", "compose, two references, Verifi rewrite"} <= set(benchmark)
    edits = benchmark["edit, one reference, Verifi rewrite"]
    assert {"success", "identity"} <= set(edits) and set(edits) - {"success", "identity"} <= set(EDIT_OPS)
    for name, pooling in (("lap", "attention"), ("last_layer", "last"), ("mean_of_layers", "mean")):
        assert read_checkpoint_header(work / "ablations" / f"{name}.safetensors").config.lap.pooling == pooling
    header = read_checkpoint_header(out / DEMO_CHECKPOINT)
    assert header.config.vlm.selected_layers == quick_recipe().vlm_layers  # layer 0 (input embeddings) among them
    assert header.config.extra["sampling_shift"] > 0 and header.config.extra["ema"] is True
    assert header.config.extra["trained_steps"] == quick_recipe().edit_steps[-1]  # the last edit cycle's
    pipe = UniFusionPipeline.from_files(out / DEMO_VLM, out / DEMO_CHECKPOINT, out / DEMO_VAE_PATH)
    images, condition = pipe.generate("a red circle", steps=2, seed=0)
    assert images[0].size == (64, 64) and condition.tokens.shape[-1] == header.config.dit.hidden_size
    edited, _ = pipe.generate("make the red circle blue", images=[images[0]], steps=2, seed=0, verifi=True)
    assert edited[0].size == (64, 64)


def test_same_seed_same_files_and_reuse(quick_run, tmp_path):
    out, work = quick_run
    again, again_work = tmp_path / "again", tmp_path / "work"
    common = ["--quick", "--out", str(again), "--work", str(again_work), "--seed", "3", "--no-eval"]
    assert main(common + ["--stop-after", "cache"]) == 0  # stopped early ...
    assert not (again / DEMO_CHECKPOINT).exists() and (again_work / "cache" / "index.json").is_file()
    assert main(common) == 0  # ... and continued: the same files as one uninterrupted run
    first, second = file_digests(out), file_digests(again)
    assert first == second and len(first) >= 8
    # Same work folder, same settings: every stage is reused and nothing is rewritten.
    before = {p: p.stat().st_mtime_ns for p in (out / DEMO_CHECKPOINT, out / DEMO_VAE_PATH, out / DEMO_VLM / "config.json")}
    assert main(["--quick", "--out", str(out), "--work", str(work), "--seed", "3", "--no-eval"]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads((out / REPORT_NAME).read_text())["files"] == first


def test_eval_only_grid_writes_no_empty_report(quick_run, tmp_path):
    """`--eval-only --eval-count 0 --grid` redraws the grid and leaves the model folder as it was."""
    out, _ = quick_run
    before = sorted(p.name for p in out.iterdir())
    grid = tmp_path / "g.png"
    assert main(["--quick", "--out", str(out), "--eval-only", "--eval-count", "0", "--grid", str(grid)]) == 0
    assert Image.open(grid).width > 4 * 128
    assert sorted(p.name for p in out.iterdir()) == before


def test_fingerprints_change_downstream_only():
    base = stage_fingerprints(quick_recipe())
    edit = stage_fingerprints(replace(quick_recipe(), edit_steps=(9, 1)))
    assert [s for s in base if base[s] != edit[s]] == ["edit"]
    for change in ({"vae_steps": 9}, {"vae_latent_noise": 0.5}):
        vae = stage_fingerprints(replace(quick_recipe(), **change))
        assert [s for s in base if base[s] != vae[s]] == ["vae", "cache", "t2i", "edit", "decoder", "ablation"]
    decoder = stage_fingerprints(replace(quick_recipe(), decoder_steps=(9,)))
    assert [s for s in base if base[s] != decoder[s]] == ["decoder"]
    layers = stage_fingerprints(replace(quick_recipe(), vlm_layers=(2,)))
    assert [s for s in base if base[s] != layers[s]] == ["cache", "t2i", "edit", "ablation"]
    ablation = stage_fingerprints(replace(quick_recipe(), ablation_steps=9))
    assert [s for s in base if base[s] != ablation[s]] == ["ablation"]


def test_a_changed_decoder_recipe_trains_from_the_vae_stage_not_the_old_decoder(quick_run, tmp_path):
    """The decoder stage writes the shipped autoencoder; redone with other cycles it must start
    from the vae stage's file again, and write what a fresh stage writes from it."""
    import shutil

    from unifusion.demo.stages import stage_decoder
    from unifusion.demo.train_demo import VAE_STAGE, content_digest, train_demo

    out, work = quick_run
    shutil.copytree(out, tmp_path / "out")
    shutil.copytree(work, tmp_path / "work")
    recipe = replace(quick_recipe(3), decoder_steps=(1, 2))
    train_demo(tmp_path / "out", recipe, tmp_path / "work", evaluate=False, jobs=1)
    stage_decoder(recipe, tmp_path / "fresh.safetensors", work / VAE_STAGE)
    rerun = content_digest(tmp_path / "out" / DEMO_VAE_PATH)
    assert rerun == content_digest(tmp_path / "fresh.safetensors") != content_digest(out / DEMO_VAE_PATH)
    assert content_digest(tmp_path / "out" / DEMO_CHECKPOINT) == content_digest(out / DEMO_CHECKPOINT)  # DiT reused


def test_the_last_edit_cycle_starts_from_the_one_before(quick_run, tmp_path):
    """The shipped checkpoint's second edit cycle was trained from its first cycle's export: the
    stage must write what `edit_cycle` writes from ``work/edit1.safetensors``."""
    from unifusion.demo.stages import edit_cycle
    from unifusion.demo.train_demo import content_digest
    from unifusion.train.cache import FeatureCache

    out, work = quick_run
    recipe = quick_recipe(3)
    first = work / "edit1.safetensors"
    assert read_checkpoint_header(first).config.extra["trained_steps"] == recipe.edit_steps[0]
    again = edit_cycle(recipe, FeatureCache(work / "cache"), tmp_path, 1, first, tmp_path / "cycle2.safetensors")
    assert content_digest(again) == content_digest(out / DEMO_CHECKPOINT) != content_digest(first)


@pytest.mark.parametrize("option, value, start, grown", [
    ("edit_image_injection", True, "t2i_injection.safetensors",
     lambda model: model.dit.cfg.image_injection and model.dit.image_injection.weight.abs().sum() > 0),
    ("edit_extra_blocks", 2, "t2i_deeper.safetensors",
     lambda model: len(model.dit.blocks) == quick_recipe().dit_depth + 2
     and model.dit.blocks[-1].modulation.weight.abs().sum() > 0)])
def test_the_edit_stage_grows_the_dit_when_the_recipe_asks(quick_run, tmp_path, option, value, start, grown):
    """``edit_image_injection`` and ``edit_extra_blocks`` start the edit cycles from the text-to-image checkpoint
    with the (zero) injection or the (identity) blocks added; the finetune trains them. Off (the shipped recipe),
    the edit checkpoint has the text-to-image DiT's layout."""
    from unifusion.checkpoint import load_model
    from unifusion.demo.stages import stage_edit
    from unifusion.train.cache import FeatureCache

    out, work = quick_run
    shipped = read_checkpoint_header(out / DEMO_CHECKPOINT).config.dit
    assert not shipped.image_injection and shipped.depth == quick_recipe().dit_depth
    recipe = replace(quick_recipe(3), **{option: value})
    final = stage_edit(recipe, FeatureCache(work / "cache"), tmp_path, work / "t2i.safetensors",
                       tmp_path / "edit.safetensors")
    assert (tmp_path / start).is_file()
    model, _ = load_model(final)
    assert grown(model)


def test_each_edit_cycle_trains_at_its_own_batch_size_and_learning_rate(quick_run):
    """Each cycle trains at its own batch size and peak learning rate (the shipped second cycle peaks at four times
    the first's)."""
    _, work = quick_run
    recipe = quick_recipe(3)
    assert len(set(recipe.edit_batch_size)) > 1 and len(set(recipe.edit_lr)) > 1
    for cycle, (batch, lr) in enumerate(zip(recipe.edit_batch_size, recipe.edit_lr)):
        meta = next((work / f"edit{cycle + 1}").glob("states/*/trainer.json"))
        config = json.loads(meta.read_text())["train_config"]
        assert (config["batch_size"], config["lr"]) == (batch, lr)


@pytest.mark.parametrize("steps", [(), (100, 0), (10.5,)])
def test_decoder_cycles_must_be_positive_step_counts(steps):
    with pytest.raises(ValueError, match="decoder_steps"):
        replace(DemoRecipe(), decoder_steps=steps)


@pytest.mark.parametrize("name", ["t2i_steps_beside_worker", "edit_extra_blocks"])
@pytest.mark.parametrize("count", [-1, 2.5, True])
def test_counts_of_steps_and_blocks_must_be_whole_and_not_negative(name, count):
    with pytest.raises(ValueError, match=name):
        replace(DemoRecipe(), **{name: count})
    assert getattr(replace(DemoRecipe(), **{name: 0}), name) == 0


@pytest.mark.parametrize("change, named", [({"edit_steps": ()}, "edit_steps"), ({"edit_repeat": (1, 0)}, "edit_repeat"),
                                           ({"edit_batch_size": (32, 8.0)}, "edit_batch_size"),
                                           ({"edit_lr": (2e-4, 0.0)}, "edit_lr"),
                                           ({"edit_lr": ("2e-4", 4e-4)}, "edit_lr"),
                                           ({"edit_lr": (2e-4,)}, "one value per edit cycle"),
                                           ({"edit_lr": 2e-4}, "edit_lr must be a tuple"),
                                           ({"edit_steps": 3000}, "edit_steps must be a tuple"),
                                           ({"edit_steps": (1000,)}, "one value per edit cycle"),
                                           ({"edit_batch_size": (32,)}, "one value per edit cycle")])
def test_edit_cycles_need_positive_steps_and_a_repeat_each(change, named):
    with pytest.raises(ValueError, match=named):
        replace(DemoRecipe(), **change)


def test_the_command_line_names_a_mismatched_edit_cycle_count():
    with pytest.raises(SystemExit, match="one value per edit cycle"):
        recipe_from_args(build_parser().parse_args(["--edit-steps", "500"]))
    assert recipe_from_args(build_parser().parse_args(["--edit-steps", "500", "700"])).edit_steps == (500, 700)


def test_every_training_option_feeds_a_fingerprint():
    """A recipe option no stage lists would change the model without redoing any stage."""
    listed = {name for params in STAGE_PARAMS.values() for name in params}
    not_training = {"eval_count", "vlm_eval_every"}  # benchmark size; progress logs of the VLM stage
    assert set(DemoRecipe().to_dict()) - listed == not_training


def test_library_versions_name_what_a_rerun_must_match():
    import transformers

    versions = library_versions()
    assert set(versions) == {"python", *REPRODUCIBILITY_PACKAGES, "cpu_capability"}
    assert versions["transformers"] == transformers.__version__
    assert versions["torch"] == torch.__version__


def test_edit_finetune_mixes_in_text_to_image_samples():
    from unifusion.demo.stages import _recipe_config

    assert _recipe_config(DemoRecipe(), "edit").stage == "mixed"
    assert _recipe_config(replace(DemoRecipe(), edit_mix_t2i=False), "edit").stage == "edit"
    assert _recipe_config(DemoRecipe(), "t2i").stage == "t2i"


def test_each_dit_stage_takes_its_own_reconstruction_share():
    """The edit finetune's reconstruction share is its own setting, and only the edit stage (the
    last one) is redone when it changes."""
    from unifusion.demo.stages import _recipe_config
    from unifusion.demo.train_demo import stage_fingerprints

    recipe = replace(DemoRecipe(), recon_prob=0.05, edit_recon_prob=0.4)
    assert _recipe_config(recipe, "t2i").recon_prob == 0.05
    assert _recipe_config(recipe, "edit").recon_prob == 0.4
    before, after = stage_fingerprints(DemoRecipe()), stage_fingerprints(replace(DemoRecipe(), edit_recon_prob=0.9))
    assert {stage for stage in before if before[stage] != after[stage]} == {"edit"}


def test_arguments_override_the_recipe():
    args = build_parser().parse_args(["--t2i-steps", "7", "--vlm-steps", "5", "--seed", "2"])
    recipe = recipe_from_args(args)
    assert recipe.t2i_steps == 7 and recipe.vlm.steps == 5 and recipe.seed == 2
    assert recipe.dit_width == DemoRecipe().dit_width
    quick = recipe_from_args(build_parser().parse_args(["--quick"]))
    assert quick.t2i_steps < DemoRecipe().t2i_steps and torch.get_num_threads() >= 1


def recorded_part(defaults: Any, recorded: Any) -> Any:
    """``defaults`` cut down to the keys ``recorded`` has, level by level (a key it lacks here fails)."""
    if not isinstance(recorded, dict):
        return defaults
    assert isinstance(defaults, dict), f"recorded options {sorted(recorded)} where the recipe has {defaults!r}"
    assert set(recorded) <= set(defaults), f"recorded options the recipe lacks: {sorted(set(recorded) - set(defaults))}"
    return {k: recorded_part(defaults[k], v) for k, v in recorded.items()}


def test_recorded_part_keeps_only_recorded_options():
    defaults = {"steps": 3, "vlm": {"layers": 2, "tile": 64}, "new": 1}
    assert recorded_part(defaults, {"steps": 3, "vlm": {"layers": 2}}) == {"steps": 3, "vlm": {"layers": 2}}
    assert recorded_part(defaults, {"steps": 4}) != {"steps": 4}
    with pytest.raises(AssertionError):
        recorded_part(defaults, {"gone": 1})


def test_shipped_files_are_those_the_recorded_run_wrote():
    """The bundled report is the `train-demo` run that made the shipped files: same recipe as the
    defaults, same content digests (a swapped or hand-edited file breaks this)."""
    from unifusion.bundled import ASSETS_DIR

    report = json.loads((ASSETS_DIR / REPORT_NAME).read_text(encoding="utf-8"))
    defaults = json.loads(json.dumps(DemoRecipe().to_dict()))
    # Options added after the run (here or in a nested config such as the VLM's) are missing from its record;
    # their defaults keep the behaviour it had.
    assert recorded_part(defaults, report["recipe"]) == report["recipe"]
    assert file_digests(ASSETS_DIR) == report["files"]


def test_t2i_takes_every_thread_after_its_steps_beside_the_worker(quick_run, tmp_path, monkeypatch):
    """t2i's first `t2i_steps_beside_worker` steps run on this process's share beside the decoder's
    worker, the rest on every thread, whether the decoder runs or is reused: bf16 kernels write other
    tensors on other thread counts, so a re-run must give each step the threads it had."""
    import shutil

    from unifusion.demo import train_demo
    from unifusion.demo.recipe import quick_recipe

    out, work = quick_run
    shutil.copytree(out, tmp_path / "out")
    shutil.copytree(work, tmp_path / "work")
    (tmp_path / "work" / "t2i.safetensors").unlink()  # t2i (and the edit after it) run again, the decoder is reused
    seen, original = [], train_demo.stage_t2i

    def recorded(*args: Any, callbacks: Any = (), **kwargs: Any) -> Any:
        record = lambda info: seen.append(torch.get_num_threads())  # noqa: E731
        return original(*args, callbacks=[*callbacks, record], **kwargs)

    monkeypatch.setattr(train_demo, "stage_t2i", recorded)
    threads = torch.get_num_threads()
    assert main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--seed", "3",
                 "--no-eval", "--jobs", "2"]) == 0
    recipe = quick_recipe(3)
    beside = recipe.t2i_steps_beside_worker
    assert 0 < beside < recipe.t2i_steps
    assert seen == [max(1, threads - threads // 2)] * (beside - 1) + [threads] * (recipe.t2i_steps - beside + 1)
    assert torch.get_num_threads() == threads
    assert file_digests(tmp_path / "out") == file_digests(out)


def test_the_decoder_starts_behind_the_vae_and_the_cache_gets_this_process_share(quick_run, tmp_path, monkeypatch):
    """The decoder needs only the vae stage's file, so it is queued in the worker before the VLM
    stage and trains while the VLM and the cache run here; the cache then takes this process's
    share of the threads (never more threads than cores) and both write what they wrote before."""
    import shutil

    from unifusion.demo import train_demo

    out, work = quick_run
    shutil.copytree(out, tmp_path / "out")
    shutil.copytree(work, tmp_path / "work")
    (tmp_path / "out" / DEMO_VAE_PATH).unlink()
    shutil.rmtree(tmp_path / "work" / "cache")
    events: list[Any] = []
    start, cache, vlm = train_demo._start_worker, train_demo.stage_cache, train_demo.stage_vlm
    monkeypatch.setattr(train_demo, "_start_worker",
                        lambda pool, stage, *a: events.append(("queued", stage)) or start(pool, stage, *a))
    monkeypatch.setattr(train_demo, "stage_cache",
                        lambda *a, **k: events.append(("cache", torch.get_num_threads())) or cache(*a, **k))
    monkeypatch.setattr(train_demo, "stage_vlm", lambda *a, **k: events.append("vlm") or vlm(*a, **k))
    (tmp_path / "out" / DEMO_VLM / "config.json").unlink()  # the VLM trains again, with the decoder beside it
    threads = torch.get_num_threads()
    assert main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--seed", "3",
                 "--no-eval", "--jobs", "2"]) == 0
    assert events == [("queued", "decoder"), "vlm", ("cache", max(1, threads - threads // 2))]
    assert torch.get_num_threads() == threads
    assert file_digests(tmp_path / "out") == file_digests(out)
    shards = sorted(p.relative_to(work) for p in (work / "cache").rglob("*.safetensors"))
    again = sorted(p.relative_to(tmp_path / "work") for p in (tmp_path / "work" / "cache").rglob("*.safetensors"))
    assert shards and shards == again
    for shard in shards:
        assert train_demo.content_digest(tmp_path / "work" / shard) == train_demo.content_digest(work / shard)


def test_an_error_here_stops_the_worker_instead_of_waiting_for_its_queued_stages(tmp_path, monkeypatch):
    """With the decoder queued behind the vae, a failing VLM stage must not wait for both to finish:
    the worker is stopped and the error comes out, with no decoder written."""
    from unifusion.demo import train_demo

    def failing_vlm(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the VLM stage failed")

    monkeypatch.setattr(train_demo, "stage_vlm", failing_vlm)
    with pytest.raises(RuntimeError, match="the VLM stage failed"):
        main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--seed", "3",
              "--no-eval", "--jobs", "2"])
    assert not (tmp_path / "out" / DEMO_VAE_PATH).exists()
    assert not (tmp_path / "work" / "stages.json").exists() or "decoder" not in json.loads(
        (tmp_path / "work" / "stages.json").read_text())


def test_ablations_train_after_the_edit_on_every_thread_and_only_those_missing(quick_run, tmp_path, monkeypatch):
    """The ablation variants train here after the model files (beside t2i they would take a core
    from it), on every thread; a re-run trains only a missing one, to the same tensors."""
    import shutil

    from unifusion.demo import train_demo

    out, work = quick_run
    shutil.copytree(out, tmp_path / "out")
    shutil.copytree(work, tmp_path / "work")
    lap = tmp_path / "work" / "ablations" / "lap.safetensors"
    lap.unlink()
    seen, original = [], train_demo.stage_ablations
    monkeypatch.setattr(train_demo, "stage_ablations",
                        lambda *a, **k: seen.append((a[2], torch.get_num_threads())) or original(*a, **k))
    threads = torch.get_num_threads()
    assert main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--seed", "3",
                 "--no-eval", "--jobs", "2", "--ablations"]) == 0
    assert seen == [(["lap"], threads)]
    assert train_demo.content_digest(lap) == train_demo.content_digest(work / "ablations" / "lap.safetensors")
    stages = json.loads((tmp_path / "work" / "stages.json").read_text())
    assert {f"ablation:{name}" for name in train_demo.ABLATION_VARIANTS} <= set(stages)


def test_a_failing_decoder_stops_t2i_at_its_switch_step(quick_run, tmp_path):
    """The worker's error comes out where t2i joins the worker (its `t2i_steps_beside_worker`-th step),
    with neither the decoder nor t2i written or marked finished, so a re-run redoes both."""
    import shutil

    from unifusion.demo.recipe import quick_recipe
    from unifusion.demo.train_demo import stage_fingerprints, train_demo

    out, work = quick_run
    shutil.copytree(out, tmp_path / "out")
    shutil.copytree(work, tmp_path / "work")
    (tmp_path / "out" / DEMO_VAE_PATH).unlink()
    (tmp_path / "work" / "t2i.safetensors").unlink()
    recipe = replace(quick_recipe(3), decoder_lr=-1.0)  # AdamW refuses it in the worker, after the vae stage
    with pytest.raises(ValueError, match="learning rate"):
        train_demo(tmp_path / "out", recipe, tmp_path / "work", evaluate=False, jobs=2)
    stages = json.loads((tmp_path / "work" / "stages.json").read_text())
    assert stages.get("decoder", {}).get("fingerprint") != stage_fingerprints(recipe)["decoder"]
    assert not (tmp_path / "out" / DEMO_VAE_PATH).exists() and not (tmp_path / "work" / "t2i.safetensors").exists()
