"""Where edits through Verifi are lost: in the VLM's rewrite of the edit, or in the DiT's drawing of it.

For the benchmark's held-out single-reference edits, on the same seeds, three conditions: plain (the
instruction and the reference, as `evaluate_edits` and `unifusion bench` run them), Verifi (the VLM
writes the target's description; the DiT gets its generated tokens' states), and Verifi with the
true target's description forced as the VLM's answer (`forced_rewrite`: the states the VLM gives
those tokens had it written them). The last is what the Verifi path draws once the VLM rewrites
every edit right. On the files shipped 2026-12-05 (96 test edits): plain 55%, Verifi 35%, the true
rewrite forced 97% (identity 99%), so the DiT draws what a right rewrite names and the VLM's rewrites
(right for 1 in 3 edits) bound that path (see docs/demo_experiments.md, "What bounds the edits
through Verifi").

    python -m unifusion.demo.edit_probe [--checkpoint FILE] [--count 48]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..pipeline import Condition
from ..vlm.verifi import forced_rewrite
from .grammar import sample_edits
from .scorer import edit_success, identity_preserved
from .vlm_training import parse_rewrite
from .world import SPLIT_SEEDS, render

PATHS = ("plain", "verifi", "verifi_true")
MAX_SOURCE_SHAPES = 3


def edit_path_scores(pipe: Any, count: int = 48, seed: int = SPLIT_SEEDS["test"], steps: int = 20,
                     cfg_scale: float = 4.0) -> dict[str, dict[str, float]]:
    """``{path: scores}`` over ``count`` held-out edits (the benchmark's first ``count``): ``success``
    (exact target), ``identity`` (untouched shapes kept), ``rewrite`` (the share of rewrites that name
    the target scene), and ``shapes_<n>``: success over the edits whose source holds n shapes."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rows: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
    for i, sample in enumerate(sample_edits(count, seed + 1)):
        reference = render(sample.source)
        for path in PATHS:
            condition = _condition(pipe, path, sample, reference, i)
            image = pipe.sample(condition, reference.width, reference.height, steps=steps, cfg_scale=cfg_scale,
                                seed=i)[0]
            rows[path].append({"success": float(edit_success(sample.target, image)),
                               "identity": identity_preserved(sample.source, sample.target, image),
                               "rewrite": names_target(condition.rewritten, sample.target),
                               "shapes": len(sample.source.shapes)})
    return {path: _summary(path_rows) for path, path_rows in rows.items()}


def _condition(pipe: Any, path: str, sample: Any, reference: Any, index: int) -> Condition:
    if path != "verifi_true":
        return pipe.encode(sample.instruction, [reference], verifi=path == "verifi", seed=index)
    with torch.no_grad():
        features = forced_rewrite(pipe.vlm, sample.instruction, sample.detailed, [reference]).features
    return pipe.condition(features, sample.detailed)


def names_target(rewrite: Optional[str], target: Any) -> float:
    """1.0 when a rewrite (as the VLM decodes it, or as the grammar writes it) names the target scene;
    NaN without a rewrite (the plain path)."""
    return float("nan") if rewrite is None else float(parse_rewrite(rewrite) == target)


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    summary = {key: float(np.mean([row[key] for row in rows])) for key in ("success", "identity", "rewrite")}
    for shapes in range(1, MAX_SOURCE_SHAPES + 1):
        picked = [row["success"] for row in rows if row["shapes"] == shapes]
        summary[f"shapes_{shapes}"] = float(np.mean(picked)) if picked else float("nan")
    return summary


def format_scores(scores: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per condition, percentages ('-' where a figure does not apply)."""
    columns = ["success", "identity", "rewrite"] + [f"shapes_{n}" for n in range(1, MAX_SOURCE_SHAPES + 1)]
    headers = ["condition", "exact", "identity", "rewrite names the target"] + [
        f"exact, {n}-shape source" for n in range(1, MAX_SOURCE_SHAPES + 1)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for path, row in scores.items():
        cells = ["-" if np.isnan(row[c]) else f"{100 * row[c]:.0f}%" for c in columns]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=48, help="held-out edits (the benchmark's first COUNT)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .probe_cli import run_probe

    return run_probe("python -m unifusion.demo.edit_probe", __doc__.splitlines()[0], _add_arguments,
                     lambda pipe, args: format_scores(edit_path_scores(pipe, args.count)), argv)


if __name__ == "__main__":
    sys.exit(main())
