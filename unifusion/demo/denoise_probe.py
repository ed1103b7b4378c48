"""What the demo DiT draws in one step from each noise level: the scene read back from its x0 guess.

For held-out captions, the true scene's latent is noised to x_t = (1 - t) x0 + t * noise, the DiT
predicts the velocity once, and its guess x0 = x_t - t * v is decoded and scored like a sample.
At low t the noisy latent still shows the scene; at high t only the condition can tell the DiT
what to draw, so the scores there say how much the DiT reads from its condition, free of the
sampler. On the shipped model of 2026-12-01 colour falls from 100% at t = 0.2 to 55% at t = 0.95, and shape from
76% (the autoencoder's own ceiling is 83%) to 31%, about a guess among four (see docs/demo_experiments.md, the shape
paragraph).

    python -m unifusion.demo.denoise_probe [--verifi] [--checkpoint FILE] [--count 48]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import torch

from ..flow import add_noise
from .evaluate import scene_pixels
from .grammar import sample_t2i
from .scorer import mean_scores, score_scene, score_table
from .world import SPLIT_SEEDS

TIMES = (0.2, 0.4, 0.6, 0.8, 0.95)


def one_step_scores(pipe: Any, count: int = 48, times: Sequence[float] = TIMES, verifi: bool = False,
                    seed: int = SPLIT_SEEDS["test"]) -> dict[float, dict[str, float]]:
    """``{t: mean scores}`` of the one-step x0 guesses for ``count`` held-out captions (the
    benchmark's prompts), one seeded noise draw per caption and level."""
    if count < 1 or not times or not all(0.0 < t <= 1.0 for t in times):
        raise ValueError(f"count must be >= 1 and every noise level in (0, 1], got count={count}, times={list(times)}")
    samples = sample_t2i(count, seed, "all")
    with torch.no_grad():
        x0 = pipe.vae.encode(scene_pixels([s.scene for s in samples]))  # (N, C, h, w)
    rows: dict[float, list[dict[str, float]]] = {t: [] for t in times}
    for i, sample in enumerate(samples):
        condition = pipe.encode(sample.caption, verifi=verifi, seed=i)
        noise = torch.randn(x0[i:i + 1].shape, generator=torch.Generator().manual_seed(i))
        for t in times:
            xt = add_noise(x0[i:i + 1], noise, t)
            with torch.no_grad():
                v = pipe.model(xt, torch.tensor([t]), condition.tokens, condition.mask)
                image = pipe.vae.decode((xt - t * v).float())[0]
            rows[t].append(score_scene(sample.scene, image, sample.mentions))
    return {t: mean_scores(r) for t, r in rows.items()}


def format_scores(scores: dict[float, dict[str, float]]) -> str:
    """A markdown table: one row per noise level, one column per attribute."""
    return score_table("t", {f"{t:g}": row for t, row in scores.items()})


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=48, help="held-out captions (the benchmark's first COUNT)")
    parser.add_argument("--verifi", action="store_true", help="condition through the Verifi rewrite of each caption")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .probe_cli import run_probe

    return run_probe("python -m unifusion.demo.denoise_probe", __doc__.splitlines()[0], _add_arguments,
                     lambda pipe, args: format_scores(one_step_scores(pipe, args.count, verifi=args.verifi)), argv)


if __name__ == "__main__":
    sys.exit(main())
