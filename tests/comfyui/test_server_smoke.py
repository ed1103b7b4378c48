"""The pack loads in a real ComfyUI and the server answers."""

from __future__ import annotations

from harness import IMPORT_FAILED, PACK_NAME, ComfyServer

PACK_MODULE = f"custom_nodes.{PACK_NAME}"
NODE_ID_PREFIX = "UniFusion"


def test_pack_imports_without_error(comfy_server: ComfyServer) -> None:
    line = comfy_server.pack_import_line()
    assert line is not None, f"ComfyUI never tried to import the pack\n{comfy_server.log_tail()}"
    assert IMPORT_FAILED not in line, f"{line}\n{comfy_server.log_tail(120)}"
    log = comfy_server.log_text()
    assert f"Cannot import {comfy_server.base_dir / 'custom_nodes' / PACK_NAME}" not in log
    assert "Error while calling comfy_entrypoint in" not in log, comfy_server.log_tail(120)


def test_object_info_lists_core_and_pack_nodes(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    for core in ("KSampler", "VAELoader", "VAEDecode", "SaveImage", "ModelSamplingAuraFlow"):
        assert core in info, f"core node {core} missing from /object_info"
    ours = sorted(name for name, node in info.items() if node.get("python_module") == PACK_MODULE)
    wrong = [name for name in ours if not name.startswith(NODE_ID_PREFIX)]
    assert not wrong, f"pack node ids must start with {NODE_ID_PREFIX!r}: {wrong}"


def test_system_stats_reports_cpu(comfy_server: ComfyServer) -> None:
    stats = comfy_server.get("/system_stats")
    assert stats["system"]["comfyui_version"]
    assert [d["type"] for d in stats["devices"]] == ["cpu"]
