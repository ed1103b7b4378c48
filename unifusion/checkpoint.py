"""UniFusion checkpoints: one safetensors file holding DiT+LAP weights, the model config
and the identity of the VLM it was trained with (all in the file's metadata).

Only safetensors is ever read: user files are never unpickled. The header is parsed and
checked before any tensor is touched, so a truncated or foreign file gives an error that
says what is wrong with it instead of a traceback from deep inside a library.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from .config import ConfigError, UniFusionConfig, VLMIdentity
from .errors import CheckpointError, VLMMismatchError
from .safetensors_file import write_safetensors

FORMAT_NAME = "unifusion"
FORMAT_VERSION = "1"
CONFIG_KEY = "unifusion_config"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint says about itself, read without loading any tensor."""

    path: Path
    config: UniFusionConfig
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


def save_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: UniFusionConfig,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write weights plus config metadata; tensors are made contiguous and moved to CPU."""
    path = Path(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, CONFIG_KEY: config.to_json()})
    return write_safetensors(path, state_dict, meta)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and sanity-check a safetensors header: (tensor entries, metadata)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Check the file name, or put the file in that folder.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; a UniFusion checkpoint is a single .safetensors file.")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is empty or truncated ({size} bytes); download or save it again.")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path} is not a safetensors file (or is truncated): its header length {header_len} does not fit "
                f"in {size} bytes. Only .safetensors checkpoints are supported; pickled .ckpt/.pt/.bin files are "
                "never loaded."
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has an unreadable safetensors header ({exc}); the file is damaged.") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a malformed safetensors header; the file is damaged.")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - header_len
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor entry {name!r} is malformed; the file is damaged.") from exc
        if end > data_len or start > end:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} but only {data_len} bytes of data are "
                "present. Download or copy the file again."
            )
    return header, dict(metadata)


def read_checkpoint_header(path: str | Path) -> CheckpointHeader:
    """Read config and tensor shapes of a UniFusion checkpoint without loading weights."""
    path = Path(path)
    header, metadata = read_safetensors_header(path)
    if CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a UniFusion checkpoint (no {CONFIG_KEY!r} metadata; "
            f"{_describe_foreign(header)}). Pick a UniFusion checkpoint, e.g. the bundled demo model."
        )
    try:
        config = UniFusionConfig.from_json(metadata[CONFIG_KEY])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    dtypes = {k: str(v["dtype"]) for k, v in header.items()}
    return CheckpointHeader(path, config, metadata, shapes, dtypes)


def _describe_foreign(header: Mapping[str, Any]) -> str:
    """A short guess at what a non-UniFusion file is, to make the error useful."""
    keys = list(header)
    hints = {
        "double_blocks.": "it looks like a FLUX model",
        "model.diffusion_model.": "it looks like a Stable Diffusion checkpoint",
        "taesd_decoder.": "it looks like a VAE (load it with the VAE loader)",
        "decoder.": "it looks like a VAE (load it with the VAE loader)",
        "lora_": "it looks like a LoRA",
    }
    for prefix, hint in hints.items():
        if any(prefix in k for k in keys):
            return hint
    return f"{len(keys)} tensors, first key {keys[0]!r}" if keys else "no tensors"


def expected_shapes(config: UniFusionConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model a config describes, built on the meta device (no memory)."""
    from .model import UniFusionModel

    with torch.device("meta"):
        model = UniFusionModel(config, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def validate_shapes(path: Path | str, found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
             for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            parts.append(f"{len(items)} {label}: {shown}")
    raise CheckpointError(
        f"{path} does not match the model its own config describes ({'; '.join(parts)}). The file was saved by "
        "an incompatible version or edited; re-export it with the current `unifusion` version."
    )


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], CheckpointHeader]:
    """Validated weights and header of a checkpoint (safetensors only)."""
    head = read_checkpoint_header(path)
    validate_shapes(head.path, head.shapes, expected_shapes(head.config))
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(head.path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for damaged data
        raise CheckpointError(f"{head.path} could not be read ({exc}); the file is damaged.") from exc
    return state, head


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    operations: Any = None,
    attention: Any = None,
):
    """Build a UniFusionModel from a checkpoint; returns (model in eval mode, config)."""
    from .model import UniFusionModel

    state, head = load_state_dict(path, device="cpu")
    model = UniFusionModel(head.config, dtype=dtype, device="cpu", operations=operations, attention=attention)
    model.load_state_dict(state, strict=True)
    return model.to(device=device).eval(), head.config


def check_vlm_identity(expected: VLMIdentity, found: VLMIdentity, checkpoint: str | Path = "the checkpoint") -> None:
    """Raise VLMMismatchError naming both VLMs when the checkpoint cannot use the loaded VLM."""
    problems = expected.mismatches(found)
    if problems:
        raise VLMMismatchError(
            f"{checkpoint} was trained with a {expected.architecture} of {expected.num_layers} layers and hidden size "
            f"{expected.hidden_size}, but the loaded VLM is a {found.architecture} of {found.num_layers} layers and "
            f"hidden size {found.hidden_size} ({'; '.join(problems)}). Load the VLM the checkpoint was trained with."
        )
