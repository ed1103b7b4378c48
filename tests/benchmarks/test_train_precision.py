"""The precision benchmark's training step: the three methods train the same model on the same draws."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.train_precision import demo_model, main, torch_attention, training_step  # noqa: E402
from unifusion.attention import sdpa_attention  # noqa: E402


def test_the_methods_compute_the_same_step_and_learn() -> None:
    losses = {}
    for name, attention, bf16 in (("float32", sdpa_attention, False), ("ours", sdpa_attention, True),
                                  ("torch", torch_attention, True)):
        step = training_step(demo_model(attention), batch=2, cond=4, bf16=bf16)
        losses[name] = [step() for _ in range(4)]
    assert losses["ours"][0] == pytest.approx(losses["float32"][0], rel=0.02)
    assert losses["torch"][0] == pytest.approx(losses["float32"][0], rel=0.02)
    assert losses["ours"] != losses["float32"]  # autocast did change the arithmetic
    assert all(run[-1] < run[0] for run in losses.values())


def test_main_prints_every_method(capsys) -> None:
    threads = torch.get_num_threads()
    try:
        seconds = main(["--batch", "2", "--cond", "4", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)  # main() runs on one thread, like every benchmark
    assert set(seconds) == {"float32", "bf16 autocast", "bf16 autocast, bf16 attention"}
    assert all(s > 0 for s in seconds.values())
    printed = capsys.readouterr().out
    assert "/ float32" in printed and "bf16 autocast, bf16 attention" in printed
