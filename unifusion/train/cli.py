"""Command line of the training pipeline: ``cache``, ``train``, ``lora``, ``export``.

Standalone: ``python -m unifusion.train <command> ...``. To mount the commands in another
argparse program call `add_commands(subparsers)`; each sets ``train_handler`` on the parsed
namespace, a function ``(args) -> exit code`` that raises UniFusionError for user errors.
Multi-process: ``accelerate launch --config_file examples/accelerate/ddp_gpus.yaml -m
unifusion.train train ...`` (examples/accelerate/README.md has the CPU and FSDP variants).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UniFusionError

log = logging.getLogger("unifusion.train")

EXIT_INTERRUPTED = 130


def rope_axes_for(head_dim: int) -> tuple[int, int, int]:
    """(condition, row, column) RoPE split of a head: a quarter for the condition axis, the
    rest shared by the two image axes, all even (e.g. 32 -> (8, 12, 12), 128 -> (32, 48, 48))."""
    if head_dim % 2 or head_dim < 6:
        raise UniFusionError(f"head dim {head_dim} must be even and >= 6; change --width or --heads")
    cond = max(2, head_dim // 4 // 2 * 2)
    row = (head_dim - cond) // 2 // 2 * 2
    return cond, row, head_dim - cond - row


def _cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, action="append", required=True,
                   help="dataset: folder of images + .txt captions, or .jsonl (T2I or editing; a row's optional "
                        "\"rewrite\" is forced as its Verifi answer); repeatable")
    p.add_argument("--vlm", type=Path, required=True, help="transformers VLM folder")
    p.add_argument("--vae", type=Path, required=True, help="autoencoder .safetensors (TAESD layout)")
    p.add_argument("--out", type=Path, required=True, help="cache folder")
    p.add_argument("--resolution", type=int, nargs="+", help="target size: one value (square) or height width")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="stored feature dtype")
    p.add_argument("--layers", type=int, nargs="+", help="VLM layers to capture (default: every 3rd)")
    p.add_argument("--layer-stride", type=int, default=3)
    p.add_argument("--system-prompt", help="system prompt of the plain encoding")
    p.add_argument("--max-tiles", type=int, default=6, help="tiles per source image (editing)")
    p.add_argument("--verifi", action="store_true", help="also cache Verifi rewrites and their features")
    p.add_argument("--verifi-system-prompt", help="training system prompt for Verifi (default: the library's)")
    p.add_argument("--verifi-max-new-tokens", type=int, default=128)
    p.add_argument("--no-recon", action="store_true", help="skip the target-image encodings (reconstruction)")
    p.add_argument("--recon-tiles", type=int, default=1)
    p.add_argument("--on-long", default="truncate", choices=["truncate", "error"], help="texts over the VLM limit")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (held in memory while built)")
    p.add_argument("--overwrite", action="store_true", help="replace a stale cache in --out")
    p.add_argument("--device", default="cpu")


MODEL_DEFAULTS = {"width": 192, "depth": 4, "heads": 6, "patch": 1, "time_embed_dim": 128, "lap_heads": 4,
                  "refiner_blocks": 1}


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a resumed run keeps its saved model unless these are given; "
                             "--init-from uses the checkpoint's)")
    g.add_argument("--width", type=int, help=f"DiT hidden size (default {MODEL_DEFAULTS['width']})")
    g.add_argument("--depth", type=int, help=f"DiT blocks (default {MODEL_DEFAULTS['depth']})")
    g.add_argument("--heads", type=int, help=f"DiT heads (default {MODEL_DEFAULTS['heads']})")
    g.add_argument("--patch", type=int, help=f"DiT patch size (default {MODEL_DEFAULTS['patch']})")
    g.add_argument("--time-embed-dim", type=int, help=f"default {MODEL_DEFAULTS['time_embed_dim']}")
    g.add_argument("--lap-heads", type=int, help=f"default {MODEL_DEFAULTS['lap_heads']}")
    g.add_argument("--refiner-blocks", type=int, help=f"default {MODEL_DEFAULTS['refiner_blocks']}")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, required=True, help="feature cache folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (states, loss.jsonl)")
    p.add_argument("--init-from", type=Path, help="release checkpoint to start from (its config is used)")
    p.add_argument("--resume", default="auto", help="'auto' (newest state in --out), a state folder, or 'none'")
    p.add_argument("--export", type=Path, help="write the release (or LoRA) file here when training ends")
    g = p.add_argument_group("recipe")
    for name, typ, default in (("steps", int, 1000), ("batch-size", int, 32), ("grad-accum", int, 1),
                               ("lr", float, 3e-4), ("condition-lr-scale", float, 1.0), ("weight-decay", float, 0.0),
                               ("warmup", int, 100),
                               ("max-grad-norm", float, 1.0), ("ema-decay", float, 0.999), ("seed", int, 0),
                               ("cond-dropout", float, 0.1), ("recon-prob", float, 0.03),
                               ("verifi-prob", float, 0.0), ("shift", float, None), ("save-every", int, 500),
                               ("keep-last", int, 2), ("log-every", int, 10)):
        g.add_argument(f"--{name}", type=typ, default=default)
    g.add_argument("--loss-whitening", type=float, default=0.0,
                   help="0: plain MSE on the latents; p in (0, 1]: MSE after whitening the latent channels to "
                        "Cov^-p (fine shape detail lives in their low-variance directions)")
    g.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    g.add_argument("--stage", default="t2i", choices=["t2i", "edit", "mixed"])
    g.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    g.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the DiT")
    g.add_argument("--compile", action="store_true",
                   help="run LAP + DiT through torch.compile (minutes to compile, then faster steps; "
                        "needs a C++ compiler on CPU)")
    g.add_argument("--fused-optimizer", action="store_true", help="AdamW's fused kernel (faster, same update "
                                                                   "up to rounding)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for small models on a busy machine)")


def add_commands(sub: Any) -> None:
    """Add cache / train / lora / export to an argparse subparsers object."""
    cache = sub.add_parser("cache", help="encode a dataset once with the VLM and VAE into a feature cache")
    _cache_args(cache)
    cache.set_defaults(train_handler=run_cache)
    fit = sub.add_parser("train", help="train DiT + LAP on a feature cache (resumes automatically)")
    _train_args(fit)
    _model_args(fit)
    fit.set_defaults(train_handler=run_train)
    lora = sub.add_parser("lora", help="train LoRA adapters on the DiT of a checkpoint")
    _train_args(lora)
    lora.add_argument("--rank", type=int, default=16)
    lora.add_argument("--alpha", type=float, default=16.0)
    lora.add_argument("--targets", nargs="+", help="module name patterns inside the DiT (fnmatch)")
    lora.set_defaults(train_handler=run_lora)
    export = sub.add_parser("export", help="write the release checkpoint (or ComfyUI LoRA) of a training state")
    export.add_argument("state", type=Path, help="a state folder or a training output folder (newest state)")
    export.add_argument("out", type=Path)
    export.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    export.add_argument("--shift", type=float, help="override the sampling shift stored in the checkpoint")
    export.add_argument("--merged", action="store_true", help="for LoRA states: merge into a full checkpoint")
    export.set_defaults(train_handler=run_export)


def run_cache(args: argparse.Namespace) -> int:
    import torch

    from ..vae import load_vae
    from ..vlm.loader import load_vlm
    from .cache_build import build_cache
    from .datasets import load_dataset

    records = [r for path in args.data for r in load_dataset(path)]
    vlm = load_vlm(args.vlm, device=args.device, layer_stride=args.layer_stride, selected_layers=args.layers)
    vae = load_vae(args.vae, device=args.device, dtype=torch.float32)
    resolution = None if not args.resolution else (args.resolution * 2)[:2]
    cache = build_cache(
        records, vlm, vae, args.out, resolution=resolution, feature_dtype=args.dtype,
        system_prompt=args.system_prompt, max_tiles=args.max_tiles, verifi=args.verifi,
        verifi_system_prompt=args.verifi_system_prompt, verifi_max_new_tokens=args.verifi_max_new_tokens,
        recon=not args.no_recon, recon_tiles=args.recon_tiles, on_long=args.on_long, batch_size=args.batch_size,
        shard_size=args.shard_size, overwrite=args.overwrite,
    )
    sys.stdout.write(f"{cache.folder}: {len(cache)} samples, variants {', '.join(cache.variants())}\n")
    return 0


def _recipe(args: argparse.Namespace, lora: Any = None) -> Any:
    from .recipe import TrainConfig

    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        condition_lr_scale=args.condition_lr_scale, weight_decay=args.weight_decay, warmup_steps=args.warmup,
        schedule=args.schedule,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
        ema_decay=args.ema_decay, mixed_precision=args.mixed_precision, seed=args.seed,
        cond_dropout=args.cond_dropout, recon_prob=args.recon_prob, verifi_prob=args.verifi_prob,
        loss_whitening=args.loss_whitening, timestep_shift=args.shift, stage=args.stage, init_from=str(args.init_from) if args.init_from else None,
        gradient_checkpointing=args.grad_ckpt, compile=args.compile, fused_optimizer=args.fused_optimizer,
        save_every=args.save_every, keep_last=args.keep_last,
        log_every=args.log_every, lora=lora,
    )


def _fit(args: argparse.Namespace, config: Any, model_config: Any) -> int:
    import torch

    from .export import export_lora, export_release
    from .run import train

    if args.threads:
        torch.set_num_threads(args.threads)

    resume = None if str(args.resume).lower() == "none" else args.resume
    result = train(args.cache, args.out, model_config, config, resume=resume, progress=not args.no_progress)
    sys.stderr.write(f"{'interrupted' if result.interrupted else 'finished'} at step {result.step}; "
                     f"state {result.state_dir}\n")
    if result.interrupted:
        sys.stderr.write(f"resume with the same command (--resume auto) to continue to step {config.steps}\n")
        return EXIT_INTERRUPTED
    if args.export:
        path = (export_lora if config.lora is not None else export_release)(result.state_dir, args.export)
        sys.stdout.write(f"{path}\n")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ..config import DiTConfig
    from .cache import FeatureCache
    from .run import model_config_for_cache, resume_folder

    given = {k: getattr(args, k) for k in MODEL_DEFAULTS if getattr(args, k) is not None}
    resuming = str(args.resume).lower() != "none" and resume_folder(args.out, args.resume) is not None
    model_config = None
    if args.init_from is None and (given or not resuming):
        m = argparse.Namespace(**{**MODEL_DEFAULTS, **given})
        cache = FeatureCache(args.cache)
        dit = DiTConfig(in_channels=cache.key.latent_channels, patch_size=m.patch, hidden_size=m.width,
                        depth=m.depth, num_heads=m.heads, time_embed_dim=m.time_embed_dim,
                        rope_axes=rope_axes_for(m.width // m.heads))
        model_config = model_config_for_cache(cache, dit, m.lap_heads, m.refiner_blocks)
    return _fit(args, _recipe(args), model_config)


def run_lora(args: argparse.Namespace) -> int:
    from .recipe import LoRAConfig

    if args.init_from is None:
        raise UniFusionError("lora needs --init-from: the checkpoint whose DiT the adapters modify")
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha, **({"targets": tuple(args.targets)} if args.targets else {}))
    return _fit(args, _recipe(args, lora), None)


def run_export(args: argparse.Namespace) -> int:
    from .export import export_lora, export_release, resolve_state
    from .recipe import TrainConfig
    from .state import read_meta

    folder = resolve_state(args.state)
    is_lora = TrainConfig.from_dict(read_meta(folder)["train_config"]).lora is not None
    if is_lora and not args.merged:
        path = export_lora(folder, args.out, use_ema=not args.no_ema)
    else:
        path = export_release(folder, args.out, use_ema=not args.no_ema, sampling_shift=args.shift)
    sys.stdout.write(f"{path}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m unifusion.train", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.train_handler(args)
    except UniFusionError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ncancelled\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
