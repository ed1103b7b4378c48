"""One training step of the demo-sized DiT + LAP in float32 against bf16 autocast.

The demo's DiT stages train with ``mixed_precision="bf16"`` (`DemoRecipe.dit_mixed_precision`).
Under CPU autocast every Linear runs in bfloat16, which on CPUs with AVX512-BF16 (or AMX) is
several times faster than float32. PyTorch's CPU attention kernels are the exception: their
bfloat16 forward and backward are slower than float32, so `unifusion.attention.sdpa_attention`
runs attention in float32 on CPU. Rows, all on the same model, batch and draws:

- ``float32``: no autocast (the baseline);
- ``bf16 autocast``: the trainer's setting, attention in float32 (ours);
- ``bf16 autocast, bf16 attention``: the same with torch's own SDPA under autocast;
- ``bf16 autocast, FLUX matrix RoPE``: ours with RoPE written as FLUX writes it (a broadcast product of
  (dim/2, 2, 2) rotation matrices), which gives the same bits as ours (`unifusion.attention._apply_rope1`);
- ``bf16 autocast, torch.compile`` (with ``--compile``): ours with the forward (LAP, refiner, DiT) through
  ``torch.compile`` (inductor, static shapes), the backward through AOTAutograd. Its kernels fuse the small
  elementwise ops that dominate a 192-wide model on CPU, but they are other kernels: the trained tensors
  differ from eager ones, so a recipe that used it would ship other files. Compiling takes a minute or two
  (the warm-up call), which is not counted.

Each figure is the median CPU seconds of ``--repeats`` steps (forward, backward, AdamW) after a
warm-up, the methods interleaved. Goal: bf16 autocast / float32 <= 0.75 where the CPU has
bfloat16 support (``torch.backends.mkldnn`` reports it); elsewhere the row is informative. The
FLUX RoPE and torch.compile rows have no goal; their ratios to ours are printed below the table.

    python benchmarks/train_precision.py [--batch 32] [--cond 24] [--repeats 5] [--compile]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import interleaved, log_lines, median, setup, table, verdict  # noqa: E402
import unifusion.attention as attention  # noqa: E402
from unifusion.attention import sdpa_attention  # noqa: E402
from unifusion.config import VLMIdentity, make_config  # noqa: E402
from unifusion.demo.recipe import DemoRecipe, dit_config  # noqa: E402
from unifusion.model import UniFusionModel  # noqa: E402

logger = logging.getLogger("benchmarks.train_precision")
ARCH = "InternVLForConditionalGeneration"


def torch_attention(q, k, v, heads, mask=None, skip_reshape=False):
    """torch's SDPA as autocast runs it (bfloat16 under CPU autocast), ComfyUI's calling convention."""
    b, _, n, dim = q.shape
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, heads * dim)


def flux_matrix_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE as ``comfy/ldm/flux/math.py`` writes it: the rotation matrices times the channel pairs."""
    x_ = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)  # (B, H, N, dim/2, 1, 2)
    return (freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)


def with_rope(rope: Callable, step: Callable[[], float]) -> Callable[[], float]:
    """``step`` with ``rope`` as the attention module's pair rotation for its duration."""
    def run() -> float:
        ours, attention._apply_rope1 = attention._apply_rope1, rope
        try:
            return step()
        finally:
            attention._apply_rope1 = ours

    return run


def training_step(model: UniFusionModel, batch: int, cond: int, bf16: bool,
                  compile: bool = False) -> Callable[[], float]:
    """A closure running one flow-matching step (forward, backward, AdamW) on seeded random inputs;
    ``compile`` runs the forward through ``torch.compile``."""
    lap, c = model.cfg.lap, model.cfg.dit.in_channels
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(batch, cond, lap.num_vlm_layers, lap.vlm_hidden_size, generator=gen)
    mask = torch.ones(batch, cond, dtype=torch.bool)
    latents, noise = torch.randn(batch, c, 8, 8, generator=gen), torch.randn(batch, c, 8, 8, generator=gen)
    t = torch.rand(batch, generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward(noisy: torch.Tensor) -> torch.Tensor:
        return model(noisy, t, model.encode_condition(features, mask), mask)

    run = torch.compile(forward, dynamic=False) if compile else forward

    def step() -> float:
        noisy = (1 - t)[:, None, None, None] * latents + t[:, None, None, None] * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            velocity = run(noisy)
        loss = (velocity.float() - (noise - latents)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def demo_model(attention: Optional[Callable] = None) -> UniFusionModel:
    """The shipped demo's DiT + LAP shape (12-layer, 64-wide VLM; layers 0, 4, 7, 10), seeded."""
    recipe = DemoRecipe()
    config = make_config(VLMIdentity(ARCH, recipe.vlm.num_layers, recipe.vlm.hidden_size, tuple(recipe.vlm_layers)),
                         dit_config(recipe), lap_heads=recipe.lap_heads, refiner_blocks=recipe.refiner_blocks)
    torch.manual_seed(0)
    return UniFusionModel(config, attention=attention).train()


def measure(batch: int, cond: int, repeats: int, compile: bool = False) -> dict[str, float]:
    """Median seconds per training step of each method."""
    steps = {"float32": training_step(demo_model(sdpa_attention), batch, cond, bf16=False),
             "bf16 autocast": training_step(demo_model(sdpa_attention), batch, cond, bf16=True),
             "bf16 autocast, bf16 attention": training_step(demo_model(torch_attention), batch, cond, bf16=True),
             "bf16 autocast, FLUX matrix RoPE": with_rope(flux_matrix_rope, training_step(
                 demo_model(sdpa_attention), batch, cond, bf16=True))}
    if compile:
        steps["bf16 autocast, torch.compile"] = training_step(demo_model(sdpa_attention), batch, cond, bf16=True,
                                                              compile=True)
    times = interleaved(steps, repeats)
    return {name: median(values) for name, values in times.items()}


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cond", type=int, default=24, help="condition tokens per sample")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (compiles for minutes)")
    args = parser.parse_args(argv)
    setup(args.threads)
    seconds = measure(args.batch, args.cond, args.repeats, args.compile)
    base = seconds["float32"]
    supported = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    logger.info("Demo DiT + LAP training step, batch %d, %d condition tokens, CPU seconds of this process, "
                "%d thread(s), median of %d; CPU bfloat16 support: %s", args.batch, args.cond,
                torch.get_num_threads(), args.repeats, supported)
    rows = [(name, s, s / base, verdict(s / base, 0.75) if name == "bf16 autocast" and supported else "")
            for name, s in seconds.items()]
    log_lines(table(("method", "s / step", "/ float32", "goal <= 0.75"), rows))
    for name, label in (("bf16 autocast, FLUX matrix RoPE", "FLUX matrix RoPE"),
                        ("bf16 autocast, torch.compile", "torch.compile")):
        if name in seconds:
            logger.info("%s / ours (bf16 autocast): %.2f", label, seconds[name] / seconds["bf16 autocast"])
    return seconds


if __name__ == "__main__":
    main()
