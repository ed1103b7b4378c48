"""Training steps of the demo's DiT + LAP through the real trainer, eager against ``TrainConfig.compile``.

`torch.compile` makes each step faster but costs minutes before the first one (tracing, then
inductor writing and building C++ kernels; a second compile in the same process or with a warm
on-disk cache costs less). Whether it pays depends on how many steps follow. Both trainers run the
demo recipe's options for the stage (`unifusion.demo.stages`) on the same feature cache, with the
demo's model shape; their timed steps alternate one by one so that background load hits both alike.
Printed: the median wall seconds of a step of each, their ratio (goal: compiled / eager <= 0.85 on
CPU), the compile overhead (the compiled trainer's first steps less as many steady ones), the steps
after which compiling has paid for itself, and that over each of the demo recipe's stages of this kind.

The cache is a train-demo work folder's (``--cache WORK/cache``, the real features), or, with
``--samples N``, one built here from N demo-world samples through a random VLM of the demo's
shape and a random autoencoder (the condition lengths of real prompts, not their values).

    python benchmarks/train_compile.py [--cache WORK/cache | --samples 64] [--stage t2i|edit] [--steps 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import log_lines, logger, median, setup, table, verdict  # noqa: E402

GOAL = 0.85


def demo_shaped_cache(folder: Path, samples: int) -> Path:
    """A feature cache of ``samples`` demo-world samples (3 in 4 text-to-image, the rest single-reference
    edits) through a random VLM of the demo's depth and width and a random 16-channel autoencoder; its
    Verifi rewrites are the random VLM's, up to the recipe's token limit."""
    import torch

    from unifusion.demo.grammar import sample_edits, sample_t2i
    from unifusion.demo.recipe import DemoRecipe
    from unifusion.demo.world import render
    from unifusion.train.cache_build import build_cache
    from unifusion.train.datasets import edit_from_samples, t2i_from_samples
    from unifusion.vae import TinyAutoencoder
    from unifusion.vlm.loader import load_vlm
    from unifusion.vlm.tiny import build_tiny_vlm

    recipe = DemoRecipe()
    vlm_folder = build_tiny_vlm(folder / "vlm", "internvl", seed=0, num_layers=recipe.vlm.num_layers,
                                hidden_size=recipe.vlm.hidden_size, image_size=recipe.vlm.tile_size)
    vlm = replace(load_vlm(vlm_folder), selected_layers=tuple(recipe.vlm_layers))
    torch.manual_seed(0)
    vae = TinyAutoencoder(latent_channels=recipe.vae_latent_channels, width=8).eval()
    edits = max(1, samples // 4)
    records = (t2i_from_samples([(render(s.scene), s.caption) for s in sample_t2i(samples - edits, seed=0)],
                                name="t2i")
               + edit_from_samples([([render(e.source)], e.instruction, render(e.target))
                                    for e in sample_edits(edits, seed=1)], name="edit"))
    with torch.no_grad():
        build_cache(records, vlm, vae, folder / "cache", resolution=64, verifi=True,
                    verifi_max_new_tokens=recipe.verifi_max_new_tokens, recon=True, recon_tiles=1, batch_size=16)
    return folder / "cache"


def trainers(cache_dir: Path, stage: str, out: Path) -> dict[str, Any]:
    """An eager and a compiled trainer with the demo recipe's options for ``stage`` (edit: its longest cycle)."""
    from unifusion.demo.recipe import DemoRecipe, dit_config
    from unifusion.demo.stages import _recipe_config
    from unifusion.train.cache import FeatureCache
    from unifusion.train.run import model_config_for_cache
    from unifusion.train.trainer import Trainer

    recipe = DemoRecipe()
    cache = FeatureCache(cache_dir, preload=True)
    model_config = model_config_for_cache(cache, dit_config(recipe), lap_heads=recipe.lap_heads,
                                          refiner_blocks=recipe.refiner_blocks)
    cycle = max(range(len(recipe.edit_steps)), key=lambda c: recipe.edit_steps[c])
    config = _recipe_config(recipe, stage, cycle=cycle)
    if stage == "edit" and not cache.indices(("edit",)):
        raise SystemExit(f"{cache_dir} holds no edit samples; use --stage t2i")
    return {name: Trainer(model_config, cache, replace(config, compile=compiled), out / name, progress=False)
            for name, compiled in (("eager", False), ("compiled", True))}


def wall(trainer: Any) -> float:
    start = time.perf_counter()
    trainer._optimizer_step()
    return time.perf_counter() - start


def measure(cache_dir: Path, stage: str, steps: int, warmup: int) -> dict[str, float]:
    """Wall seconds: the compiled trainer's first ``warmup`` steps, then ``steps`` of each, alternating."""
    with tempfile.TemporaryDirectory() as out:
        runs = trainers(cache_dir, stage, Path(out))
        first = sum(wall(runs["compiled"]) for _ in range(warmup))
        for _ in range(warmup):
            wall(runs["eager"])
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(steps):
            for name in times:
                times[name].append(wall(runs[name]))
    eager, compiled = median(times["eager"]), median(times["compiled"])
    return {"eager": eager, "compiled": compiled, "overhead": first - warmup * compiled}


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--cache", type=Path, help="a feature cache (a train-demo work folder's WORK/cache)")
    source.add_argument("--samples", type=int, default=64, help="build a demo-shaped cache of this many samples")
    parser.add_argument("--stage", default="t2i", choices=["t2i", "edit"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each trainer")
    parser.add_argument("--warmup", type=int, default=10, help="the compiled trainer's first steps (compiling)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    setup(args.threads)
    from unifusion.demo.recipe import DemoRecipe

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or demo_shaped_cache(Path(tmp), args.samples)
        seconds = measure(cache, args.stage, args.steps, args.warmup)
    ratio = seconds["compiled"] / seconds["eager"]
    saved = seconds["eager"] - seconds["compiled"]
    logger.info("Demo DiT + LAP, %s stage options, wall seconds, %d thread(s), median of %d alternating steps; "
                "cache: %s", args.stage, args.threads, args.steps, args.cache or f"{args.samples} demo-shaped samples")
    log_lines(table(("trainer", "s / step", "/ eager", f"goal <= {GOAL}"),
                    [("eager", seconds["eager"], 1.0, ""), ("compiled", seconds["compiled"], ratio,
                                                            verdict(ratio, GOAL))]))
    logger.info("compile overhead (first %d steps less as many steady ones): %.1f s", args.warmup,
                seconds["overhead"])
    if saved > 0:
        recipe = DemoRecipe()
        stages = [recipe.t2i_steps] if args.stage == "t2i" else list(recipe.edit_steps)
        logger.info("compiling pays after %.0f steps; over the demo's %s stage(s) of %s steps it saves %s s "
                    "(one compile each; later compiles in a process cost less)", seconds["overhead"] / saved,
                    args.stage, " / ".join(map(str, stages)),
                    " / ".join(f"{n * saved - seconds['overhead']:.0f}" for n in stages))
    else:
        logger.info("compiled steps are no faster here: compiling never pays")
    return {**seconds, "ratio": ratio}


if __name__ == "__main__":
    main()
