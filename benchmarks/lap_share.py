"""LAP + refiner time as a share of a whole 30-step sampling run.

LAP and the refiner run once per prompt; the DiT runs once per step (cond and uncond batched, as
ComfyUI and the pipeline do with CFG). A run here is LAP + refiner on the condition features, then
`flow.euler_sample` over the DiT for ``--steps`` steps with CFG against the all-zero condition (the
VAE decode is left out: it is the same for every conditioning method). Share = LAP / run.

Measured on two configs, both with random weights:

- ``demo-like``: the bundled demo's sizes (12-layer 64-wide VLM, 3 pooled layers; DiT 192 wide,
  depth 4, 8x8 latent, ~20 condition tokens);
- ``scaled``: the paper's proportions scaled down (VLM width = DiT width = 256, 10 pooled layers,
  2 LAP + 2 refiner blocks, DiT depth 16, 256 latent tokens and as many condition tokens, i.e. the
  paper's three-reference case where condition and image are equally long).

It also prints the share the FLOP count predicts for the paper-size model at 1024x1024 with 0..3
references (DiT depth 32; LAP's share shrinks with DiT depth, so the scaled run over-states it).
Goal: share < 2 %.

Run: ``python benchmarks/lap_share.py [--steps 30] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import interleaved, log_lines, median, randomize_, setup, table, verdict  # noqa: E402
from unifusion.config import (DiTConfig, LAPConfig, UniFusionConfig, VLMIdentity,  # noqa: E402
                              default_layer_selection, make_config, paper_preset)
from unifusion.flow import euler_sample, sampling_schedule  # noqa: E402
from unifusion.model import UniFusionModel  # noqa: E402

logger = logging.getLogger("benchmarks.lap_share")
ARCH = "InternVLForConditionalGeneration"

CONFIGS = {
    # name: (config, latent (C, H, W), condition tokens)
    "demo-like": (make_config(VLMIdentity(ARCH, 12, 64, default_layer_selection(12)),
                              DiTConfig(in_channels=4, patch_size=1, hidden_size=192, depth=4, num_heads=6,
                                        time_embed_dim=128, rope_axes=(8, 12, 12)),
                              lap_heads=4, refiner_blocks=1), (4, 8, 8), 20),
    "scaled": (make_config(VLMIdentity(ARCH, 32, 256, default_layer_selection(32)),
                           DiTConfig(in_channels=16, patch_size=2, hidden_size=256, depth=16, num_heads=4,
                                     time_embed_dim=64, rope_axes=(16, 24, 24)),
                           lap_heads=4, refiner_blocks=2), (16, 32, 32), 256),
}


def block_flops(tokens: int, width: int, mlp_ratio: float, sequence: int) -> float:
    """Multiply-adds x 2 of one transformer block over ``tokens`` tokens in sequences of ``sequence``:
    QKV + projection + MLP, plus attention scores and weighted sum."""
    return 2 * tokens * (4 + 2 * mlp_ratio) * width**2 + 4 * tokens * sequence * width


def lap_flops(lap: LAPConfig, tokens: int) -> float:
    """LAP blocks over (tokens x L) rows in sequences of L, the (L*H -> H) FC, refiner blocks, projection."""
    h, l = lap.vlm_hidden_size, lap.num_vlm_layers
    pool = lap.num_blocks * block_flops(tokens * l, h, lap.mlp_ratio, l) + 2 * tokens * l * h * h
    refiner = lap.refiner_blocks * block_flops(tokens, h, lap.mlp_ratio, tokens) + 2 * tokens * h * lap.out_dim
    return pool + refiner


def run_flops(dit: DiTConfig, latent_tokens: int, cond_tokens: int, steps: int, batch: int = 2) -> float:
    """DiT blocks for every step, cond and uncond batched (embedders and final layer are negligible)."""
    tokens = latent_tokens + cond_tokens
    return steps * batch * dit.depth * block_flops(tokens, dit.hidden_size, dit.mlp_ratio, tokens)


def measure(name: str, cfg: UniFusionConfig, latent: tuple[int, int, int], cond: int, steps: int,
            repeats: int) -> tuple:
    torch.manual_seed(0)
    model = randomize_(UniFusionModel(cfg)).eval()
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(1, cond, cfg.lap.num_vlm_layers, cfg.lap.vlm_hidden_size, generator=gen)
    mask = torch.ones(1, cond, dtype=torch.bool)
    noise = torch.randn(1, *latent, generator=gen)
    schedule = sampling_schedule(steps, 3.0)
    tokens = model.encode_condition(features, mask).detach()

    def lap() -> torch.Tensor:
        return model.encode_condition(features, mask)

    def sampling() -> torch.Tensor:
        return euler_sample(lambda x, t, context, context_mask: model(x, t, context, context_mask), noise, schedule,
                            cfg_scale=4.0, uncond_kwargs={"context": torch.zeros_like(tokens), "context_mask": mask},
                            context=tokens, context_mask=mask)

    with torch.inference_mode():
        times = interleaved({"lap": lap, "sampling": sampling}, repeats)
    t_lap, t_run = median(times["lap"]), median(times["sampling"])
    share = t_lap / (t_lap + t_run)
    latent_tokens = latent[1] * latent[2] // cfg.dit.patch_size**2
    l_flops = lap_flops(cfg.lap, cond)
    predicted = l_flops / (l_flops + run_flops(cfg.dit, latent_tokens, cond, steps))
    return (name, f"{cfg.dit.hidden_size}/{cfg.dit.depth}", cfg.lap.num_vlm_layers, latent_tokens, cond, t_lap,
            t_run, f"{100 * share:.3f}%", f"{100 * predicted:.3f}%", verdict(share, 0.02))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    setup(args.threads)

    rows = [measure(name, *CONFIGS[name], args.steps, args.repeats) for name in args.configs]
    logger.info("LAP + refiner vs a %d-step sampling run with CFG (batch 2), CPU seconds of this process, "
                "%d threads, median of %d after warm-up", args.steps, torch.get_num_threads(), args.repeats)
    log_lines(table(("config", "DiT width/depth", "L", "latent tok", "cond tok", "LAP s", "sampling s",
                     "LAP share", "FLOP share", "goal < 2%"), rows, floatfmt="{:.4f}"))

    cfg = paper_preset()
    latent_tokens = 128 * 128 // cfg.dit.patch_size**2
    rows = []
    for refs in range(4):
        cond = 256 + refs * 5 * 256
        l_flops = lap_flops(cfg.lap, cond)
        d_flops = run_flops(cfg.dit, latent_tokens, cond, args.steps)
        share = l_flops / (l_flops + d_flops)
        rows.append((refs, cond, f"{l_flops / 1e12:.2f}", f"{d_flops / 1e12:.1f}", f"{100 * share:.3f}%",
                     verdict(share, 0.02)))
    logger.info("Paper size (DiT 4096 wide, depth 32; LAP 10 layers x 4096), 1024x1024, %d steps with CFG: FLOPs",
                args.steps)
    log_lines(table(("refs", "cond tok", "LAP TFLOP", "sampling TFLOP", "LAP share", "goal < 2%"), rows))


if __name__ == "__main__":
    main()
