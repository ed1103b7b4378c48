"""Turn a training state into what users load: a release checkpoint, or a ComfyUI LoRA.

The release is the single safetensors file of `unifusion.checkpoint.save_checkpoint`
(EMA weights by default) with ``extra["sampling_shift"]`` set to the shift the model was
trained with, so the pipeline and the ComfyUI nodes sample with the matching schedule.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

from ..checkpoint import load_state_dict, read_checkpoint_header, save_checkpoint
from ..config import DiTConfig, UniFusionConfig
from ..model import UniFusionModel
from .errors import TrainStateError
from .lora import LoRA, add_lora, save_comfy_lora
from .recipe import TrainConfig
from .state import latest_state, read_meta

logger = logging.getLogger(__name__)


def resolve_state(path: str | Path) -> Path:
    """A state folder, or the newest one under a training output folder."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    found = latest_state(path)
    if found is None:
        raise TrainStateError(f"{path} holds no training state (states/step-*/trainer.json); pass a state folder or "
                              "the output folder of a training run")
    return found


def _restore(folder: Path, use_ema: bool) -> tuple[UniFusionModel, Optional[LoRA], UniFusionConfig, dict]:
    meta = read_meta(folder)
    config = UniFusionConfig.from_json(json.dumps(meta["model_config"]))
    train_cfg = TrainConfig.from_dict(meta["train_config"])
    model = UniFusionModel(config)
    if train_cfg.init_from is not None:
        base = Path(train_cfg.init_from)
        if not base.is_file():
            raise TrainStateError(f"{folder} was trained from {base}, which is gone; put it back to export")
        state, _ = load_state_dict(base)
        model.load_state_dict(state, strict=True)
    lora = None
    if train_cfg.lora is not None:
        lc = train_cfg.lora
        lora = add_lora(model, lc.rank, lc.alpha, lc.targets)
    name = "ema.safetensors" if use_ema else "model.safetensors"
    if use_ema and not (folder / name).is_file():
        raise TrainStateError(f"{folder} has no EMA weights (trained with ema_decay=0); export with use_ema=False")
    weights = load_file(str(folder / name))
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise TrainStateError(f"{folder}/{name} has weights this model lacks ({result.unexpected_keys[:3]}); "
                              "the state is damaged or of another version")
    if train_cfg.lora is None and result.missing_keys:
        raise TrainStateError(f"{folder}/{name} lacks weights ({result.missing_keys[:3]}); the state is incomplete")
    return model, lora, config, meta


def export_release(state: str | Path, out_path: str | Path, use_ema: bool = True,
                   sampling_shift: Optional[float] = None) -> Path:
    """Write the release checkpoint of a state (LoRA states are merged into their base)."""
    folder = resolve_state(state)
    model, lora, config, meta = _restore(folder, use_ema)
    if lora is not None:
        lora.merge()
    shift = float(sampling_shift if sampling_shift is not None else meta["sampling_shift"])
    extra = {**config.extra, "sampling_shift": shift, "trained_steps": int(meta["step"]), "ema": bool(use_ema)}
    path = save_checkpoint(out_path, model.state_dict(), replace(config, extra=extra),
                           metadata={"source": "unifusion.train", "state": folder.name})
    logger.info("exported %s (step %d, %s weights) to %s", folder, meta["step"], "EMA" if use_ema else "raw", path)
    return path


def with_image_injection(checkpoint: str | Path, out_path: str | Path) -> Path:
    """A copy of a release checkpoint whose DiT gains `DiTConfig.image_injection`, zero-initialised, so
    it draws exactly what the original draws; a finetune from it (``init_from``) then learns the
    injection. The demo's edit stage can start from such a copy of its text-to-image checkpoint."""
    head = read_checkpoint_header(checkpoint)
    if head.config.dit.image_injection:
        raise TrainStateError(f"{checkpoint} already has image_injection; finetune from it as it is")
    return _grown_copy(checkpoint, out_path, replace(head.config.dit, image_injection=True),
                       lambda name: name == "dit.image_injection.weight", "with_image_injection")


def with_extra_blocks(checkpoint: str | Path, out_path: str | Path, blocks: int, seed: int = 0) -> Path:
    """A copy of a release checkpoint whose DiT gains ``blocks`` blocks after its last one. Their
    modulation starts at zero (adaLN-Zero), so each is the identity and the copy draws exactly what
    the original draws; their attention and MLP weights are drawn from ``seed``. A finetune from it
    (``init_from``) then trains a deeper DiT without first unlearning what the shallow one drew."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be a positive integer, got {blocks!r}")
    dit = read_checkpoint_header(checkpoint).config.dit
    added = tuple(f"dit.blocks.{i}." for i in range(dit.depth, dit.depth + blocks))
    return _grown_copy(checkpoint, out_path, replace(dit, depth=dit.depth + blocks),
                       lambda name: name.startswith(added), "with_extra_blocks", seed)


def _grown_copy(checkpoint: str | Path, out_path: str | Path, dit: DiTConfig, is_new: Callable[[str], bool],
                source: str, seed: int = 0) -> Path:
    """Save ``checkpoint``'s weights into a model with the DiT config ``dit``; the tensors that only
    the new model has (each must pass ``is_new``) keep their initialisation from ``seed``."""
    state, head = load_state_dict(checkpoint)
    config = replace(head.config, dit=dit)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UniFusionModel(config)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or not result.missing_keys or not all(map(is_new, result.missing_keys)):
        damaged = result.unexpected_keys or [name for name in result.missing_keys if not is_new(name)]
        raise TrainStateError(f"{checkpoint} does not fit its own config ({damaged[:3]}); it is damaged")
    return save_checkpoint(out_path, model.state_dict(), config,
                           metadata={**head.metadata, "source": f"unifusion.train.{source}"})


def export_lora(state: str | Path, out_path: str | Path, use_ema: bool = True) -> Path:
    """Write the adapters of a LoRA state as a ComfyUI LoRA file (LoraLoaderModelOnly)."""
    folder = resolve_state(state)
    if TrainConfig.from_dict(read_meta(folder)["train_config"]).lora is None:
        raise TrainStateError(f"{folder} is a full training state, not a LoRA one; use export_release")
    _, lora, _, meta = _restore(folder, use_ema)
    return save_comfy_lora(lora, out_path, metadata={"trained_steps": str(meta["step"]), "state": folder.name})
