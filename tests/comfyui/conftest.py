"""Fixtures for tests that run the pack inside a real ComfyUI.

ComfyUI is found through $COMFYUI_DIR or because the repo sits in ``ComfyUI/custom_nodes/<pack>``;
without either, every test in this folder is skipped. One server is shared by the whole session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from harness import SKIP_REASON, ComfyServer, ComfyUINotFound, find_comfyui

REPO_ROOT = Path(__file__).resolve().parents[2]


def _comfy_dir() -> Path | None:
    try:
        return find_comfyui(REPO_ROOT)
    except ComfyUINotFound as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(autouse=True)
def _require_comfyui() -> None:
    if _comfy_dir() is None:
        pytest.skip(SKIP_REASON)


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    path = _comfy_dir()
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture(scope="session")
def comfy_server(comfy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """A ComfyUI server with the pack loaded, started once per test session."""
    server = ComfyServer(comfy_dir, REPO_ROOT, tmp_path_factory.mktemp("comfyui"))
    with server:
        yield server


@pytest.fixture(scope="session")
def workflows_dir() -> Path:
    return REPO_ROOT / "workflows"
