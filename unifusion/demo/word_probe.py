"""Which prompt words the demo DiT reads: the flow loss gained from the right word, by noise level.

For one-shape scenes, the DiT's velocity loss under the scene's own caption is compared with the
loss after one word of it (colour, shape or size) is swapped for another value, at fixed noise
levels, with the same noise draws for both. A word the DiT ignores gains nothing at every level;
on 48 one-shape scenes the shipped model gains 0.67 per latent element from the colour word at
t = 0.9 and 0.15 from the shape word (0.09 at t = 0.1; see docs/demo_experiments.md, the 3,600-step VLM).
With ``verifi`` both captions go through the Verifi rewrite first, so the probe sees the features the
rewrite path conditions on.

    python -m unifusion.demo.word_probe [--verifi] [--checkpoint FILE] [--scenes 12] [--draws 16]
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from typing import Any, Optional, Sequence

import torch

from .grammar import shape_phrase
from .evaluate import scene_pixels
from .world import COLOURS, KINDS, SIZES, Scene, Shape

ATTRIBUTES = {"colour": COLOURS, "kind": KINDS, "size": SIZES}
TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def _latent(pipe: Any, scene: Scene) -> torch.Tensor:
    with torch.no_grad():
        return pipe.vae.encode(scene_pixels([scene]))  # (1, C, h, w)


def _loss(pipe: Any, condition: Any, x0: torch.Tensor, noise: torch.Tensor, t: float) -> float:
    """The flow loss of ``x0`` (1, C, h, w) at time ``t`` over the ``noise`` draws (N, C, h, w)."""
    from ..flow import flow_matching_loss

    n = noise.shape[0]
    with torch.no_grad():
        return float(flow_matching_loss(pipe.model, x0.expand(n, -1, -1, -1), noise, torch.full((n,), t),
                                        context=condition.tokens.expand(n, -1, -1),
                                        context_mask=condition.mask.expand(n, -1)))


def word_swap_gains(pipe: Any, scenes: int = 12, draws: int = 16, times: Sequence[float] = TIMES,
                    attributes: Sequence[str] = tuple(ATTRIBUTES), verifi: bool = False,
                    seed: int = 0) -> dict[str, dict[float, float]]:
    """Mean loss increase when each attribute's word is swapped, ``{attribute: {t: gain}}``, over
    ``scenes`` random one-shape scenes (canonical captions) and ``draws`` noise draws each."""
    unknown = sorted(set(attributes) - set(ATTRIBUTES))
    if unknown or scenes < 1 or draws < 1:
        raise ValueError(f"attributes must come from {list(ATTRIBUTES)} (got unknown {unknown}), and scenes and "
                         f"draws must be >= 1 (got {scenes}, {draws})")
    rng = random.Random(seed)
    gains = {a: {t: 0.0 for t in times} for a in attributes}
    for k in range(scenes):
        shape = Shape(rng.choice(COLOURS), rng.choice(KINDS), rng.choice(SIZES), rng.randrange(3), rng.randrange(3))
        x0 = _latent(pipe, Scene((shape,)))
        noise = torch.randn((draws,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(seed + k))
        true = pipe.encode(shape_phrase(shape), verifi=verifi, seed=k)
        swapped = {}
        for attribute in attributes:
            other = rng.choice([v for v in ATTRIBUTES[attribute] if v != getattr(shape, attribute)])
            changed = replace(shape, **{attribute: other})
            swapped[attribute] = pipe.encode(shape_phrase(changed), verifi=verifi, seed=k)
        for t in times:
            base = _loss(pipe, true, x0, noise, t)
            for attribute, condition in swapped.items():
                gains[attribute][t] += (_loss(pipe, condition, x0, noise, t) - base) / scenes
    return gains


def format_gains(gains: dict[str, dict[float, float]]) -> str:
    """A markdown table: one row per attribute, one column per noise level."""
    times = list(next(iter(gains.values())))
    lines = ["| word swapped | " + " | ".join(f"t = {t:g}" for t in times) + " |",
             "|---|" + "---|" * len(times)]
    for attribute, row in gains.items():
        lines.append(f"| {attribute} | " + " | ".join(f"{row[t]:.4f}" for t in times) + " |")
    return "\n".join(lines)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenes", type=int, default=12)
    parser.add_argument("--draws", type=int, default=16, help="noise draws per scene and noise level")
    parser.add_argument("--verifi", action="store_true", help="condition through the Verifi rewrite of each caption")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .probe_cli import run_probe

    return run_probe("python -m unifusion.demo.word_probe", __doc__.splitlines()[0], _add_arguments,
                     lambda pipe, args: format_gains(word_swap_gains(pipe, args.scenes, args.draws, verifi=args.verifi)),
                     argv)


if __name__ == "__main__":
    sys.exit(main())
