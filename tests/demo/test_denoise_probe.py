"""The one-step probe: a perfect velocity gives back the autoencoder's own reading at every noise
level, and the shipped DiT draws the colour it is asked for from a lightly noised latent."""

from __future__ import annotations

import pytest
import torch

from unifusion.demo.denoise_probe import format_scores, main, one_step_scores
from unifusion.demo.evaluate import scene_pixels
from unifusion.demo.grammar import sample_t2i
from unifusion.demo.scorer import mean_scores, score_scene
from unifusion.demo.world import SPLIT_SEEDS


def test_a_perfect_velocity_scores_the_autoencoders_reading_at_every_level(pipe, monkeypatch) -> None:
    count, times = 3, (0.3, 0.95)
    samples = sample_t2i(count, SPLIT_SEEDS["test"], "all")
    with torch.no_grad():
        x0 = pipe.vae.encode(scene_pixels([s.scene for s in samples]))
        clean = mean_scores(score_scene(s.scene, img, s.mentions) for s, img in zip(samples, pipe.vae.decode(x0)))
    calls = []

    def true_velocity(x, t, context, context_mask):  # the probe visits caption by caption, level by level
        target = x0[len(calls) // len(times)][None]
        calls.append(float(t))
        return (x - (1 - t) * target) / t - target

    monkeypatch.setattr(pipe.model, "forward", true_velocity)
    scores = one_step_scores(pipe, count=count, times=times)
    assert calls == pytest.approx([t for _ in range(count) for t in times])
    for t in times:
        assert scores[t] == pytest.approx(clean, abs=1e-6)


def test_the_shipped_dit_draws_the_named_colour_from_a_lightly_noised_latent(pipe) -> None:
    scores = one_step_scores(pipe, count=6, times=(0.2,))
    assert scores[0.2]["colour"] >= 0.9  # 100% over the 48 benchmark captions
    table = format_scores(scores)
    assert table.splitlines()[0] == "| t | colour | kind | size | position | count | exact |"
    assert table.splitlines()[2].startswith("| 0.2 | ")


def test_bad_arguments_are_refused(pipe) -> None:
    with pytest.raises(ValueError, match="count must be >= 1"):
        one_step_scores(pipe, count=0)
    with pytest.raises(ValueError, match=r"noise level in \(0, 1\]"):
        one_step_scores(pipe, count=1, times=(0.0,))


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys) -> None:
    assert main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
