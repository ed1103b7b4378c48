"""Fixtures for tests that run the pack inside a real ComfyUI.

ComfyUI is found through $COMFYUI_DIR or because the repo sits in ``ComfyUI/custom_nodes/<pack>``;
without either, every test in this folder is skipped. One server is shared by the whole session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from harness import ComfyServer, require_comfyui
from tiny_unifusion import TinyFiles, ensure_tiny_files

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _require_comfyui() -> None:
    require_comfyui(REPO_ROOT)


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    return require_comfyui(REPO_ROOT)


@pytest.fixture(scope="session")
def comfy_server(comfy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """A ComfyUI server with the pack loaded, started once per test session."""
    server = ComfyServer(comfy_dir, REPO_ROOT, tmp_path_factory.mktemp("comfyui"))
    with server:
        yield server


@pytest.fixture(scope="session")
def workflows_dir() -> Path:
    return REPO_ROOT / "workflows"


@pytest.fixture(scope="session")
def files(comfy_server: ComfyServer, tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    """The tiny random model, linked into the shared server under the bundled demo names."""
    return ensure_tiny_files(comfy_server, tmp_path_factory)


@pytest.fixture(scope="session")
def server(comfy_server: ComfyServer, files: TinyFiles) -> ComfyServer:
    """The shared server with the tiny model linked in."""
    return comfy_server
