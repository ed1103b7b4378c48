"""forced_batch.py times like with like: its rows mix prompts with and without a reference image,
and its batched way gives the one-by-one way's features."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import forced_batch  # noqa: E402
from unifusion.vlm.loader import load_vlm  # noqa: E402


def test_rows_spread_the_edits_through_the_batches():
    rows = forced_batch.demo_rows(8)
    assert len(rows) == 8 and all(text and answer for text, answer, _ in rows)
    with_image = [i for i, (_, _, images) in enumerate(rows) if images]
    assert len(with_image) == 2 and with_image != [6, 7]  # not all at the end


def test_batched_equals_one_by_one_on_the_demo_vlm():
    vlm = load_vlm(forced_batch.ASSETS_DIR / forced_batch.DEMO_VLM)
    rows = forced_batch.demo_rows(8)
    batched, single = forced_batch.batched(vlm, rows, 4), forced_batch.one_by_one(vlm, rows)
    assert [r.text for r in batched] == [r.text for r in single]
    for ours, theirs in zip(batched, single):
        torch.testing.assert_close(ours.features.features, theirs.features.features, atol=1e-4, rtol=0)
