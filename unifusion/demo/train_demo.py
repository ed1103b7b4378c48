"""`unifusion train-demo`: train the bundled demo model end to end with the real pipeline.

Stages (`stages`), each logged with its wall and CPU time:

1. ``vlm``   tiny InternVL (-hf) trained to caption and Verifi-rewrite (`vlm_training`);
2. ``vae``   TAESD-layout autoencoder on rendered scenes (`unifusion.vae.train_vae`), in a
   second process beside the VLM by default;
3. ``cache`` feature cache of text-to-image and single-reference edit samples: plain and
   Verifi features (training system prompt), reconstruction features, VAE latents
   (`unifusion.train.build_cache`);
4. ``t2i``   DiT + LAP text to image with condition dropout, ~3% reconstruction batches and
   Verifi features (`unifusion.train.train`), exported with its EMA weights; with ``--jobs 2``
   its first ``t2i_steps_beside_worker`` steps run on one share of the threads beside the
   worker, the rest on every thread;
5. ``edit``  finetune on the single-reference edits, mixed with the text-to-image samples
   (``edit_mix_t2i``), in cycles that each restart the schedule; the last is exported as the
   release checkpoint (``extra["sampling_shift"]`` set by the exporter);
6. ``decoder`` the autoencoder's decoder finetuned in cycles (bf16 autocast) from the ``vae``
   stage's file (encoder frozen), in the worker right after the vae stage, beside the VLM, the
   cache and t2i's first steps;
7. ``ablations`` (``--ablations``) the benchmark's text-to-image variants at an equal budget,
   from the cache alone, after the model files;
8. ``eval``  the demo benchmark through `UniFusionPipeline` (optional).

``--out`` receives the three shipped files (VLM folder, checkpoint, autoencoder) and
``train_demo_report.json`` (recipe, library versions, metrics, timings). Everything is seeded:
with the same ``--threads`` and ``--jobs``, library versions and CPU a re-run writes the same tensors (file
bytes may differ only in the order of safetensors metadata, so digests are taken over the
content). With a kept ``--work``
folder, stages whose settings and inputs did not change are reused.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ..bundled import DEMO_CHECKPOINT, DEMO_VAE_PATH, DEMO_VLM
from .options import add_arguments
from .recipe import DemoRecipe, quick_recipe
from .stages import (ABLATION_VARIANTS, LOG_FORMAT, WORKER_STAGES, stage_ablations, stage_cache, stage_edit,
                     stage_eval, stage_t2i, stage_vlm, worker_job)

logger = logging.getLogger("unifusion.demo.train")

REPORT_NAME = "train_demo_report.json"
EVAL_NAME = "eval_report.json"


class StageTimer:
    """Wall and CPU seconds per stage, logged as each ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        logger.info("stage %s: start", name)
        wall, cpu = time.monotonic(), time.process_time()
        yield
        self.seconds[name] = {"wall_s": round(time.monotonic() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        logger.info("stage %s: done in %.1fs (cpu %.1fs)", name, self.seconds[name]["wall_s"],
                    self.seconds[name]["cpu_s"])


# --- stages -----------------------------------------------------------------------------


def content_digest(path: Path) -> str:
    """sha256 of a file's content; for safetensors the sorted metadata and every tensor, since
    the library writes its metadata map in an order that changes from process to process."""
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name)
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digests(out: Path) -> dict[str, str]:
    """Content digests of every shipped model file (the report is left out: it holds timings)."""
    files = [out / DEMO_CHECKPOINT, out / DEMO_VAE_PATH] + sorted((out / DEMO_VLM).glob("*"))
    return {str(p.relative_to(out)): content_digest(p) for p in files if p.is_file()}


# What a re-run must match to write the same tensors: seeds fix the data and the initial weights,
# but the float kernels that train them come from these packages and the CPU's vector unit. (The
# same code, seed and thread count on another machine, a week apart, trained the demo VLM and the
# autoencoder to other weights; 20 VLM steps on one machine match across transformers 5.23 and 5.24.)
REPRODUCIBILITY_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "safetensors", "numpy", "pillow")


def library_versions() -> dict[str, str]:
    """Python's and each `REPRODUCIBILITY_PACKAGES` version ("not installed" where absent), and the
    vector instruction set torch's CPU kernels use."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    versions = {name: installed(name) for name in REPRODUCIBILITY_PACKAGES}
    versions["torch"] = torch.__version__  # with its build (+cpu, +cu130), which the distribution's version drops
    return {"python": sys.version.split()[0], **versions, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


STAGE_PARAMS = {
    "vlm": ("seed", "vlm", "vlm_eval_count"),
    "vae": ("seed", "vae_images", "vae_steps", "vae_batch_size", "vae_crop", "vae_lr", "vae_latent_channels",
            "vae_foreground_weight", "vae_edge_weight", "vae_light", "vae_latent_noise"),
    "cache": ("seed", "t2i_samples", "edit_samples", "verifi_max_new_tokens", "verifi_true_rewrites",
              "cache_batch_size", "vlm_layers"),
    "t2i": ("seed", "dit_width", "dit_depth", "dit_heads", "time_embed_dim", "lap_heads", "refiner_blocks",
            "dit_rope_theta", "dit_absolute_position", "dit_predict_x0", "dit_image_positions", "batch_size",
            "t2i_steps", "t2i_lr",
            "condition_lr_scale", "timestep_logit_mean", "warmup_steps", "ema_decay", "cond_dropout", "recon_prob",
            "verifi_prob", "loss_whitening", "dit_mixed_precision", "t2i_steps_beside_worker"),
    "edit": ("edit_steps", "edit_lr", "edit_mix_t2i", "edit_recon_prob", "edit_repeat", "edit_batch_size",
             "timestep_logit_mean", "edit_image_injection", "edit_extra_blocks"),
    "decoder": ("decoder_steps", "decoder_lr", "decoder_bf16"),
    "ablation": ("ablation_steps",),
}
UPSTREAM = {"vlm": (), "vae": (), "cache": ("vlm", "vae"), "t2i": ("cache",), "edit": ("t2i",), "decoder": ("vae",),
            "ablation": ("t2i",)}
MARKERS = "stages.json"
VAE_STAGE = "vae.safetensors"  # in the work folder: the vae stage's autoencoder, which the decoder stage starts from


def stage_fingerprints(recipe: DemoRecipe) -> dict[str, str]:
    """A hash per stage of its own settings and its upstream stages' hashes: a stage is
    redone exactly when something that feeds it changed."""
    raw = recipe.to_dict()
    out: dict[str, str] = {}
    for stage in ("vlm", "vae", "cache", "t2i", "edit", "decoder", "ablation"):
        # --threads is left out: a stage finished with other thread counts is reused as it is.
        payload = {"params": {k: raw[k] for k in STAGE_PARAMS[stage]}, "upstream": [out[u] for u in UPSTREAM[stage]]}
        out[stage] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return out


class StageLog:
    """``work/stages.json``: which stages finished with which fingerprint, and their metrics."""

    def __init__(self, work: Path, fingerprints: dict[str, str], reuse: bool) -> None:
        self.path, self.fingerprints, self.reuse = work / MARKERS, fingerprints, reuse
        self.done: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}

    def finished(self, stage: str, *outputs: Path) -> bool:
        entry = self.done.get(stage, {})
        ok = (self.reuse and entry.get("fingerprint") == self._fingerprint(stage)
              and all(p.exists() for p in outputs))
        if ok:
            logger.info("stage %s: reusing the finished result (fingerprint %s)", stage, self._fingerprint(stage))
        return ok

    def metrics(self, stage: str) -> dict[str, float]:
        return dict(self.done.get(stage, {}).get("metrics", {}))

    def _fingerprint(self, stage: str) -> str:
        """``ablation:<variant>`` entries share the ablation stage's fingerprint."""
        return self.fingerprints[stage.split(":")[0]]

    def mark(self, stage: str, metrics: Optional[dict[str, float]] = None) -> None:
        self.done[stage] = {"fingerprint": self._fingerprint(stage), "metrics": metrics or {}}
        self.path.write_text(json.dumps(self.done, indent=1), encoding="utf-8")


def _worker_pool(stack: contextlib.ExitStack) -> ProcessPoolExecutor:
    """One spawned worker process: stages submitted to it run one after the other."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return stack.enter_context(_stopped_on_error(pool))


@contextlib.contextmanager
def _stopped_on_error(pool: ProcessPoolExecutor) -> Iterator[ProcessPoolExecutor]:
    """``pool``, shut down when done; when this process fails, its worker is stopped at once instead
    of waited for, since the decoder queued behind the vae would otherwise hold an error in the VLM
    stage back for an hour. Nothing half-made is reused: only this process marks a worker's stage
    finished, after joining it. Ctrl-C reaches the worker itself, so it is left to end its stage."""
    try:
        yield pool
    except Exception:
        terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
        if terminate is not None:
            terminate()
        else:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _start_worker(pool: ProcessPoolExecutor, stage: str, recipe: DemoRecipe, path: Path, threads: int,
                  *args: Any) -> Any:
    """Run a `WORKER_STAGES` stage in ``pool``'s process while this one goes on; the two share
    the threads (one each on 2 cores), so neither slows the other down by oversubscription."""
    future = pool.submit(worker_job, stage, recipe, path, max(1, threads // 2), *args)
    logger.info("stage %s: queued in a worker process", stage)
    return future


def _main_threads(threads: int, jobs: int) -> int:
    """This process's threads for a stage that a worker may run beside (vlm, cache): its share
    whether the worker runs or its stage is reused, since kernels write other tensors on other
    thread counts (bf16 t2i weights after 6 steps differ between 1 and 2 threads)."""
    return max(1, threads - threads // 2) if jobs > 1 else threads


def _finish_worker_stage(future: Any, stage: str, recipe: DemoRecipe, path: Path, log: "StageLog",
                         timer: StageTimer, threads: int, *args: Any) -> None:
    """Wait for the worker running ``stage``, record it and give this process all the threads
    again; without a worker (``--jobs 1``, or nothing to redo) run the stage here (on ``path``
    and ``args``, as the worker would) unless finished."""
    torch.set_num_threads(threads)
    if future is None:
        with timer.stage(stage):
            if not log.finished(stage, path):
                log.mark(stage, WORKER_STAGES[stage](recipe, path, *args)[1])
        return
    log.mark(stage, _join_worker(future, stage, timer))


def _join_worker(future: Any, stage: str, timer: StageTimer) -> dict[str, float]:
    """Wait for a worker's stage, record its wall/CPU seconds and return its metrics."""
    metrics, timer.seconds[stage] = future.result()
    logger.info("stage %s: done in the worker in %.1fs (cpu %.1fs)", stage, timer.seconds[stage]["wall_s"],
                timer.seconds[stage]["cpu_s"])
    return metrics


def _run_stages(out: Path, recipe: DemoRecipe, work: Path, log: StageLog, timer: StageTimer,
                stack: contextlib.ExitStack, jobs: int, stop_after: Optional[str], ablations: bool = False) -> bool:
    """The training stages in order; False when stopped early after ``stop_after``."""
    from ..train.cache import FeatureCache
    from ..vae import load_vae
    from ..vlm.loader import load_vlm

    threads = torch.get_num_threads()
    torch.set_num_threads(_main_threads(threads, jobs))
    pool = _worker_pool(stack) if jobs > 1 else None
    vae_future = decoder_future = None
    vae_stage = work / VAE_STAGE
    if pool is not None and stop_after != "vlm" and not log.finished("vae", vae_stage):
        vae_future = _start_worker(pool, "vae", recipe, vae_stage, threads)
    if pool is not None and stop_after in (None, "t2i") and not log.finished("decoder", out / DEMO_VAE_PATH):
        # The decoder needs only the vae stage's file (the encoder, which makes the cached latents, stays
        # frozen). Queued behind the vae it trains while the VLM, the cache and t2i's first steps run here
        # (in bf16 it ends about when t2i reaches `t2i_steps_beside_worker`, which then waits for it).
        decoder_future = _start_worker(pool, "decoder", recipe, out / DEMO_VAE_PATH, threads, vae_stage)
    with timer.stage("vlm"):
        if log.finished("vlm", out / DEMO_VLM / "config.json"):
            vlm = load_vlm(out / DEMO_VLM)
        else:
            vlm, metrics = stage_vlm(recipe, out / DEMO_VLM)
            log.mark("vlm", metrics)
    if stop_after == "vlm":
        return False
    _finish_worker_stage(vae_future, "vae", recipe, vae_stage, log, timer, threads)
    vae = load_vae(vae_stage)
    if stop_after == "vae":
        return False
    # The cache runs beside the decoder's worker: this process's share of the threads (two processes on more
    # threads than cores slow each other many times over), whether the decoder runs or was reused.
    torch.set_num_threads(_main_threads(threads, jobs))
    with timer.stage("cache"):
        if log.finished("cache", work / "cache" / "index.json"):
            cache = FeatureCache(work / "cache")
        else:
            cache = stage_cache(recipe, vlm, vae, work / "cache")
            log.mark("cache")
    if stop_after == "cache":
        return False
    # t2i's first `t2i_steps_beside_worker` steps run on this share beside the decoder's worker; then it waits for
    # the decoder and takes every thread for the rest and for the stages after it. Before, the worker's core idled
    # for the last 20 minutes of t2i (the 2026-12-05 build: the decoder in float32 from minute 12 to 63, t2i on
    # one thread from 27 to 83). The switch comes at that step whether the decoder runs or was reused.
    joined: list[bool] = []

    def join_decoder() -> None:
        if not joined:
            joined.append(True)
            _finish_worker_stage(decoder_future, "decoder", recipe, out / DEMO_VAE_PATH, log, timer, threads,
                                 vae_stage)

    if pool is None or recipe.t2i_steps_beside_worker == 0:
        join_decoder()
    with timer.stage("t2i"):
        t2i = work / "t2i.safetensors"
        if not log.finished("t2i", t2i):
            stage_t2i(recipe, cache, work, callbacks=[
                lambda info: join_decoder() if info.step == recipe.t2i_steps_beside_worker else None])
            log.mark("t2i")
    join_decoder()
    if stop_after == "t2i":
        return False
    with timer.stage("edit"):
        if not log.finished("edit", out / DEMO_CHECKPOINT):
            stage_edit(recipe, cache, work, t2i, out / DEMO_CHECKPOINT)
            log.mark("edit")
    # Last, after the model files: they need only the cache, but beside t2i they would take a core from it.
    ablations_todo = [name for name in ABLATION_VARIANTS
                      if ablations and not log.finished(f"ablation:{name}", work / "ablations" / f"{name}.safetensors")]
    if ablations_todo:
        with timer.stage("ablations"):
            stage_ablations(recipe, work, ablations_todo)
        _mark_ablations(log, ablations_todo)
    return True


def _mark_ablations(log: StageLog, names: Sequence[str]) -> None:
    for name in names:
        log.mark(f"ablation:{name}")


def train_demo(out: Path, recipe: DemoRecipe, work: Optional[Path] = None, evaluate: bool = True,
               reuse: bool = True, jobs: int = 2, grid: Optional[Path] = None,
               stop_after: Optional[str] = None, ablations: bool = False) -> dict[str, Any]:
    """Run every stage into ``out``; returns (and writes) the report. With a kept ``work``
    folder and ``reuse``, stages whose settings and inputs did not change are skipped, so a
    run stopped early (``stop_after`` a stage) continues where it stopped. ``jobs=2`` trains
    the autoencoder in a second process beside the VLM."""
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    threads = torch.get_num_threads()
    report: dict[str, Any] = {"recipe": recipe.to_dict(), "threads": threads, "jobs": jobs,
                              "libraries": library_versions(), "metrics": {}}
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unifusion-train-demo-")))
        work.mkdir(parents=True, exist_ok=True)
        log = StageLog(work, stage_fingerprints(recipe), reuse)
        started = time.monotonic()
        try:
            finished = _run_stages(out, recipe, work, log, timer, stack, jobs, stop_after, ablations)
        finally:
            torch.set_num_threads(threads)  # a stage that stopped early may hold the main process's share
        report["train_wall_s"] = round(time.monotonic() - started, 1)
        report["metrics"].update({stage: log.metrics(stage) for stage in ("vlm", "vae", "decoder")})
        if finished and ((evaluate and recipe.eval_count) or grid is not None):
            with timer.stage("eval"):
                report["metrics"]["benchmark"] = stage_eval(recipe.eval_count if evaluate else 0, out, grid, work)
    report["stages"] = timer.seconds
    report["files"] = file_digests(out)
    report["sizes_bytes"] = {name: p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob("*"))
                             for name, p in ((n, out / n) for n in (DEMO_VLM, DEMO_CHECKPOINT, DEMO_VAE_PATH))
                             if p.exists()}
    (out / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    logger.info("train-demo finished in %.1fs of training; files in %s", report["train_wall_s"], out)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unifusion train-demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def recipe_from_args(args: argparse.Namespace) -> DemoRecipe:
    recipe = quick_recipe(args.seed) if args.quick else DemoRecipe(seed=args.seed)
    overrides = {name: getattr(args, name) for name in ("vae_steps", "t2i_steps", "edit_steps", "t2i_samples",
                                                        "edit_samples", "eval_count", "ablation_steps")
                 if getattr(args, name) is not None}
    if "edit_steps" in overrides:
        overrides["edit_steps"] = tuple(overrides["edit_steps"])
    try:
        recipe = replace(recipe, **overrides)
    except ValueError as exc:
        raise SystemExit(f"unifusion train-demo: {exc}") from None
    if args.vlm_steps is not None:
        recipe = replace(recipe, vlm=replace(recipe.vlm, steps=args.vlm_steps))
    return recipe


def run(args: argparse.Namespace) -> int:
    """Entry for a parsed namespace (the `unifusion` CLI calls this)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if logging.getLogger("unifusion").getEffectiveLevel() > logging.INFO:
        logging.getLogger("unifusion").setLevel(logging.INFO)  # stage progress is the point of this command
    recipe = recipe_from_args(args)
    if args.eval_only:
        metrics = stage_eval(recipe.eval_count, args.out, args.grid, args.work)
        if metrics:  # `--eval-count 0 --grid` only draws: nothing to report next to the model files
            (args.out / EVAL_NAME).write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        return 0
    train_demo(args.out, recipe, work=args.work, evaluate=not args.no_eval, reuse=not args.redo, jobs=args.jobs,
               grid=args.grid, stop_after=args.stop_after, ablations=args.ablations)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
