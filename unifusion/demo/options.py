"""Command-line options of `unifusion train-demo`, kept free of torch so that building the
`unifusion` parser stays fast; `unifusion.demo.train_demo.run` executes them."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bundled import ASSETS_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The train-demo options (also mounted by the `unifusion` CLI)."""
    p.add_argument("--out", type=Path, default=ASSETS_DIR, help="where the demo files go (default: the bundled assets)")
    p.add_argument("--work", type=Path, help="keep the feature cache and training states here (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a minutes-long smoke run with tiny sizes (nothing is learned)")
    p.add_argument("--threads", type=int, help="torch CPU threads (fix it for bit-identical re-runs; 1 on a busy machine)")
    p.add_argument("--no-eval", action="store_true", help="skip the benchmark at the end")
    p.add_argument("--jobs", type=int, default=2, choices=[1, 2],
                   help="2: train the autoencoder and its decoder in a second process beside the VLM, the cache "
                        "and t2i's first steps; 1: one after the other")
    p.add_argument("--grid", type=Path, help="also save a grid of real outputs (PNG) here, e.g. docs/demo_grid.png")
    p.add_argument("--eval-only", action="store_true",
                   help="train nothing: score the files already in --out (and draw --grid)")
    p.add_argument("--stop-after", choices=["vlm", "vae", "cache", "t2i"],
                   help="stop after this stage (with --work, a later run continues from there)")
    p.add_argument("--redo", action="store_true",
                   help="redo every stage even when --work holds finished ones with the same settings")
    p.add_argument("--ablations", action="store_true",
                   help="also train the benchmark's ablation variants (LAP vs last layer vs mean, Verifi off) "
                        "into WORK/ablations, at --ablation-steps each, after the model files; needs --work to keep them")
    for name, kind in (("ablation-steps", int), ("vlm-steps", int), ("vae-steps", int), ("t2i-steps", int),
                       ("t2i-samples", int), ("edit-samples", int), ("eval-count", int)):
        p.add_argument(f"--{name}", type=kind, help="override the recipe's value")
    p.add_argument("--edit-steps", type=int, nargs="+",
                   help="override the edit finetune's step counts, one per cycle (the recipe has two)")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `unifusion bench` (`unifusion.demo.bench.run` executes them)."""
    p.add_argument("--assets", type=Path, default=ASSETS_DIR, help="folder with the demo VLM, checkpoint and VAE")
    p.add_argument("--work", type=Path, help="a `train-demo --work` folder: adds the ablation rows")
    p.add_argument("--count", type=int, default=48, help="prompts per text-to-image row (others use half)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--parts", nargs="+", choices=["model", "ablations"], default=["model", "ablations"],
                   help="the shipped model's rows, the ablation rows (with --work), or both")
    p.add_argument("--merge", type=Path, nargs="+", help="print one table from earlier --json files; scores nothing")
