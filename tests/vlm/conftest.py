"""Session fixtures: one tiny random VLM folder per supported family, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from unifusion.vlm.tiny import FAMILIES, build_tiny_vlm


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {family: build_tiny_vlm(root / family, family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="session", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs: dict[str, Path], family: str) -> Path:
    return tiny_dirs[family]


@pytest.fixture(scope="session")
def tiny_vlms(tiny_dirs: dict[str, Path]) -> dict:
    """Loaded once per session; tests must not modify them."""
    from unifusion.vlm.loader import load_vlm

    return {family: load_vlm(path) for family, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def tiny_vlm(tiny_vlms: dict, family: str):
    return tiny_vlms[family]
