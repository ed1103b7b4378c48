"""The decoder precision benchmark: both methods finetune the same model on the same draws."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.decoder_precision import demo_autoencoder, finetune_steps  # noqa: E402
from unifusion.demo.evaluate import scene_pixels  # noqa: E402
from unifusion.demo.world import mixed_scenes  # noqa: E402


def test_the_methods_finetune_the_same_model_on_the_same_draws() -> None:
    images, model = scene_pixels(mixed_scenes(8, 0)), demo_autoencoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses: dict[str, list[float]] = {"float32": [], "bf16": []}
    for name in losses:
        run = finetune_steps(model, images, 1, name == "bf16", losses[name])
        run()
        run()
    assert losses["float32"][0] == losses["float32"][1] and losses["bf16"][0] == losses["bf16"][1]  # same draws
    assert losses["bf16"][0] == pytest.approx(losses["float32"][0], rel=0.05)
    assert losses["bf16"][0] != losses["float32"][0]  # autocast did change the arithmetic
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # each call trains a copy
