"""The precision benchmark's training step: the methods train the same model on the same draws."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.train_precision import demo_model, flux_matrix_rope, main, torch_attention, training_step  # noqa: E402
from benchmarks.train_precision import with_rope  # noqa: E402
import unifusion.attention as attention  # noqa: E402
from unifusion.attention import apply_rope, rope_frequencies, sdpa_attention  # noqa: E402


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_gives_flux_matrix_bits_forward_and_backward(dtype):
    """Same float32 arithmetic as the matrix form, so swapping it in leaves trained weights unchanged."""
    torch.manual_seed(5)
    freqs = rope_frequencies(torch.randint(0, 9, (2, 11, 3)).float(), (4, 6, 6), 100.0)
    grad = torch.randn(2, 3, 11, 16, dtype=dtype)
    outs = []
    for fn in (lambda x: apply_rope(x, x, freqs)[0], lambda x: flux_matrix_rope(x, freqs)):
        x = torch.randn(2, 3, 11, 16, generator=torch.Generator().manual_seed(6)).to(dtype).requires_grad_(True)
        y = fn(x)
        y.backward(grad)
        outs.append((y.detach(), x.grad))
    assert outs[0][0].dtype == dtype
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_flux_matrix_rope_row_trains_the_same_bits_and_restores_ours() -> None:
    ours_rope = attention._apply_rope1
    steps = [training_step(demo_model(sdpa_attention), batch=2, cond=4, bf16=True),
             with_rope(flux_matrix_rope, training_step(demo_model(sdpa_attention), batch=2, cond=4, bf16=True))]
    assert [steps[0]() for _ in range(3)] == [steps[1]() for _ in range(3)]
    assert attention._apply_rope1 is ours_rope


@pytest.mark.needs_cpp_compiler
def test_compiled_row_trains_the_same_model_to_within_rounding() -> None:
    """The torch.compile row measures the same step: same model, draws and losses up to kernel rounding."""
    eager = training_step(demo_model(sdpa_attention), batch=2, cond=4, bf16=True)
    compiled = training_step(demo_model(sdpa_attention), batch=2, cond=4, bf16=True, compile=True)
    losses = [[step() for _ in range(3)] for step in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    assert losses[1][-1] < losses[1][0]


def test_main_prints_every_method(capsys) -> None:
    threads = torch.get_num_threads()
    try:
        seconds = main(["--batch", "2", "--cond", "4", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)  # main() runs on one thread, like every benchmark
    assert set(seconds) == {"float32", "bf16 autocast", "bf16 autocast, bf16 attention",
                            "bf16 autocast, FLUX matrix RoPE"}
    assert all(s > 0 for s in seconds.values())
    printed = capsys.readouterr().out
    assert "/ float32" in printed and "bf16 autocast, bf16 attention" in printed
    assert "FLUX matrix RoPE / ours" in printed
