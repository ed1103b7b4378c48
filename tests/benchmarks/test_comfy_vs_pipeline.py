"""comfy_vs_pipeline.py compares like with like: the pipeline reads its settings from the same API
prompt ComfyUI runs, and both sides turn the same prompt and seed into the same image."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "comfyui"))

from benchmarks import comfy_vs_pipeline as cvp  # noqa: E402
from harness import ComfyServer, require_comfyui  # noqa: E402


def api_prompt() -> dict:
    return {
        "1": {"class_type": "UniFusionEncode", "inputs": {"text": "a red circle", "vlm": ["2", 0]}},
        "3": {"class_type": "ModelSamplingAuraFlow", "inputs": {"shift": 3.0, "model": ["4", 0]}},
        "4": {"class_type": "UniFusionGuidanceInterval", "inputs": {"guidance_min_t": 0.5, "guidance_max_t": 0.8,
                                                                     "model": ["3", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 20, "cfg": 4.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "denoise": 1.0}},
    }


def test_settings_follow_the_api_prompt():
    prompt = api_prompt()
    assert cvp.settings_of(prompt) == cvp.Settings("a red circle", 42, 20, 4.0, 64, 48, 1, 3.0, (0.5, 0.8))
    changed = cvp.with_run(prompt, "a blue square", 7, steps=3, size=(128, 96))
    assert cvp.settings_of(changed) == cvp.Settings("a blue square", 7, 3, 4.0, 128, 96, 1, 3.0, (0.5, 0.8))
    assert prompt == api_prompt()  # the template is left as it was
    kept = cvp.with_run(prompt, "x", 1)
    assert (cvp.settings_of(kept).steps, cvp.settings_of(kept).width) == (20, 64)


def test_other_samplers_are_refused():
    prompt = api_prompt()
    prompt["6"]["inputs"]["scheduler"] = "karras"
    with pytest.raises(ValueError, match="euler / simple"):
        cvp.settings_of(prompt)


def test_workflow_file_is_the_one_compared():
    workflow = json.loads(cvp.WORKFLOW.read_text(encoding="utf-8"))
    types = {node["type"] for node in workflow["nodes"]}
    assert {"UniFusionEncode", "UniFusionLAPPool", "KSampler", "EmptyLatentImage", "ModelSamplingAuraFlow",
            "UniFusionGuidanceInterval"} <= types


def test_both_sides_make_the_same_image(tmp_path: Path):
    comfy_dir = require_comfyui(REPO, "set COMFYUI_DIR=/path/to/ComfyUI to run the workflow in ComfyUI")
    files, _ = cvp.model_files(tmp_path)
    pipe = cvp.UniFusionPipeline.from_files(files["unifusion_vlm"], files["diffusion_models"], files["vae"])
    with ComfyServer(comfy_dir, REPO, tmp_path / "server") as server:
        settings, comfy_runs, pipe_runs = cvp.compare(server, files, pipe, tmp_path / "pipeline", repeats=1, steps=3)
    assert settings.steps == 3 and len(comfy_runs) == len(pipe_runs) == 1
    comfy_image, pipe_image = comfy_runs[0].image, pipe_runs[0].image
    assert comfy_image.shape == pipe_image.shape == (settings.height, settings.width, 3)
    assert comfy_image.std() > 2.0  # not blank
    diff = np.abs(comfy_image.astype(int) - pipe_image.astype(int))
    # ComfyUI's CPU attention kernel differs from SDPA in the last bits: after 3 steps the image is
    # mid-grey noise around 128, where that flips the 8-bit rounding of many values by one level
    # (40% of them with the demo checkpoint); more than one level apart is rare (1.1% of the values,
    # at most 5 levels, with the checkpoint that pools layer 0)
    assert diff.max() <= 8 and (diff > 1).mean() < 0.03, (diff.max(), (diff > 1).mean(), diff.mean())


@pytest.mark.needs_cpp_compiler
def test_the_compile_row_times_torch_compile_model_against_the_eager_model(tmp_path: Path):
    """``--compile``: the in-process breakdown also times ComfyUI's sampling on the MODEL after
    TorchCompileModel's wrapper against the same MODEL eager, and reports their ratio."""
    comfy_dir = require_comfyui(REPO, "set COMFYUI_DIR=/path/to/ComfyUI to import ComfyUI's sampler and compile wrapper")
    files, _ = cvp.model_files(tmp_path)
    pipe = cvp.UniFusionPipeline.from_files(files["unifusion_vlm"], files["diffusion_models"], files["vae"])
    settings = cvp.Settings("a red circle", 1, 2, 4.0, 64, 64, 1, 1.6, (0.5, 0.8))
    rows, compile_rows = cvp.stage_breakdown(comfy_dir, [], files, settings, pipe, repeats=1, compile_model=True)
    assert [row[0] for row in rows] == ["encode + LAP", "sample + decode"]
    [(name, eager, compiled, ratio)] = compile_rows
    assert name == "sample + decode" and eager > 0 and compiled > 0 and ratio == pytest.approx(compiled / eager)
    assert cvp.stage_breakdown(comfy_dir, [], files, settings, pipe, repeats=1)[1] == []  # off by default
