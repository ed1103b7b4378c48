"""Fixtures of the demo tests."""

from __future__ import annotations

import pytest

from unifusion.bundled import ASSETS_DIR, DEMO_CHECKPOINT, DEMO_VAE_PATH, DEMO_VLM
from unifusion.pipeline import UniFusionPipeline


@pytest.fixture(scope="module")
def pipe() -> UniFusionPipeline:
    """The bundled demo model, as the probes load it by default."""
    return UniFusionPipeline.from_files(ASSETS_DIR / DEMO_VLM, ASSETS_DIR / DEMO_CHECKPOINT, ASSETS_DIR / DEMO_VAE_PATH)
