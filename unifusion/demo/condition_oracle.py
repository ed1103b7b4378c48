"""Which condition the demo DiT learns from fast: learned conditions in place of the VLM.

It trains the recipe's DiT (width, depth, learning rate, timestep sampling) on the demo autoencoder's
latents of the text-to-image training scenes. The condition is learned embeddings, not VLM states,
and the benchmark's scorer reads held-out samples back:

- ``shapes``: one token per shape, the sum of its colour, kind, size and cell embeddings, so
  the attributes come already bound to their shape;
- ``caption``: one token per word of the user's caption, which plain prompts give. Many
  captions leave cells, sizes or the order open;
- ``detailed``: one token per word of the scene's detailed description, which a faithful Verifi
  rewrite gives.

Side by side at 800 steps, 96 held-out scenes (docs/demo_experiments.md, "The DiT learns shape"):
shapes 100/77/100/100/99% (colour, shape, size, position, count), caption 62/24/65/69/52%, detailed
99/68/99/99/99%. The DiT and the latents learn shape when the condition is a full, canonical
description, and hardly at all from the captions.

    python -m unifusion.demo.condition_oracle [--conditions shapes caption detailed] [--steps 800]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..dit import UniFusionDiT
from ..flow import euler_sample, flow_matching_loss, resolution_shift, sample_training_timesteps, sampling_schedule
from .evaluate import scene_pixels
from .grammar import VOCAB, T2ISample, sample_t2i, words
from .recipe import DemoRecipe, dit_config
from .scorer import ATTRIBUTES, mean_scores, score_scene, score_table
from .world import COLOURS, GRID, KINDS, MAX_SHAPES, SIZES, SPLIT_SEEDS

CONDITIONS = ("shapes", "caption", "detailed")
_WORD_IDS = {w: i + 1 for i, w in enumerate(VOCAB)}  # 0 pads
_ATTRIBUTE_OFFSETS = (0, len(COLOURS), len(COLOURS) + len(KINDS), len(COLOURS) + len(KINDS) + len(SIZES))
_SHAPE_VOCAB = _ATTRIBUTE_OFFSETS[-1] + GRID * GRID


def shape_tokens(samples: Sequence[T2ISample]) -> tuple[Tensor, Tensor]:
    """(B, MAX_SHAPES, 4) ids of each shape's colour, kind, size and cell, and the (B, MAX_SHAPES) mask."""
    ids = torch.zeros(len(samples), MAX_SHAPES, 4, dtype=torch.long)
    mask = torch.zeros(len(samples), MAX_SHAPES, dtype=torch.bool)
    for b, sample in enumerate(samples):
        for j, s in enumerate(sample.scene):
            values = (COLOURS.index(s.colour), KINDS.index(s.kind), SIZES.index(s.size), s.row * GRID + s.col)
            ids[b, j] = torch.tensor([o + v for o, v in zip(_ATTRIBUTE_OFFSETS, values)])
            mask[b, j] = True
    return ids, mask


def word_tokens(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(B, L) word ids of each text (0 pads) and the (B, L) mask."""
    rows = [[_WORD_IDS[w] for w in words(text)] for text in texts]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
    return ids, ids > 0


class LearnedCondition(nn.Module):
    """Condition tokens at DiT width from learned embeddings of shapes or words."""

    def __init__(self, kind: str, width: int) -> None:
        super().__init__()
        if kind not in CONDITIONS:
            raise ValueError(f"unknown condition {kind!r}; choose from {list(CONDITIONS)}")
        self.kind = kind
        self.embed = nn.Embedding(_SHAPE_VOCAB if kind == "shapes" else len(VOCAB) + 1, width)
        nn.init.normal_(self.embed.weight, std=1.0)

    def forward(self, samples: Sequence[T2ISample]) -> tuple[Tensor, Tensor]:
        if self.kind == "shapes":
            ids, mask = shape_tokens(samples)
            return self.embed(ids).sum(dim=2), mask  # (B, MAX_SHAPES, D)
        ids, mask = word_tokens([s.caption if self.kind == "caption" else s.detailed for s in samples])
        return self.embed(ids), mask  # (B, L, D)


def scored_attributes(kind: str, sample: T2ISample) -> tuple[str, ...]:
    """A caption is scored on what it mentions (as the benchmark does); the others name everything."""
    return sample.mentions if kind == "caption" else ATTRIBUTES + ("count",)


def train_and_score(kind: str, vae: Any, recipe: DemoRecipe = DemoRecipe(), steps: int = 800, samples: int = 6000,
                    count: int = 96, seed: int = 0) -> dict[str, float]:
    """Train the recipe's DiT with a `LearnedCondition` for ``steps`` and score ``count`` held-out samples
    (20 Euler steps, no guidance); adds ``loss_first``, ``loss_last`` (mean of the first and last tenth
    of the steps) and ``seconds``."""
    if steps < 1 or samples < 1 or count < 1:
        raise ValueError(f"steps, samples and count must be >= 1, got {steps}, {samples}, {count}")
    started = time.monotonic()
    torch.manual_seed(seed)
    train = sample_t2i(samples, recipe.seed, split="train")
    with torch.no_grad():
        latents = torch.cat([vae.encode(scene_pixels([s.scene for s in train[i:i + 256]]))
                             for i in range(0, len(train), 256)])  # (N, C, h, w)
    cfg = replace(dit_config(recipe), in_channels=latents.shape[1])
    dit, condition = UniFusionDiT(cfg), LearnedCondition(kind, cfg.hidden_size)
    params = list(dit.parameters()) + list(condition.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.t2i_lr, weight_decay=0.0)
    shift = resolution_shift(latents.shape[-2] * latents.shape[-1])
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.t2i_lr * min(1.0, (step + 1) / max(1, recipe.warmup_steps))
        index = torch.randint(0, len(train), (recipe.batch_size,), generator=gen)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_training_timesteps(x0.shape[0], gen, shift=shift, mean=recipe.timestep_logit_mean)
        tokens, mask = condition([train[i] for i in index.tolist()])
        loss = flow_matching_loss(dit, x0, noise, t, context=tokens, context_mask=mask)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    tenth = max(1, steps // 10)
    test = sample_t2i(count, SPLIT_SEEDS["test"], "all")
    dit.eval()
    with torch.no_grad():
        tokens, mask = condition(test)
        noise = torch.randn((count,) + tuple(latents.shape[1:]), generator=torch.Generator().manual_seed(seed + 2))
        x = euler_sample(dit, noise, sampling_schedule(20, shift), context=tokens, context_mask=mask)
        images = vae.decode(x)
    scores = mean_scores(score_scene(s.scene, image, scored_attributes(kind, s)) for s, image in zip(test, images))
    return {**scores, "loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth,
            "seconds": time.monotonic() - started}


def format_rows(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per condition."""
    return score_table("condition", rows, {
        "loss (first / last tenth)": lambda row: f"{row['loss_first']:.3f} / {row['loss_last']:.3f}",
        "seconds": lambda row: f"{row['seconds']:.0f}"})


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..bundled import ASSETS_DIR, DEMO_VAE_PATH
    from ..vae import load_vae

    parser = argparse.ArgumentParser(prog="python -m unifusion.demo.condition_oracle",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--steps", type=int, default=800, help="training steps per condition")
    parser.add_argument("--samples", type=int, default=6000, help="training scenes (the recipe's t2i samples)")
    parser.add_argument("--count", type=int, default=96, help="held-out scenes scored per condition")
    parser.add_argument("--vae", type=Path, default=ASSETS_DIR / DEMO_VAE_PATH,
                        help="autoencoder (default: the demo's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 beside another job)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # a missing or damaged autoencoder file and bad counts are ValueErrors
        vae = load_vae(args.vae)
        rows = {kind: train_and_score(kind, vae, steps=args.steps, samples=args.samples, count=args.count)
                for kind in args.conditions}
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(format_rows(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
