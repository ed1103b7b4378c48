"""Trainer throughput on synthetic cached features: size a run before encoding a dataset.

``python -m unifusion.train.bench --width 192 --depth 4 --tokens 48 --batch-size 32``
writes a cache of random features and latents (no VLM, no VAE), trains a few steps with the
real `Trainer` (collate, LAP, DiT, AdamW, EMA) and prints steps per second after warm-up,
plus CPU seconds per step (all threads), which stays meaningful on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file

from ..config import DiTConfig, VLMIdentity, default_layer_selection, make_config
from .cache import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, CacheKey, FeatureCache, shard_name, tensor_name
from .recipe import TrainConfig
from .trainer import StepInfo, Trainer


def synthetic_cache(folder: Path, samples: int, tokens: int, vlm: VLMIdentity, latent: tuple[int, int, int],
                    seed: int = 0) -> FeatureCache:
    """A cache folder of random float32 features ``(tokens, L, H)`` and latents, in the real format."""
    gen = torch.Generator().manual_seed(seed)
    layers = len(vlm.selected_layers)
    tensors = {}
    for i in range(samples):
        tensors[tensor_name(i, "plain")] = torch.randn(tokens, layers, vlm.hidden_size, generator=gen)
        tensors[tensor_name(i, "latent")] = torch.randn(*latent, generator=gen)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / shard_name(0)))
    key = CacheKey(vlm=vlm, vlm_fingerprint="synthetic", vae_fingerprint="synthetic", latent_channels=latent[0],
                   resolution=(latent[1] * 8, latent[2] * 8), feature_dtype="float32")
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "key": key.to_dict(), "latent_shape": list(latent),
             "samples": [{"shard": 0, "kind": "t2i", "text": f"sample {i}", "origin": f"synthetic[{i}]",
                          "tokens": {"plain": tokens}} for i in range(samples)]}
    (folder / INDEX_NAME).write_text(json.dumps(index), encoding="utf-8")
    return FeatureCache(folder, preload=True)


def measure(width: int = 192, depth: int = 4, heads: int = 6, patch: int = 1, tokens: int = 48,
            batch_size: int = 32, steps: int = 12, warmup: int = 2, vlm_layers: int = 12, vlm_hidden: int = 128,
            latent: tuple[int, int, int] = (4, 8, 8), threads: Optional[int] = None) -> dict:
    """Steps per second of the trainer (after ``warmup`` steps) for a demo-like setup."""
    from .cli import rope_axes_for

    if threads:
        torch.set_num_threads(threads)
    vlm = VLMIdentity("InternVLForConditionalGeneration", vlm_layers, vlm_hidden, default_layer_selection(vlm_layers))
    dit = DiTConfig(in_channels=latent[0], patch_size=patch, hidden_size=width, depth=depth, num_heads=heads,
                    time_embed_dim=128, rope_axes=rope_axes_for(width // heads))
    model_config = make_config(vlm, dit, lap_heads=4, refiner_blocks=1)
    times: list[tuple[float, float]] = []

    def clock(info: StepInfo) -> None:
        times.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as tmp:
        cache = synthetic_cache(Path(tmp) / "cache", max(batch_size, 64), tokens, vlm, latent)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, warmup_steps=1, recon_prob=0.0, save_every=10**9)
        trainer = Trainer(model_config, cache, cfg, Path(tmp) / "run", callbacks=[clock], progress=False)
        params = sum(p.numel() for p in trainer.model.parameters())
        trainer.train()
    timed = times[warmup:]
    rate = (len(timed) - 1) / (timed[-1][0] - timed[0][0])
    cpu = (timed[-1][1] - timed[0][1]) / (len(timed) - 1)
    return {"params_m": round(params / 1e6, 2), "width": width, "depth": depth, "patch": patch, "tokens": tokens,
            "batch_size": batch_size, "threads": torch.get_num_threads(), "steps_per_s": round(rate, 3),
            "s_per_step": round(1 / rate, 3), "cpu_s_per_step": round(cpu, 3),
            "samples_per_s": round(rate * batch_size, 1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unifusion.train.bench", description=__doc__.splitlines()[0])
    for name, default in (("width", 192), ("depth", 4), ("heads", 6), ("patch", 1), ("tokens", 48),
                          ("batch-size", 32), ("steps", 12), ("threads", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args(argv)
    result = measure(args.width, args.depth, args.heads, args.patch, args.tokens, args.batch_size, args.steps,
                     threads=args.threads or None)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
