"""Write .safetensors files byte for byte the same for the same tensors and metadata.

The safetensors writer lays the tensor data out deterministically, but orders the keys of its
JSON header (the metadata above all) as a hash map does, which changes from one process to the
next: a seeded re-run wrote files with equal tensors and other checksums (`train_demo.content_digest`
hashes the content for that reason). The header is rewritten with sorted keys, in place, so the
files themselves repeat: the data offsets do not move, and the header keeps its length (padded with
spaces, as the format allows).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Save ``tensors`` (moved to CPU, made contiguous) with string ``metadata``; written to a
    temporary name first, so no half-written file ever sits under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    sort_header(tmp)
    tmp.replace(path)
    return path


def sort_header(path: str | Path) -> None:
    """Rewrite the JSON header of a safetensors file with sorted keys, at the same length."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # another escaping than the writer's; its own order stays
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))
