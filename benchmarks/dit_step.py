"""One DiT forward step: ours against an equally sized stack of ComfyUI's own single-stream blocks.

Both models are built the way ComfyUI builds a diffusion model: weights through ``comfy.ops``
(``pick_operations``, i.e. ``disable_weight_init`` when storage and compute dtypes agree), attention
through ComfyUI's ``optimized_attention`` (sub-quadratic on CPU, PyTorch SDPA on CUDA). The baseline
is a FLUX-style single-stream model made of ComfyUI's pieces (``comfy.ldm.flux.layers``: EmbedND
RoPE, MLPEmbedder timestep embedding, SingleStreamBlock x depth, LastLayer) with the same width,
heads, depth, MLP ratio, RoPE axes and token count as ours; both get the same latent, timestep and
condition tokens (batch 2 = cond + uncond). Both are given the same small random weights.

Rows: the whole forward, and the block stack alone (same precomputed inputs). Each figure is the
median of ``--repeats`` calls after a warm-up, the two models interleaved; CPU seconds of this
process with one thread on CPU, synchronised wall seconds on CUDA. Goal: ours / ComfyUI <= 1.1.

Run inside ComfyUI's interpreter:
``/path/to/ComfyUI/.venv/bin/python benchmarks/dit_step.py --comfyui /path/to/ComfyUI``
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import comfyui_dir, import_comfy, interleaved, log_lines, median, randomize_  # noqa: E402
from benchmarks.common import setup, table, verdict  # noqa: E402
from unifusion.attention import rope_frequencies  # noqa: E402
from unifusion.config import DiTConfig  # noqa: E402
from unifusion.dit import UniFusionDiT  # noqa: E402

logger = logging.getLogger("benchmarks.dit_step")

CONFIGS = {
    # name: (DiTConfig, latent side, condition tokens)
    "demo-like": (DiTConfig(in_channels=4, patch_size=1, hidden_size=192, depth=4, num_heads=6, time_embed_dim=128,
                            rope_axes=(8, 12, 12)), 8, 16),
    "scaled": (DiTConfig(in_channels=16, patch_size=2, hidden_size=1024, depth=2, num_heads=8, time_embed_dim=256,
                         rope_axes=(32, 48, 48)), 32, 64),
}


class SingleStreamStack(nn.Module):
    """FLUX-style single-stream model from ComfyUI's own layers, sized like a `DiTConfig`."""

    def __init__(self, cfg: DiTConfig, dtype=None, device=None, operations=None) -> None:
        super().__init__()
        from comfy.ldm.flux.layers import EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock

        d, p = cfg.hidden_size, cfg.patch_size
        self.cfg = cfg
        self.img_in = operations.Linear(cfg.in_channels * p * p, d, dtype=dtype, device=device)
        self.time_in = MLPEmbedder(256, d, dtype=dtype, device=device, operations=operations)
        self.pe_embedder = EmbedND(dim=cfg.head_dim, theta=int(cfg.rope_theta), axes_dim=list(cfg.rope_axes))
        self.blocks = nn.ModuleList(
            SingleStreamBlock(d, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, dtype=dtype, device=device,
                              operations=operations)
            for _ in range(cfg.depth))
        self.final_layer = LastLayer(d, p, cfg.in_channels, dtype=dtype, device=device, operations=operations)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        from comfy.ldm.flux.layers import timestep_embedding

        b, c, height, width = x.shape
        p = self.cfg.patch_size
        h, w = height // p, width // p
        tokens = x.view(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
        img = self.img_in(tokens)  # (B, N, D)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))  # (B, D)
        pe = self.pe_embedder(position_ids(b, context.shape[1], h, w, x.device))  # (B, 1, S+N, hd/2, 2, 2)
        seq = torch.cat([context, img], dim=1)  # (B, S+N, D)
        for block in self.blocks:
            seq = block(seq, vec=vec, pe=pe)
        out = self.final_layer(seq[:, context.shape[1]:], vec)  # (B, N, p*p*C)
        return out.view(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def position_ids(b: int, s: int, h: int, w: int, device: torch.device) -> Tensor:
    """Our layout of positions: condition token i -> (i, 0, 0), latent (row, col) -> (0, row, col)."""
    return UniFusionDiT._position_ids(b, s, h, w, None, device)  # (B, S+N, 3)


def block_inputs(cfg: DiTConfig, batch: int, side: int, cond: int, dtype: torch.dtype) -> dict[str, Any]:
    """What the blocks of both models see: the sequence, the timestep vector of each, RoPE tables."""
    gen = torch.Generator().manual_seed(1)
    h = side // cfg.patch_size
    ids = position_ids(batch, cond, h, h, torch.device("cpu"))
    return {
        "seq": torch.randn(batch, cond + h * h, cfg.hidden_size, generator=gen).to(dtype),
        "c": torch.randn(batch, cfg.time_embed_dim, generator=gen).to(dtype),
        "vec": torch.randn(batch, cfg.hidden_size, generator=gen).to(dtype),
        "freqs": rope_frequencies(ids, cfg.rope_axes, cfg.rope_theta),
    }


def run_config(name: str, cfg: DiTConfig, side: int, cond: int, dtype: torch.dtype, repeats: int,
               device: torch.device) -> list[tuple]:
    import comfy.ops
    from comfy.ldm.modules.attention import optimized_attention

    ops = comfy.ops.pick_operations(dtype, None, load_device=device)
    ours = randomize_(UniFusionDiT(cfg, dtype=dtype, device=device, operations=ops, attention=optimized_attention))
    theirs = randomize_(SingleStreamStack(cfg, dtype=dtype, device=device, operations=ops))
    ours, theirs = ours.eval().to(device), theirs.eval().to(device)
    gen = torch.Generator().manual_seed(0)
    batch = 2
    x = torch.randn(batch, cfg.in_channels, side, side, generator=gen).to(device, dtype)
    t = torch.rand(batch, generator=gen).to(device)
    context = torch.randn(batch, cond, cfg.hidden_size, generator=gen).to(device, dtype)
    inputs = {k: v.to(device) for k, v in block_inputs(cfg, batch, side, cond, dtype).items()}

    def our_blocks() -> Tensor:
        seq = inputs["seq"]
        for block in ours.blocks:
            seq = block(seq, inputs["c"], inputs["freqs"], None)
        return seq

    def their_blocks() -> Tensor:
        seq = inputs["seq"].clone()  # SingleStreamBlock adds into its input in place
        for block in theirs.blocks:
            seq = block(seq, vec=inputs["vec"], pe=inputs["freqs"])
        return seq

    with torch.inference_mode():
        outputs = [ours(x, t, context), theirs(x, t, context)]
        if not all(bool(torch.isfinite(o).all()) and o.shape == x.shape for o in outputs):
            raise RuntimeError(f"{name}: a model returned a wrong shape or non-finite values")
        steps = interleaved({"ours": lambda: ours(x, t, context), "comfy": lambda: theirs(x, t, context)},
                            repeats, device)
        blocks = interleaved({"ours": our_blocks, "comfy": their_blocks}, repeats, device)
    tokens = cond + (side // cfg.patch_size) ** 2
    rows = []
    for part, times in (("forward", steps), ("blocks", blocks)):
        a, b = median(times["ours"]), median(times["comfy"])
        rows.append((name, f"{cfg.hidden_size}/{cfg.num_heads}/{cfg.depth}", tokens, part, a, b, a / b,
                     verdict(a / b, 1.1)))
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_DIR)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU (as ComfyUI runs there), bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--comfy-arg", action="append", default=[], dest="comfy_args",
                        help="ComfyUI command-line argument (repeatable), e.g. --comfy-arg=--use-pytorch-cross-"
                             "attention: the attention ComfyUI picks on NVIDIA GPUs, instead of sub-quadratic on CPU")
    args = parser.parse_args(argv)
    setup(args.threads)
    comfy_dir = comfyui_dir(args.comfyui)
    if comfy_dir is None:
        raise SystemExit("dit_step.py compares against ComfyUI's blocks: pass --comfyui DIR or set COMFYUI_DIR")
    device = torch.device(args.device)
    import_comfy(comfy_dir, cpu=device.type == "cpu", args=args.comfy_args)
    from comfy.ldm.modules.attention import optimized_attention

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    rows = []
    for name in args.configs:
        cfg, side, cond = CONFIGS[name]
        rows += run_config(name, cfg, side, cond, dtype, args.repeats, device)
    clock = "CPU seconds of this process" if device.type == "cpu" else "wall seconds"
    logger.info("DiT step: ours vs ComfyUI SingleStreamBlock stack; %s %s, %d threads, attention %s; batch 2; "
                "%s, median of %d after warm-up", device, str(dtype).split(".")[1], torch.get_num_threads(),
                optimized_attention.__name__, clock, args.repeats)
    log_lines(table(("config", "width/heads/depth", "tokens", "part", "ours s", "comfy s", "ours/comfy",
                     "goal <= 1.1"), rows, floatfmt="{:.4f}"))


if __name__ == "__main__":
    main()
