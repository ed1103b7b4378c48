"""The stages of `train-demo`, each a function from the recipe (and earlier results) to files.

VLM and autoencoder training live in `vlm_training` and `unifusion.vae`; the feature cache,
the trainer and the release export are the training pipeline's (`unifusion.train`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..bundled import DEMO_CHECKPOINT, DEMO_VAE_PATH, DEMO_VLM
from .batch_verifi import verifi_rewrite_batch
from .evaluate import scene_pixels
from .grammar import sample_edits, sample_t2i
from .recipe import DemoRecipe, dit_config
from .vlm_training import evaluate_rewrites, train_demo_vlm
from .world import KINDS, mixed_scenes, render

logger = logging.getLogger("unifusion.demo.train")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Share of the prompts' shapes a rewrite keeps (`evaluate_rewrites`' rewrite_kind) below which the VLM has not
# learnt to copy shapes: chance is 1 in len(KINDS); the shipped VLM keeps 95%, named-order runs with a trained LM
# head (VLMTrainConfig.fixed_lm_head off) kept 20-30% on one machine in two.
SHAPES_KEPT_FLOOR = 0.5


def vlm_shape_warning(metrics: dict[str, float]) -> Optional[str]:
    """A warning when the VLM's rewrites keep too few of the prompts' shapes: that happens to
    some runs of a recipe on some machines, and the DiT stages after it take about an hour."""
    kept = metrics.get("rewrite_kind")
    if kept is None or kept >= SHAPES_KEPT_FLOOR:
        return None
    return (f"the VLM's rewrites keep only {kept:.0%} of the prompts' shapes (chance {1 / len(KINDS):.0%}, the "
            "shipped VLM 95%): it has not learnt to copy shapes, so Verifi prompts through it will draw wrong ones. "
            "Stop here and train the VLM again with VLMTrainConfig.fixed_lm_head on (the recipe's default) or "
            "another --seed; see docs/demo_experiments.md, 'A fixed LM head'")


def stage_vlm(recipe: DemoRecipe, folder: Path) -> tuple[Any, dict[str, float]]:
    """Train and save the VLM, then reload it from ``folder`` (what users will load) and score it."""
    from ..vlm.loader import load_vlm

    vlm_cfg = replace(recipe.vlm, seed=recipe.seed)
    shutil.rmtree(folder, ignore_errors=True)
    train_demo_vlm(folder, vlm_cfg, eval_every=recipe.vlm_eval_every)
    vlm = load_vlm(folder)
    metrics = evaluate_rewrites(vlm, recipe.vlm_eval_count) if recipe.vlm_eval_count else {}
    logger.info("vlm metrics: %s", json.dumps(metrics))
    warning = vlm_shape_warning(metrics)
    if warning is not None:
        logger.warning(warning)
    return vlm, metrics


def stage_vae(recipe: DemoRecipe, path: Path, threads: Optional[int] = None) -> tuple[Any, dict[str, float]]:
    """Fit the autoencoder on rendered scenes (a quarter count scenes), save, reload and score.
    ``threads`` sets torch's thread count first (for a worker process)."""
    from ..vae import LIGHT_IDENTITY_BLOCKS, load_vae, save_vae, train_vae
    from .evaluate import evaluate_vae

    if threads:
        torch.set_num_threads(threads)

    model = train_vae(_vae_images(recipe), recipe.vae_steps, seed=recipe.seed, batch_size=recipe.vae_batch_size,
                      lr=recipe.vae_lr, latent_channels=recipe.vae_latent_channels, crop=recipe.vae_crop,
                      foreground_weight=recipe.vae_foreground_weight, edge_weight=recipe.vae_edge_weight,
                      identity_blocks=LIGHT_IDENTITY_BLOCKS if recipe.vae_light else (),
                      latent_noise=recipe.vae_latent_noise)
    save_vae(model, path, metadata={"source": "unifusion train-demo"})
    vae = load_vae(path)
    metrics = evaluate_vae(vae, max(8, recipe.eval_count * 4))
    logger.info("vae metrics: %s", json.dumps(metrics))
    return vae, metrics


def _vae_images(recipe: DemoRecipe) -> torch.Tensor:
    """The autoencoder's training scenes (a quarter of them count scenes), seeded by the recipe."""
    return scene_pixels(mixed_scenes(recipe.vae_images, recipe.seed))


def stage_decoder(recipe: DemoRecipe, path: Path, source: Path, threads: Optional[int] = None
                  ) -> tuple[Any, dict[str, float]]:
    """Finetune the decoder of the ``vae`` stage's autoencoder at ``source`` with every Block (that
    stage trained a lighter one), one cycle after another, and save it at ``path``. The encoder is
    frozen, so the cached latents and the DiT trained on them stay valid: this runs beside the DiT
    stages. It starts from ``source``, never from ``path``, so a changed decoder recipe trains
    from the same autoencoder instead of on top of the decoder it replaces."""
    from ..vae import load_vae, save_vae
    from .evaluate import evaluate_vae

    if threads:
        torch.set_num_threads(threads)
    model, images = load_vae(source), _vae_images(recipe)
    for cycle in range(len(recipe.decoder_steps)):
        model = decoder_cycle(recipe, model, cycle, images)
    save_vae(model, path, metadata={"source": "unifusion train-demo"})
    vae = load_vae(path)
    metrics = evaluate_vae(vae, max(8, recipe.eval_count * 4))
    logger.info("decoder metrics: %s", json.dumps(metrics))
    return vae, metrics


def decoder_cycle(recipe: DemoRecipe, model: Any, cycle: int, images: torch.Tensor) -> Any:
    """Cycle ``cycle`` of the decoder finetune: ``recipe.decoder_steps[cycle]`` steps whose warmup
    and cosine schedule restart from ``model``'s weights, on draws seeded by the cycle from ``images``
    (`_vae_images`, rendered once for every cycle)."""
    from ..vae import finetune_decoder

    logger.info("decoder cycle %d of %d: %d steps", cycle + 1, len(recipe.decoder_steps), recipe.decoder_steps[cycle])
    return finetune_decoder(model, images, recipe.decoder_steps[cycle], seed=recipe.seed + 1 + cycle,
                            batch_size=recipe.vae_batch_size, lr=recipe.decoder_lr, crop=recipe.vae_crop,
                            foreground_weight=recipe.vae_foreground_weight, edge_weight=recipe.vae_edge_weight,
                            bf16=recipe.decoder_bf16)


def demo_records(recipe: DemoRecipe) -> list[Any]:
    """Text-to-image and single-reference edit samples of the training split, as dataset records."""
    from ..train.datasets import edit_from_samples, t2i_from_samples

    t2i = sample_t2i(recipe.t2i_samples, recipe.seed, split="train")
    edits = sample_edits(recipe.edit_samples, recipe.seed + 1, split="train")
    true = recipe.verifi_true_rewrites  # each sample's true scene, worded as the VLM rewrites, as its Verifi answer
    named = recipe.vlm.named_order
    return (t2i_from_samples([(render(s.scene), s.caption) + (((s.rewrite if named else s.detailed),) if true else ())
                              for s in t2i],
                             name="demo_t2i")
            + edit_from_samples([([render(e.source)], e.instruction, render(e.target)) + ((e.detailed,) if true else ())
                                 for e in edits], name="demo_edit"))


def stage_cache(recipe: DemoRecipe, vlm: Any, vae: Any, folder: Path) -> Any:
    """The feature cache of `demo_records`, capturing ``recipe.vlm_layers`` (the checkpoint pools those)."""
    from ..train.cache_build import build_cache

    if recipe.vlm_layers is not None:
        vlm = replace(vlm, selected_layers=tuple(recipe.vlm_layers))
    with torch.no_grad():
        return build_cache(demo_records(recipe), vlm, vae, folder, resolution=64, verifi=True,
                           verifi_max_new_tokens=recipe.verifi_max_new_tokens, recon=True, recon_tiles=1,
                           batch_size=recipe.cache_batch_size, seed=recipe.seed, overwrite=True,
                           verifi_batch=verifi_rewrite_batch,
                           progress=lambda done, total: logger.info("cache shard %d/%d", done, total))


def _step_logger(label: str, every: int) -> Any:
    def log(info: Any) -> None:
        if info.step % every == 0 or info.step == 1:
            logger.info("%s step %d loss %.4f lr %.2e", label, info.step, info.loss, info.lr)
    return log


def _recipe_config(recipe: DemoRecipe, stage: str, steps: Optional[int] = None, cycle: int = 0,
                   **overrides: Any) -> Any:
    """The trainer options of a stage; ``steps`` replaces the stage's step count (ablations). For the
    edit stage they are those of edit cycle ``cycle`` (its steps, batch size, peak lr and edit_repeat)."""
    from ..train.recipe import TrainConfig

    steps = steps or (recipe.t2i_steps if stage == "t2i" else recipe.edit_steps[cycle])
    options: dict[str, Any] = dict(
        steps=steps, batch_size=recipe.batch_size if stage == "t2i" else recipe.edit_batch_size[cycle],
        lr=recipe.t2i_lr if stage == "t2i" else recipe.edit_lr[cycle],
        condition_lr_scale=recipe.condition_lr_scale if stage == "t2i" else 1.0,
        warmup_steps=min(recipe.warmup_steps, max(1, steps // 10)), schedule="cosine", ema_decay=recipe.ema_decay,
        seed=recipe.seed, cond_dropout=recipe.cond_dropout,
        recon_prob=recipe.recon_prob if stage == "t2i" else recipe.edit_recon_prob,
        verifi_prob=recipe.verifi_prob, logit_mean=recipe.timestep_logit_mean,
        loss_whitening=recipe.loss_whitening,
        stage="mixed" if stage == "edit" and recipe.edit_mix_t2i else stage,
        edit_repeat=recipe.edit_repeat[cycle] if stage == "edit" else 1,
        mixed_precision=recipe.dit_mixed_precision, save_every=max(steps, 1), keep_last=1,
        log_every=max(1, min(50, steps)))
    return TrainConfig(**{**options, **overrides})


def stage_t2i(recipe: DemoRecipe, cache: Any, work: Path, name: str = "t2i", pooling: str = "attention",
              steps: Optional[int] = None, callbacks: Sequence[Any] = (), **overrides: Any) -> Path:
    """Text-to-image training into ``work/<name>.safetensors``; the ablations use ``pooling``
    (LAP or a baseline), ``steps`` and trainer ``overrides`` (e.g. ``verifi_prob=0``). ``callbacks``
    get the trainer's `StepInfo` after every step."""
    from ..train.export import export_release
    from ..train.run import model_config_for_cache, train

    config = model_config_for_cache(cache, dit_config(recipe), lap_heads=recipe.lap_heads,
                                    refiner_blocks=recipe.refiner_blocks, extra={"demo": "unifusion train-demo"})
    config = replace(config, lap=replace(config.lap, pooling=pooling))
    result = train(cache.folder, work / name, config, _recipe_config(recipe, "t2i", steps, **overrides), resume=None,
                   callbacks=[_step_logger(name, 100), *callbacks], progress=False)
    return export_release(result.state_dir, work / f"{name}.safetensors")


def stage_edit(recipe: DemoRecipe, cache: Any, work: Path, init: Path, out: Path) -> Path:
    """The edit finetune from the text-to-image checkpoint ``init``, one cycle after another
    (`edit_cycle`, training state in ``work/edit<n>``); the last writes the release checkpoint
    ``out``, the others ``work/edit<n>.safetensors``. With ``recipe.edit_image_injection`` and
    ``recipe.edit_extra_blocks`` the first cycle starts from a copy of ``init`` that has the (zero)
    injection or the (identity) blocks added."""
    cycles = len(recipe.edit_steps)
    if recipe.edit_image_injection:
        from ..train.export import with_image_injection

        init = with_image_injection(init, work / "t2i_injection.safetensors")
    if recipe.edit_extra_blocks:
        from ..train.export import with_extra_blocks

        init = with_extra_blocks(init, work / "t2i_deeper.safetensors", recipe.edit_extra_blocks, seed=recipe.seed)
    for cycle in range(cycles):
        init = edit_cycle(recipe, cache, work, cycle, init,
                          out if cycle == cycles - 1 else work / f"{_edit_name(cycle)}.safetensors")
    return out


def _edit_name(cycle: int) -> str:
    """The work-folder name of edit cycle ``cycle``'s training state and export: edit1, edit2, ..."""
    return f"edit{cycle + 1}"


def edit_cycle(recipe: DemoRecipe, cache: Any, work: Path, cycle: int, init: Path, out: Path) -> Path:
    """Cycle ``cycle`` of the edit finetune: ``recipe.edit_steps[cycle]`` steps of
    ``recipe.edit_batch_size[cycle]`` samples with ``recipe.edit_repeat[cycle]``, whose warmup and
    cosine schedule (peak ``recipe.edit_lr[cycle]``) restart from the release checkpoint ``init``
    (the previous cycle's, or text-to-image's), exported to ``out``. Every cycle draws with the
    recipe's seed (the shipped second cycle did), so two cycles with the same edit_repeat and batch
    size see their batches in the same order."""
    from ..train.export import export_release
    from ..train.run import train

    logger.info("edit cycle %d of %d: %d steps", cycle + 1, len(recipe.edit_steps), recipe.edit_steps[cycle])
    config = _recipe_config(recipe, "edit", cycle=cycle, init_from=str(init))
    result = train(cache.folder, work / _edit_name(cycle), None, config,
                   resume=None, callbacks=[_step_logger("edit", 100)], progress=False)
    return export_release(result.state_dir, out)


ABLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "lap": {}, "last_layer": {"pooling": "last"}, "mean_of_layers": {"pooling": "mean"},
    "no_verifi": {"verifi_prob": 0.0}}


def stage_ablations(recipe: DemoRecipe, work: Path, names: Sequence[str]) -> None:
    """The benchmark's ablation variants ``names`` (of `ABLATION_VARIANTS`), each text-to-image at
    ``recipe.ablation_steps`` from the cache in ``work/cache``: LAP, the two pooling baselines, and
    LAP without Verifi features."""
    from ..train.cache import FeatureCache
    from .bench import ABLATIONS

    assert set(ABLATION_VARIANTS) == set(ABLATIONS)
    cache = FeatureCache(work / "cache")
    for name in names:
        started = time.monotonic()
        stage_t2i(recipe, cache, work / "ablations", name=name, steps=recipe.ablation_steps, **ABLATION_VARIANTS[name])
        logger.info("ablation %s: trained in %.1fs", name, time.monotonic() - started)


WORKER_STAGES = {"vae": stage_vae, "decoder": stage_decoder}


def worker_job(stage: str, recipe: DemoRecipe, path: Path, threads: int, *args: Any,
               ) -> tuple[dict[str, float], dict[str, float]]:
    """A `WORKER_STAGES` stage in a worker process (spawned: logging is set up again there);
    returns its metrics and its wall/CPU seconds."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    wall, cpu = time.monotonic(), time.process_time()
    metrics = WORKER_STAGES[stage](recipe, path, *args, threads=threads)[1]
    return metrics, {"wall_s": round(time.monotonic() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}


def stage_eval(count: int, out: Path, grid: Optional[Path] = None, work: Optional[Path] = None) -> dict[str, Any]:
    """The demo benchmark (`bench.run_benchmark`) over ``count`` prompts per text-to-image row,
    on the files in ``out`` (and the ablations in ``work``); ``grid`` also saves the README grid
    of real outputs there."""
    from ..pipeline import UniFusionPipeline
    from .bench import format_table, run_benchmark
    from .evaluate import default_grid

    metrics = run_benchmark(out, count, work) if count else {}
    if metrics:
        logger.info("benchmark:\n%s", format_table(metrics))
    if grid is not None:
        pipe = UniFusionPipeline.from_files(out / DEMO_VLM, out / DEMO_CHECKPOINT, out / DEMO_VAE_PATH)
        grid.parent.mkdir(parents=True, exist_ok=True)
        default_grid(pipe).save(grid)
        logger.info("saved the output grid to %s", grid)
    return metrics
