"""Saved files are the same bytes for the same tensors and metadata, whatever order a dict had."""

from __future__ import annotations

import json
import struct

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from unifusion.safetensors_file import sort_header, write_safetensors


def _header(path) -> bytes:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return f.read(length)


def test_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64), "c": torch.zeros(1)}
    meta = {"zeta": "1", "alpha": json.dumps({"y": [1, 2], "x": "\u00e9\n\"q\""}), "mid": "m"}
    first = write_safetensors(tmp_path / "one.safetensors", tensors, meta)
    second = write_safetensors(tmp_path / "two.safetensors", dict(reversed(tensors.items())),
                               dict(reversed(meta.items())))
    assert first.read_bytes() == second.read_bytes()
    loaded = load_file(str(first))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(first), "pt") as f:
        assert f.metadata() == meta
    header = json.loads(_header(first))
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(meta)
    assert not list(tmp_path.glob("*.tmp"))


def test_sorting_keeps_the_header_length_and_the_data(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "raw.safetensors"
    save_file({"w": torch.randn(3, 3), "v": torch.randn(2)}, str(path), metadata={"k2": "v", "k1": "\u00fc"})
    before = path.read_bytes()
    length = len(_header(path))
    sort_header(path)
    after = path.read_bytes()
    assert len(after) == len(before) and after[8 + length:] == before[8 + length:]
    assert len(_header(path)) == length and json.loads(_header(path)) == json.loads(before[8:8 + length])
