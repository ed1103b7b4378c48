"""Security promises (SECURITY.md) inside a real ComfyUI: widget names stay inside the model
folders, pickled files are refused without being unpickled, remote code runs only when the
loader's trust_remote_code is turned on (and then with a warning in the log)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from harness import ComfyServer
from test_nodes import fails_then_recovers, graph
from tiny_unifusion import TinyFiles


class _Trap:
    """Unpickling this creates a marker file: proof that something unpickled user data."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loader_offers_trust_remote_code_off_by_default(server: ComfyServer) -> None:
    spec = server.object_info("UniFusionVLMLoader")["UniFusionVLMLoader"]["input"]["optional"]["trust_remote_code"]
    assert spec[0] == "BOOLEAN" and spec[1]["default"] is False
    assert "only for a folder whose code you trust" in spec[1]["tooltip"]


@pytest.mark.parametrize("node, field, name", [
    ("model", "checkpoint", "../../etc/passwd"),
    ("model", "checkpoint", "/etc/passwd"),
    ("model", "checkpoint", "../unifusion_vlm/unifusion-demo-vlm/model.safetensors"),
    ("vlm", "vlm", "../../../etc"),
    ("vlm", "vlm", "unifusion-demo-vlm/../../.."),
])
def test_path_traversal_names_are_refused(server: ComfyServer, node: str, field: str, name: str) -> None:
    """ComfyUI 0.3.64 does not check V3 combo values against their options, so any string a
    hand-made API prompt sends reaches the loader: the node itself must refuse it."""
    prompt = graph()
    prompt[node]["inputs"][field] = name
    kind = "file" if field == "checkpoint" else "folder"
    fails_then_recovers(server, prompt, node, repr(name), f"is not a {kind} name from the list")


def test_pickled_files_are_refused_without_unpickling(server: ComfyServer, files: TinyFiles, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    ckpt = tmp_path / "legacy.ckpt"
    ckpt.write_bytes(pickle.dumps({"weight": _Trap(marker)}))
    link = server.link_model("diffusion_models", ckpt)
    folder = server.models_dir / "unifusion_vlm" / "pickled-vlm"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(files.vlm, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Trap(marker)}))
    try:
        fails_then_recovers(server, graph(checkpoint=ckpt.name), "model", "is not a safetensors file",
                            "pickled .ckpt/.pt/.bin files are never loaded")
        fails_then_recovers(server, graph(vlm=folder.name), "vlm", "holds only pickled weights",
                            "download the repository's .safetensors files")
    finally:
        link.unlink()
        shutil.rmtree(folder)
    assert not marker.exists()


def test_remote_code_runs_only_when_the_loader_allows_it(server: ComfyServer, files: TinyFiles) -> None:
    folder = server.models_dir / "unifusion_vlm" / "remote-code-vlm"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(files.vlm, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_secret_vlm", auto_map={"AutoModelForImageTextToText": "modeling_secret.SecretVLM"})
    (folder / "config.json").write_text(json.dumps(config))
    try:
        fails_then_recovers(server, graph(vlm=folder.name), "vlm", "needs its own Python code", "trust_remote_code")
    finally:
        shutil.rmtree(folder)
    trusted = graph(seed=77)
    trusted["vlm"]["inputs"]["trust_remote_code"] = True
    server.run(trusted)  # a native VLM loads as before, but the choice is logged
    assert "with trust_remote_code=True: Python code from that folder will run" in server.log_text()
