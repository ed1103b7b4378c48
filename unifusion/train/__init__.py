"""Training pipeline: datasets -> feature cache (VLM + VAE, once) -> trainer -> release export.

Typical use::

    records = load_dataset("data/captions.jsonl")
    build_cache(records, vlm, vae, "cache/", resolution=64)
    result = train("cache/", "runs/demo", model_config, TrainConfig(steps=5000))
    export_release(result.state_dir, "unifusion_demo.safetensors")

Names are imported on first use, so reading a cache or a state does not import the VLM code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DatasetError": "errors", "CacheError": "errors", "TrainStateError": "errors", "TrainConfigError": "errors",
    "T2IRecord": "datasets", "EditRecord": "datasets", "load_dataset": "datasets", "load_t2i_jsonl": "datasets",
    "load_edit_jsonl": "datasets", "load_t2i_folder": "datasets", "t2i_from_samples": "datasets",
    "edit_from_samples": "datasets", "fit_captions": "datasets",
    "CacheKey": "cache", "FeatureCache": "cache", "Batch": "cache", "collate": "cache",
    "build_cache": "cache_build", "make_cache_key": "cache_build",
    "TrainConfig": "recipe", "LoRAConfig": "recipe", "learning_rate": "recipe", "plan_micro_batch": "recipe",
    "EMA": "ema",
    "LoRA": "lora", "add_lora": "lora", "save_comfy_lora": "lora", "comfy_lora_keys": "lora",
    "Trainer": "trainer", "TrainResult": "trainer", "StepInfo": "trainer",
    "train": "run", "model_config_for_cache": "run",
    "export_release": "export", "export_lora": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unifusion.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
