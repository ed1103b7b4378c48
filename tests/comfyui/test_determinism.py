"""Same workflow and seed: bit-identical images on a full re-run and after a server restart;
other seeds give other images. Covers text-to-image, an edit with a reference, and a sampled
Verifi rewrite (its seed drives the rewrite, the sampler's seed the noise).

A full re-run without restarting: the loaders get equivalent settings that ComfyUI's cache
sees as new ("all" layers instead of "paper", fp32 instead of default on CPU), so the files
are loaded again (once, for the first case) and every node after them runs again; the
checkpoint's layers are among "all", so the features the LAP pools are the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness import ComfyServer
from test_nodes import graph, image_of
from tiny_unifusion import ensure_tiny_files

CASES = ("text_to_image", "edit", "verifi_sampled")


def workflow(case: str, seed: int, rerun: bool = False) -> dict:
    prompt = graph(text="a red circle and a blue square", seed=seed, prefix=f"det_{case}",
                   layers="all" if rerun else "paper", weight_dtype="fp32" if rerun else "default")
    if case == "edit":
        prompt["img"] = {"class_type": "EmptyImage",
                         "inputs": {"width": 80, "height": 56, "batch_size": 1, "color": 0xCC3311}}
        prompt["ref"] = {"class_type": "UniFusionReference", "inputs": {"image": ["img", 0], "max_tiles": 2}}
        prompt["enc"]["inputs"].update(text="make it blue", references=["ref", 0])
    if case == "verifi_sampled":
        prompt["enc"] = {"class_type": "UniFusionVerifiRewrite", "inputs": {
            "vlm": ["vlm", 0], "text": "two circles", "system_prompt": "rewrite", "max_new_tokens": 12,
            "seed": seed, "do_sample": True}}
    return prompt


def run(server: ComfyServer, prompt: dict) -> tuple[np.ndarray, str, set[str]]:
    entry = server.run(prompt)
    cached = {n for event, data in entry["status"]["messages"] if event == "execution_cached"
              for n in data.get("nodes", [])}
    text = entry["outputs"]["enc"].get("unifusion_text", [""])[0]
    return image_of(server, entry), text, set(prompt) - cached


@pytest.fixture(scope="module")
def first_runs(server: ComfyServer) -> dict[str, tuple[np.ndarray, str]]:
    results = {}
    for case in CASES:
        image, text, _ = run(server, workflow(case, seed=21))
        results[case] = (image, text)
    return results


@pytest.mark.parametrize("case", CASES)
def test_full_rerun_is_bit_identical(server: ComfyServer, first_runs: dict, case: str) -> None:
    prompt = workflow(case, seed=21, rerun=True)
    image, text, executed = run(server, prompt)
    assert {"enc", "lap", "ks", "dec"} <= executed, "encode, pool and sampler should run again"
    assert np.array_equal(image, first_runs[case][0])
    assert text == first_runs[case][1]


@pytest.mark.parametrize("case", CASES)
def test_other_seed_gives_another_image(server: ComfyServer, first_runs: dict, case: str) -> None:
    image, text, _ = run(server, workflow(case, seed=22))
    assert np.abs(image.astype(int) - first_runs[case][0].astype(int)).mean() > 1.0
    if case == "verifi_sampled":
        assert image.std() > 2.0


def test_bit_identical_after_a_server_restart(comfy_dir: Path, first_runs: dict,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    repo = Path(__file__).resolve().parents[2]
    with ComfyServer(comfy_dir, repo, tmp_path_factory.mktemp("comfyui_restart")) as fresh:
        ensure_tiny_files(fresh, tmp_path_factory)
        for case in CASES:
            image, text, _ = run(fresh, workflow(case, seed=21))
            assert np.array_equal(image, first_runs[case][0]), case
            assert text == first_runs[case][1], case
