"""The learned-condition diagnostic: its tokens, a short run that learns, and its command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unifusion.demo.condition_oracle import (LearnedCondition, format_rows, main, scored_attributes, shape_tokens,
                                             train_and_score, word_tokens)
from unifusion.demo.grammar import VOCAB, T2ISample, detailed, words
from unifusion.demo.recipe import quick_recipe
from unifusion.demo.world import Scene, Shape
from unifusion.vae import TinyAutoencoder


def _sample() -> T2ISample:
    scene = Scene((Shape("blue", "triangle", "large", 2, 1), Shape("red", "circle", "small", 0, 0)))
    return T2ISample(scene, "a red circle and a blue triangle", detailed(scene), ("colour", "kind", "count"),
                     detailed(scene))


def test_shape_tokens_bind_each_shapes_attributes() -> None:
    ids, mask = shape_tokens([_sample()])
    assert mask.tolist() == [[True, True, False]]
    # colours 0-5, kinds 6-9, sizes 10-11, cells 12-20; shapes in row-major cell order
    assert ids[0, 0].tolist() == [0, 6, 10, 12] and ids[0, 1].tolist() == [2, 8, 11, 12 + 7]


def test_word_tokens_follow_the_text() -> None:
    ids, mask = word_tokens(["a red circle", "two shapes: a blue square."])
    assert mask.sum(dim=1).tolist() == [3, 7] and not mask[0, 3:].any()
    assert [VOCAB[i - 1] for i in ids[1].tolist()] == ["two", "shapes", ":", "a", "blue", "square", "."]


def test_condition_kinds_and_scored_attributes() -> None:
    sample = _sample()
    caption, full = LearnedCondition("caption", 8)([sample]), LearnedCondition("detailed", 8)([sample])
    assert caption[0].shape == (1, 7, 8) and full[0].shape == (1, len(words(sample.detailed)), 8)
    assert scored_attributes("caption", sample) == sample.mentions
    assert "position" in scored_attributes("detailed", sample)
    with pytest.raises(ValueError, match="unknown condition"):
        LearnedCondition("pixels", 8)


def test_a_short_run_learns_and_scores() -> None:
    torch.manual_seed(0)
    vae = TinyAutoencoder(latent_channels=4, width=8).eval()
    recipe = quick_recipe()
    row = train_and_score("shapes", vae, recipe, steps=40, samples=16, count=2)
    assert row["loss_last"] < row["loss_first"]
    assert {"colour", "kind", "size", "position", "count", "exact"} <= set(row) and row["seconds"] > 0
    table = format_rows({"shapes": row})
    assert table.splitlines()[2].startswith("| shapes | ")
    with pytest.raises(ValueError, match="must be >= 1"):
        train_and_score("shapes", vae, recipe, steps=0)


def test_command_line_reports_a_missing_autoencoder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--vae", str(tmp_path / "none.safetensors"), "--steps", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
