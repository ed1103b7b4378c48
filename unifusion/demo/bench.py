"""`unifusion bench`: the demo benchmark, one table re-checking the paper's claims at demo scale.

Every figure is read back by the scorer from images made by `UniFusionPipeline` (VLM encode or
Verifi rewrite, LAP, Euler sampling with CFG, VAE decode), on the same held-out prompts and
seeds every run (`grammar` test split, seed = prompt index):

- text-to-image attribute accuracy (colour, shape, size, position, count) of the shipped model,
  with plain prompts and with the Verifi rewrite, and on colour/shape pairs never trained on;
- single-reference edits (exact target, identity of the untouched shapes), conditioned on the
  instruction and image directly and through the VLM's Verifi rewrite of them;
- zero-shot two-reference composition, with the references, through a Verifi rewrite, and without them;
- ablations at equal training budget, when ``train-demo --ablations`` trained them: LAP against
  the deepest selected layer alone and against a mean of the selected layers, Verifi features
  in training against none, and text-to-image before against after the editing finetune;
- reconstruction of a target image from its VLM tiles, against the number of tiles.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ..bundled import ASSETS_DIR, DEMO_CHECKPOINT, DEMO_VAE_PATH, DEMO_VLM
from .evaluate import evaluate_compositions, evaluate_edits, evaluate_t2i
from .options import add_bench_arguments
from .scorer import read_scene
from .world import SPLIT_SEEDS, random_scene, render

logger = logging.getLogger(__name__)

# Ablation checkpoints `train-demo --ablations` writes into <work>/ablations/, and their labels.
ABLATIONS = {
    "lap": "LAP (attention over the selected layers)",
    "last_layer": "deepest selected layer only",
    "mean_of_layers": "mean of the selected layers",
    "no_verifi": "LAP, trained without Verifi features",
}
BEFORE_EDIT = "t2i.safetensors"  # in the work folder: the text-to-image model the edit stage starts from
T2I_ATTRIBUTES = ("colour", "kind", "size", "position", "count")
RECON_TILES = (1, 4, 9)  # square grids: 1x1, 2x2 and 3x3 tiles (plus the thumbnail when more than one)


def _pipe(vlm: Path, checkpoint: Path, vae: Path) -> Any:
    from ..pipeline import UniFusionPipeline

    return UniFusionPipeline.from_files(vlm, checkpoint, vae)


def evaluate_reconstruction(pipe: Any, count: int, tiles: int, seed: int = SPLIT_SEEDS["test"] + 7,
                            steps: int = 20) -> dict[str, float]:
    """Generate from the VLM's view of a target image alone (no text), the way reconstruction
    batches are conditioned in training (there: one tile); exact scenes and PSNR to the target.
    ``tiles`` is a square number: the target is enlarged to that many tile sizes (nearest
    neighbour, no new detail), so the VLM's tiler cuts it into a sqrt(tiles) grid of tiles."""
    side = math.isqrt(tiles)
    if side * side != tiles:
        raise ValueError(f"tiles must be a square number (1, 4, 9, ...), got {tiles}")
    rng = random.Random(seed)
    exact, psnr = [], []
    for i in range(count):
        scene = random_scene(rng)
        target = render(scene)
        view = target.resize((target.width * side, target.height * side), Image.Resampling.NEAREST)
        images, _ = pipe.generate("", images=[view], max_tiles=tiles, steps=steps, seed=i)
        out = np.asarray(images[0], dtype=np.float32) / 255.0
        mse = float(((out - np.asarray(target, dtype=np.float32) / 255.0) ** 2).mean())
        exact.append(float(read_scene(out) == scene))
        psnr.append(10 * np.log10(1.0 / max(mse, 1e-10)))
    return {"exact": float(np.mean(exact)), "psnr": float(np.mean(psnr))}


PARTS = ("model", "ablations")


def run_benchmark(assets: Path = ASSETS_DIR, count: int = 48, work: Optional[Path] = None,
                  steps: int = 20, parts: Sequence[str] = PARTS) -> dict[str, dict[str, float]]:
    """Every row of the table: ``{row name: {metric: value}}``. ``work`` is a `train-demo --work`
    folder; its ablation checkpoints and the pre-finetune model add the ablation rows. ``parts``
    picks the shipped model's rows, the ablation rows or both (to run them in two processes)."""
    vlm, vae = assets / DEMO_VLM, assets / DEMO_VAE_PATH
    rows: dict[str, dict[str, float]] = {}
    if "model" in parts:
        rows.update(_model_rows(_pipe(vlm, assets / DEMO_CHECKPOINT, vae), count, steps))
    if "ablations" in parts and work is not None:
        rows.update(_ablation_rows(vlm, vae, work, count, steps))
    return {name: {k: round(float(v), 4) for k, v in row.items()} for name, row in rows.items()}


def _model_rows(pipe: Any, count: int, steps: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    rows["t2i"] = evaluate_t2i(pipe, count, verifi=False, steps=steps)
    rows["t2i, Verifi rewrite"] = evaluate_t2i(pipe, count, verifi=True, steps=steps)
    rows["t2i, held-out colour/shape pairs"] = evaluate_t2i(pipe, max(1, count // 2), verifi=False, split="heldout",
                                                           steps=steps)
    rows["edit, one reference"] = evaluate_edits(pipe, count, steps=steps)
    rows["edit, one reference, Verifi rewrite"] = evaluate_edits(pipe, count, steps=steps, verifi=True)
    rows["compose, two references (zero-shot)"] = evaluate_compositions(pipe, max(1, count // 2), steps=steps)
    rows["compose, two references, Verifi rewrite"] = evaluate_compositions(pipe, max(1, count // 2), steps=steps,
                                                                            verifi=True)
    rows["compose, references removed"] = evaluate_compositions(pipe, max(1, count // 2), steps=steps,
                                                                drop_references=True)
    for tiles in RECON_TILES:
        rows[f"reconstruction, {tiles} tile{'s + thumbnail' if tiles > 1 else ''}"] = evaluate_reconstruction(
            pipe, max(1, count // 2), tiles, steps=steps)
    return rows


def _ablation_rows(vlm: Path, vae: Path, work: Path, count: int, steps: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    if (work / BEFORE_EDIT).is_file():
        rows["t2i before the edit finetune"] = evaluate_t2i(_pipe(vlm, work / BEFORE_EDIT, vae), count,
                                                            verifi=False, steps=steps)
    for name, label in ABLATIONS.items():
        path = work / "ablations" / f"{name}.safetensors"
        if path.is_file():
            variant = _pipe(vlm, path, vae)
            rows[f"ablation: {label}"] = evaluate_t2i(variant, count, verifi=False, steps=steps)
            if name in ("lap", "no_verifi"):
                rows[f"ablation: {label}, Verifi rewrite"] = evaluate_t2i(variant, count, verifi=True, steps=steps)
    return rows


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """One markdown table: text-to-image rows by attribute, the others by their own metrics."""
    lines = ["| run | colour | shape | size | position | count | exact | other |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        cells = [f"{row[a]:.0%}" if a in row else "" for a in T2I_ATTRIBUTES]
        exact = f"{row['exact']:.0%}" if "exact" in row else ""
        other = ", ".join(f"{k} {v:.2f}" if k == "psnr" else f"{k} {v:.0%}" for k, v in row.items()
                          if k not in T2I_ATTRIBUTES and k != "exact")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {exact} | {other} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="unifusion bench", description=__doc__.splitlines()[0])
    add_bench_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.merge:
        rows: dict[str, dict[str, float]] = {}
        for path in args.merge:
            rows.update(json.loads(path.read_text(encoding="utf-8")))
        sys.stdout.write(format_table(rows) + "\n")
        return 0
    if args.count < 1:
        raise SystemExit("--count must be >= 1")
    rows = run_benchmark(args.assets, args.count, args.work, args.steps, args.parts)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    sys.stdout.write(format_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
