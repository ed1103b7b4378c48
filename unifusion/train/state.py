"""Training-state folders: everything an exact resume needs, as safetensors + JSON (no pickle).

One folder per save, ``states/step-00000100/``::

    model.safetensors      trainable parameters (full, gathered under FSDP)
    ema.safetensors        EMA shadows of the same parameters (when EMA is on)
    optimizer.safetensors  optimizer tensors, "state.<param name>.<slot>"
    optimizer.json         param groups (by parameter name) and non-tensor slots
    rng.safetensors        torch CPU / accelerator RNG states
    trainer.json           step, configs, cache key, scheduler position; written last

A folder is written under a ``.tmp`` name and renamed when complete, so a crash mid-save
never leaves a half state that looks finished. accelerate's ``save_state`` is not used:
it pickles the optimizer and RNG states. Model and optimizer state dicts go through
``torch.distributed.checkpoint.state_dict``, which names tensors by parameter name and
gathers full tensors for DDP and FSDP alike.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .ema import EMA
from .errors import TrainStateError

logger = logging.getLogger(__name__)

STATE_FORMAT = "unifusion-train-state"
STATE_VERSION = 1
META_NAME = "trainer.json"
_STEP_RE = re.compile(r"^step-(\d{8})$")


def state_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_states(output_dir: str | Path) -> list[Path]:
    """Finished state folders under ``output_dir/states``, oldest first."""
    root = Path(output_dir) / "states"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / META_NAME).is_file()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_state(output_dir: str | Path) -> Optional[Path]:
    states = list_states(output_dir)
    return states[-1] if states else None


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The trainer.json of a state folder, checked to be one."""
    folder = Path(folder)
    path = folder / META_NAME
    if not path.is_file():
        raise TrainStateError(f"{folder} is not a training state (no {META_NAME}); pass a states/step-* folder "
                              "written by the trainer")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainStateError(f"{path} is damaged ({exc}); resume from an earlier state") from exc
    if meta.get("format") != STATE_FORMAT:
        raise TrainStateError(f"{path} is not a UniFusion training state")
    if int(meta.get("version", 0)) > STATE_VERSION:
        raise TrainStateError(f"{path} was written by a newer version (format {meta['version']}); update")
    return meta


def _load(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, FileNotFoundError) as exc:
        raise TrainStateError(f"{path} is missing or damaged ({exc}); resume from an earlier state") from exc


def _is_fsdp(accelerator: Any) -> bool:
    return accelerator is not None and str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")


def _get_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _set_options(accelerator: Any) -> StateDictOptions:
    return StateDictOptions(full_state_dict=_is_fsdp(accelerator), strict=False)


def trainable_state(model: nn.Module, names: set[str]) -> dict[str, Tensor]:
    """Copies of the named (trainable) parameters, full tensors under DDP/FSDP (copies: the
    parameters may change, e.g. while the EMA shadows are swapped in)."""
    full = get_model_state_dict(model, options=_get_options())
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in full.items() if k in names}


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, slots in osd.get("state", {}).items():
        for slot, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"state.{name}.{slot}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[slot] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd.get("param_groups", [])]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], extra: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, slot = key[len("state."):].rsplit(".", 1)
        state.setdefault(name, {})[slot] = value
    for name, slots in extra.get("scalars", {}).items():
        state.setdefault(name, {}).update(slots)
    groups = []
    for group in extra["param_groups"]:
        groups.append({k: (tuple(v) if k == "betas" else v) for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def _rng_state() -> dict[str, Tensor]:
    out = {"torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = s
    return out


def _set_rng_state(states: dict[str, Tensor]) -> None:
    if "torch_cpu" in states:
        torch.random.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_state(
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: set[str],
    ema: Optional[EMA],
    meta: dict[str, Any],
    is_main: bool = True,
    accelerator: Any = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Write ``states/step-<step>`` (collective under DDP/FSDP: every process must call it)."""
    folder = Path(output_dir) / "states" / state_dir_name(step)
    weights = trainable_state(model, trainable)
    osd = get_optimizer_state_dict(model, optimizer, options=_get_options())
    shadows: dict[str, Tensor] = {}
    if ema is not None:
        with ema.swapped_in():
            shadows = trainable_state(model, trainable)
    if not is_main:
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(shadows, str(tmp / "ema.safetensors"))
    opt_tensors, opt_extra = _flatten_optimizer(osd)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_extra, indent=1), encoding="utf-8")
    save_file(_rng_state(), str(tmp / "rng.safetensors"))
    full_meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step,
                 "ema_updates": ema.updates if ema is not None else 0, **meta}
    (tmp / META_NAME).write_text(json.dumps(full_meta, indent=1), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    if keep_last is not None:
        for old in list_states(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("saved training state %s", folder)
    return folder


def load_state(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: set[str],
    ema: Optional[EMA],
    accelerator: Any = None,
) -> dict[str, Any]:
    """Restore model, EMA, optimizer and RNG from ``folder``; returns its trainer.json."""
    folder = Path(folder)
    meta = read_meta(folder)
    weights = _load(folder / "model.safetensors")
    missing = sorted(trainable - set(weights))
    if missing:
        raise TrainStateError(f"{folder}/model.safetensors lacks {len(missing)} trainable weights (e.g. {missing[0]}); "
                              "the state belongs to another model or LoRA setup")
    if ema is not None:
        if not (folder / "ema.safetensors").is_file():
            raise TrainStateError(f"{folder} has no EMA weights but this run uses EMA; resume with ema_decay=0")
        set_model_state_dict(model, _load(folder / "ema.safetensors"), options=_set_options(accelerator))
        ema.load_state_dict({n: p.detach() for n, p in ema.params.items()}, meta.get("ema_updates", 0))
    set_model_state_dict(model, weights, options=_set_options(accelerator))
    extra = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
    if [g.get("lr_scale") for g in extra["param_groups"]] != [g["lr_scale"] for g in optimizer.param_groups]:
        raise TrainStateError(f"{folder} holds optimizer state for other parameter groups (saved by an older version, "
                              "before LAP had its own learning rate); resume it with that version or start a new run")
    osd = _unflatten_optimizer(_load(folder / "optimizer.safetensors"), extra)
    set_optimizer_state_dict(model, optimizer, osd, options=_set_options(accelerator))
    _set_rng_state(_load(folder / "rng.safetensors"))
    return meta
