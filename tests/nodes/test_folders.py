"""VLM folder listing and model-file resolution, bundled demo fallback."""

from __future__ import annotations

import pytest

from node_pack import pack_module

folders = pack_module("nodes.folders")
InputError = pack_module("unifusion.errors").InputError


def _vlm(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_lists_config_folders_follows_links_and_skips_model_subfolders(tmp_path):
    root, other = tmp_path / "root", tmp_path / "elsewhere"
    _vlm(root / "b-vlm")
    _vlm(root / "org" / "a-vlm")
    _vlm(root / "b-vlm" / "sub")  # inside a model: not listed
    (root / "not-a-model").mkdir()
    _vlm(other / "linked-target")
    (root / "linked").symlink_to(other / "linked-target", target_is_directory=True)
    assert folders.list_vlm_folders([root, tmp_path / "missing"]) == ["b-vlm", "linked", "org/a-vlm"]


def test_bundled_is_added_unless_shadowed(tmp_path):
    bundled = _vlm(tmp_path / "demo")
    assert folders.with_bundled(["x"], "demo", bundled) == ["x", "demo"]
    assert folders.with_bundled(["demo"], "demo", bundled) == ["demo"]
    assert folders.with_bundled(["x"], "demo", tmp_path / "absent") == ["x"]


def test_resolve_vlm_prefers_user_folder(tmp_path):
    root = tmp_path / "root"
    user = _vlm(root / "demo")
    bundled = _vlm(tmp_path / "assets" / "demo")
    assert folders.resolve_vlm_folder("demo", [root], "demo", bundled) == user
    assert folders.resolve_vlm_folder("demo", [tmp_path / "empty"], "demo", bundled) == bundled
    with pytest.raises(InputError, match="'gone' was not found"):
        folders.resolve_vlm_folder("gone", [root], "demo", bundled)
    with pytest.raises(InputError, match="not a folder name"):
        folders.resolve_vlm_folder("../demo", [root], "demo", bundled)


def test_resolve_file(tmp_path):
    bundled = tmp_path / "demo.safetensors"
    bundled.write_bytes(b"x")
    assert folders.resolve_file("a.safetensors", "/m/a.safetensors", "demo.safetensors", bundled, "f") \
        .as_posix() == "/m/a.safetensors"
    assert folders.resolve_file("demo.safetensors", None, "demo.safetensors", bundled, "f") == bundled
    with pytest.raises(InputError, match="diffusion_models: 'a.safetensors' was not found"):
        folders.resolve_file("a.safetensors", None, "demo.safetensors", bundled, "diffusion_models")
