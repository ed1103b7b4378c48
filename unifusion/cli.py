"""`unifusion` command line: generate, edit, inspect checkpoints and train, without ComfyUI.

Every command defaults to the bundled demo model, so `unifusion generate "a red circle"`
works right after installation.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import DEFAULT_GUIDANCE_MAX_T, DEFAULT_GUIDANCE_MIN_T
from .errors import UniFusionError

log = logging.getLogger("unifusion")


def _progress_printer(label: str) -> Callable[[int, int], None]:
    """A one-line progress bar on stderr (kept off stdout so output can be piped)."""
    start = time.monotonic()

    def show(step: int, total: int) -> None:
        width = 30
        done = int(width * step / max(total, 1))
        elapsed = time.monotonic() - start
        sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {step}/{total} {elapsed:5.1f}s")
        if step >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model files (default: the bundled demo model)")
    g.add_argument("--vlm", type=Path, help="transformers VLM folder (InternVL -hf, Qwen2.5-VL, Qwen3-VL, ...)")
    g.add_argument("--checkpoint", type=Path, help="UniFusion checkpoint (.safetensors)")
    g.add_argument("--vae", type=Path, help="autoencoder the checkpoint was trained with (.safetensors)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw (or, with --image, how to edit)")
    p.add_argument("-o", "--out", type=Path, default=Path("unifusion.png"),
                   help="output PNG; with --batch-size > 1 an index is added to the name")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance-min-t", type=float, default=DEFAULT_GUIDANCE_MIN_T,
                   help="guide only at noise levels t from this (0 and --guidance-max-t 1: every step)")
    p.add_argument("--guidance-max-t", type=float, default=DEFAULT_GUIDANCE_MAX_T,
                   help="... up to this; above it the prompt alone steers, so places a prompt leaves open get one "
                        "shape, not several")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--verifi", action="store_true", help="let the VLM rewrite the prompt first (Verifi)")
    p.add_argument("--system-prompt", help="system prompt for encoding / Verifi rewriting")
    p.add_argument("--max-tiles", type=int, default=6, help="tiles per reference image (plus a thumbnail)")
    p.add_argument("--layer-gains", type=float, nargs="+", help="per-VLM-layer gains for LAP (0 drops a layer)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unifusion", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text to image")
    _add_sampling_args(gen)
    _add_model_args(gen)
    edit = sub.add_parser("edit", help="edit or compose one or more reference images")
    _add_sampling_args(edit)
    edit.add_argument("--image", "-i", type=Path, action="append", required=True,
                      help="reference image; repeat for several references")
    _add_model_args(edit)
    info = sub.add_parser("info", help="show the config and expected VLM of a checkpoint")
    info.add_argument("checkpoint", type=Path)
    from .train.cli import add_commands

    add_commands(sub)  # cache, train, lora, export
    # listed here for --help; main() hands its arguments to the demo trainer's own parser
    sub.add_parser("train-demo", add_help=False,
                   help="train the bundled demo model end to end (`unifusion train-demo --help`)")
    from .demo.options import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="score the demo model: the benchmark table of the README"))
    return parser


def _resolve_files(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    if args.vlm and args.checkpoint and args.vae:
        return args.vlm, args.checkpoint, args.vae
    from .bundled import demo_files

    demo = demo_files()
    return args.vlm or demo.vlm, args.checkpoint or demo.checkpoint, args.vae or demo.vae


def _run_sampling(args: argparse.Namespace, images: Sequence[Path]) -> list[Path]:
    import torch

    from .pipeline import UniFusionPipeline

    vlm, checkpoint, vae = _resolve_files(args)
    dtype = getattr(torch, args.dtype)
    pipe = UniFusionPipeline.from_files(vlm, checkpoint, vae, device=args.device, dtype=dtype)
    condition = pipe.encode(args.prompt, images, max_tiles=args.max_tiles, verifi=args.verifi,
                            system_prompt=args.system_prompt, seed=args.seed, layer_gains=args.layer_gains,
                            progress=_progress_printer("rewrite" if args.verifi else "encode"))
    if condition.rewritten is not None:
        sys.stderr.write(f"rewritten prompt: {condition.rewritten}\n")
    out_images = pipe.sample(condition, args.width, args.height, steps=args.steps, cfg_scale=args.cfg,
                             seed=args.seed, batch_size=args.batch_size, progress=_progress_printer("sample"),
                             guidance_min_t=args.guidance_min_t, guidance_max_t=args.guidance_max_t)
    paths = []
    for i, image in enumerate(out_images):
        path = args.out if len(out_images) == 1 else args.out.with_name(f"{args.out.stem}_{i:03d}{args.out.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    return paths


def _info(args: argparse.Namespace) -> None:
    from .checkpoint import read_checkpoint_header

    head = read_checkpoint_header(args.checkpoint)
    cfg = head.config
    n_params = sum(math.prod(s) for s in head.shapes.values())
    sys.stdout.write(
        f"{head.path.name}: {n_params:,} parameters\n"
        f"  VLM: {cfg.vlm.architecture}, {cfg.vlm.num_layers} layers, hidden {cfg.vlm.hidden_size}, "
        f"captured layers {list(cfg.vlm.selected_layers)}\n"
        f"  LAP: {cfg.lap.num_blocks} blocks over {cfg.lap.num_vlm_layers} layers, refiner {cfg.lap.refiner_blocks}\n"
        f"  DiT: width {cfg.dit.hidden_size}, depth {cfg.dit.depth}, heads {cfg.dit.num_heads}, "
        f"patch {cfg.dit.patch_size}, latent channels {cfg.dit.in_channels}\n"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-demo"]:
        from .demo.train_demo import main as train_demo_main

        return train_demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "info":
            _info(args)
            return 0
        if args.command == "bench":
            from .demo.bench import run as run_bench

            return run_bench(args)
        handler = getattr(args, "train_handler", None)
        if handler is not None:
            return handler(args)
        paths = _run_sampling(args, args.image if args.command == "edit" else [])
    except UniFusionError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ncancelled\n")
        return 130
    for path in paths:
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
