"""Forced Verifi answers for a feature cache: one forward per record against one padded forward per batch.

`build_cache` forces each record's own rewrite as the VLM's answer (`forced_rewrite`). Both ways run
side by side in one process on the same records (the demo world's text-to-image captions with their
detailed scenes as answers, a quarter of them single-reference edits with their source image):

- ``one by one``: `forced_rewrite` per record;
- ``batched``: `forced_rewrite_batch` over ``--batch`` records at once, what the cache builds with.

Each figure is the median CPU seconds of ``--repeats`` timed runs over all records after one warm-up,
the two ways interleaved. Ratio: one by one / batched, no goal: on the demo VLM the forward itself
dominates either way (a long system prompt, 12 layers), so batching saves the per-call overhead only
(1.35 with the defaults: 128 records, batch 64, one thread, median of 3). The batched rows are
checked against the one-by-one rows first (same states to 1e-4).

Run: ``python benchmarks/forced_batch.py [--records 128] [--batch 64] [--repeats 3] [--vlm FOLDER]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import interleaved, log_lines, median, setup, table  # noqa: E402
from unifusion.bundled import ASSETS_DIR, DEMO_VLM  # noqa: E402
from unifusion.demo.grammar import sample_edits, sample_t2i  # noqa: E402
from unifusion.demo.world import render  # noqa: E402
from unifusion.vlm.loader import LoadedVLM, load_vlm  # noqa: E402
from unifusion.vlm.verifi import forced_rewrite, forced_rewrite_batch  # noqa: E402

MAX_NEW_TOKENS = 48  # the demo recipe's verifi_max_new_tokens


def demo_rows(count: int) -> list[tuple[str, str, list[Any]]]:
    """(prompt, forced answer, reference images): 3 in 4 text-to-image, 1 in 4 edits."""
    edits = sample_edits(count // 4, seed=1, split="train")
    t2i = sample_t2i(count - len(edits), seed=0, split="train")
    rows = [(s.caption, s.detailed, []) for s in t2i] + [(e.instruction, e.detailed, [render(e.source)]) for e in edits]
    return [rows[i] for i in sorted(range(len(rows)), key=lambda i: i % 4)]  # edits spread through the batches


def one_by_one(vlm: LoadedVLM, rows: Sequence[tuple[str, str, list[Any]]]) -> list[Any]:
    return [forced_rewrite(vlm, text, answer, images, max_tiles=6, max_new_tokens=MAX_NEW_TOKENS)
            for text, answer, images in rows]


def batched(vlm: LoadedVLM, rows: Sequence[tuple[str, str, list[Any]]], batch: int) -> list[Any]:
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start: start + batch]
        out += forced_rewrite_batch(vlm, [r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk],
                                    max_tiles=6, max_new_tokens=MAX_NEW_TOKENS)
    return out


def check_same(vlm: LoadedVLM, rows: Sequence[tuple[str, str, list[Any]]], batch: int) -> None:
    for ours, theirs in zip(batched(vlm, rows, batch), one_by_one(vlm, rows)):
        torch.testing.assert_close(ours.features.features, theirs.features.features, atol=1e-4, rtol=0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vlm", type=Path, default=ASSETS_DIR / DEMO_VLM, help="VLM folder (default: the demo's)")
    args = parser.parse_args(argv)
    setup(args.threads)
    vlm = load_vlm(args.vlm)
    rows = demo_rows(args.records)
    check_same(vlm, rows[: min(len(rows), 16)], 8)
    with torch.inference_mode():
        times = interleaved({"one by one": lambda: one_by_one(vlm, rows),
                             "batched": lambda: batched(vlm, rows, args.batch)}, args.repeats)
    single, batch = median(times["one by one"]), median(times["batched"])
    ratio = single / batch
    log_lines(table(["way", "CPU s", "records/s"], [("one by one", single, len(rows) / single),
                                                    (f"batched ({args.batch})", batch, len(rows) / batch)]))
    log_lines([f"one by one / batched: {ratio:.2f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
