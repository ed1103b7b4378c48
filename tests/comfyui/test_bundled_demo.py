"""The example workflows on the trained demo model that ships in unifusion/demo/assets/.

A server of its own, with nothing linked into its model folders: every name the workflows use
resolves to the bundled files, as on a fresh install. Each workflow runs as saved (20 steps),
and the demo world's scorer reads the shapes back out of the text-to-image result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import ComfyServer
from ui_workflow import ui_to_api
from unifusion.bundled import ASSETS_DIR, DEMO_CHECKPOINT, DEMO_VAE_PATH, DEMO_VLM
from unifusion.demo.scorer import read_scene

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def demo_server(comfy_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    if not all((ASSETS_DIR / name).exists() for name in (DEMO_VLM, DEMO_CHECKPOINT, DEMO_VAE_PATH)):
        pytest.skip("the bundled demo model is not in unifusion/demo/assets (train it with `unifusion train-demo`)")
    with ComfyServer(comfy_dir, REPO_ROOT, tmp_path_factory.mktemp("comfyui_demo")) as server:
        yield server


def _images(server: ComfyServer, entry: dict) -> list[np.ndarray]:
    paths = [p for p in server.output_images(entry) if p.parent == server.output_dir]
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(paths)]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_on_the_bundled_demo(demo_server: ComfyServer, workflow: Path) -> None:
    prompt = ui_to_api(json.loads(workflow.read_text(encoding="utf-8")), demo_server.object_info())
    entry = demo_server.run(prompt)
    images = _images(demo_server, entry)
    assert images and all(i.shape == (64, 64, 3) and i.std() > 2.0 for i in images)
    if workflow.stem == "text_to_image":  # "a red circle at the top left and a blue square in the center"
        # colours are what the demo model gets right most often (`unifusion bench` has the rest)
        found = {s.colour for s in read_scene(images[0]).shapes}
        assert {"red", "blue"} <= found, found
