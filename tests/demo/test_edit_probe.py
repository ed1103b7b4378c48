"""The edit probe: the forced true rewrite names the target (so the probe measures the DiT alone on that
path), the plain path has no rewrite, and the shipped DiT draws the forced rewrite of an edit."""

from __future__ import annotations

import math

import pytest

from unifusion.demo.edit_probe import PATHS, names_target, edit_path_scores, format_scores, main
from unifusion.demo.grammar import parse_detailed


@pytest.fixture(scope="module")
def scores(pipe):
    return edit_path_scores(pipe, count=8)  # sources of 1, 2 and 3 shapes


def test_each_condition_is_scored_on_the_same_edits(scores) -> None:
    assert tuple(scores) == PATHS
    assert math.isnan(scores["plain"]["rewrite"])  # no rewrite on the plain path
    assert scores["verifi_true"]["rewrite"] == 1.0  # the forced answer is the target's own description
    for row in scores.values():
        assert 0.0 <= row["success"] <= 1.0 and 0.0 <= row["identity"] <= 1.0
        assert not any(math.isnan(row[f"shapes_{n}"]) for n in (1, 2, 3))


def test_the_shipped_dit_draws_the_true_rewrite_of_an_edit(scores) -> None:
    # 7 of these 8 (97% of 96 test edits, identity 99%); the VLM's own rewrites 1 of 8 (35% of 96)
    assert scores["verifi_true"]["success"] >= 0.75
    assert scores["verifi_true"]["success"] >= scores["verifi"]["success"]
    assert scores["verifi"]["rewrite"] > 0  # the VLM rewrites the one-shape edit among them right


def test_a_rewrite_is_read_as_the_vlm_decodes_it() -> None:
    target = parse_detailed("one shape: a small red triangle in the bottom left.")
    assert names_target("one shape : a small red triangle in the bottom left .", target) == 1.0
    assert names_target("one shape : a large red triangle in the bottom left .", target) == 0.0
    assert names_target("not a scene", target) == 0.0
    assert math.isnan(names_target(None, target))


def test_the_table_marks_what_does_not_apply(scores) -> None:
    lines = format_scores(scores).splitlines()
    assert lines[0].startswith("| condition | exact | identity | rewrite names the target |")
    plain = next(line for line in lines if line.startswith("| plain |"))
    assert plain.split(" | ")[3] == "-"
    assert len(lines) == 2 + len(PATHS)


def test_bad_counts_and_missing_files_are_refused(pipe, tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="count must be >= 1"):
        edit_path_scores(pipe, count=0)
    assert main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
