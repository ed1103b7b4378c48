"""The word probe: the shipped DiT reads the colour word, and a DiT blind to its condition gains nothing."""

from __future__ import annotations

import pytest
import torch

from unifusion.demo.word_probe import format_gains, word_swap_gains
from unifusion.pipeline import UniFusionPipeline


def test_the_shipped_dit_reads_the_colour_word(pipe: UniFusionPipeline) -> None:
    gains = word_swap_gains(pipe, scenes=3, draws=4, times=(0.9,))
    assert set(gains) == {"colour", "kind", "size"}
    assert gains["colour"][0.9] > 0.05  # 0.35 over 12 scenes and 16 draws
    table = format_gains(gains)
    assert table.splitlines()[0] == "| word swapped | t = 0.9 |" and "| colour | " in table


def test_a_dit_that_ignores_its_condition_gains_nothing(pipe: UniFusionPipeline, monkeypatch) -> None:
    dit = pipe.model.dit
    blind = lambda x, t, context, context_mask: dit(x, t, torch.zeros_like(context), context_mask)  # noqa: E731
    monkeypatch.setattr(pipe.model, "forward", blind)
    gains = word_swap_gains(pipe, scenes=2, draws=2, times=(0.5, 0.9), attributes=("colour", "kind"))
    assert all(g == pytest.approx(0.0, abs=1e-9) for row in gains.values() for g in row.values())


def test_bad_arguments_are_refused(pipe: UniFusionPipeline) -> None:
    with pytest.raises(ValueError, match="attributes must come from"):
        word_swap_gains(pipe, attributes=("texture",))
    with pytest.raises(ValueError, match="draws must be >= 1"):
        word_swap_gains(pipe, draws=0)


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys) -> None:
    from unifusion.demo.word_probe import main

    assert main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
