"""The compile benchmark's setup: a demo-shaped cache, and two trainers that differ in compile alone."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.train_compile import demo_shaped_cache, trainers  # noqa: E402
from unifusion.demo.recipe import DemoRecipe  # noqa: E402
from unifusion.train.cache import FeatureCache  # noqa: E402


@pytest.mark.needs_cpp_compiler
def test_the_two_trainers_differ_in_compile_alone(tmp_path: Path) -> None:
    cache_dir = demo_shaped_cache(tmp_path, samples=8)
    cache = FeatureCache(cache_dir)
    recipe = DemoRecipe()
    assert cache.indices(("edit",)) and cache.key.has_verifi and cache.key.has_recon
    assert cache.feature_shape == (len(recipe.vlm_layers), recipe.vlm.hidden_size)
    runs = trainers(cache_dir, "edit", tmp_path / "runs")
    eager, compiled = (asdict(runs[name].config) for name in ("eager", "compiled"))
    assert {k for k in eager if eager[k] != compiled[k]} == {"compile"}
    assert eager["steps"] == max(recipe.edit_steps) and eager["stage"] == "mixed"
    assert runs["eager"].forward is runs["eager"].module and runs["compiled"].forward is not runs["compiled"].module
    for (name, a), b in zip(runs["eager"].model.state_dict().items(), runs["compiled"].model.state_dict().values()):
        assert torch.equal(a, b), name  # the same seeded init
