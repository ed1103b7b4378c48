import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from unifusion.checkpoint import (
    check_vlm_identity,
    load_model,
    read_checkpoint_header,
    save_checkpoint,
)
from unifusion.config import VLMIdentity, tiny_preset
from unifusion.errors import CheckpointError, VLMMismatchError
from unifusion.model import UniFusionModel


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_preset()
    model = UniFusionModel(cfg)
    path = save_checkpoint(tmp_path / "tiny.safetensors", model.state_dict(), cfg, {"note": "test"})
    return path, model, cfg


def test_round_trip_restores_weights_config_and_outputs(saved):
    path, model, cfg = saved
    loaded, loaded_cfg = load_model(path)
    assert loaded_cfg == cfg
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    head = read_checkpoint_header(path)
    assert head.metadata["note"] == "test" and head.metadata["format"] == "unifusion"
    assert head.config.vlm.selected_layers == cfg.vlm.selected_layers


def test_load_in_bfloat16(saved):
    path, _, _ = saved
    loaded, _ = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint_header(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint_header(tmp_path)


def test_empty_and_pickle_files_are_refused(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        read_checkpoint_header(empty)
    pickled = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(3)}, pickled)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_checkpoint_header(pickled)


def test_truncated_file_is_named(saved, tmp_path):
    path, _, _ = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(cut)


def test_foreign_safetensors_is_recognised(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="not a UniFusion checkpoint.*FLUX"):
        read_checkpoint_header(path)


def test_missing_and_misshaped_tensors_are_listed(saved, tmp_path):
    path, model, cfg = saved
    state = dict(model.state_dict())
    first = sorted(state)[0]
    del state[first]
    second = sorted(state)[0]
    state[second] = torch.zeros(3, 3)
    bad = save_checkpoint(tmp_path / "bad.safetensors", state, cfg)
    with pytest.raises(CheckpointError) as info:
        load_model(bad)
    message = str(info.value)
    assert "1 missing" in message and first in message
    assert "wrong shape" in message and second in message


def test_damaged_config_metadata(saved, tmp_path):
    path, _, _ = saved
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["unifusion_config"] = "{broken"
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    assert len(raw) == n
    out = tmp_path / "meta.safetensors"
    out.write_bytes(bytes(data[:8]) + raw + bytes(data[8 + n :]))
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint_header(out)


def test_vlm_mismatch_names_both_models():
    expected = tiny_preset().vlm
    found = VLMIdentity("Qwen2_5_VLForConditionalGeneration", 12, 96, (4, 7, 10))
    with pytest.raises(VLMMismatchError) as info:
        check_vlm_identity(expected, found, "demo.safetensors")
    message = str(info.value)
    assert "InternVLForConditionalGeneration" in message and "Qwen2_5_VLForConditionalGeneration" in message
    assert "demo.safetensors" in message
    check_vlm_identity(expected, expected)
