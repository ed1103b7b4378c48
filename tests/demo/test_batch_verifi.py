"""Batched greedy Verifi equals `verifi_rewrite` row by row: text, kept tokens, masks, features."""

from __future__ import annotations

import pytest
import torch

from unifusion.demo.batch_verifi import verifi_rewrite_batch
from unifusion.demo.grammar import sample_edits, sample_t2i
from unifusion.demo.vlm_training import demo_vocab
from unifusion.demo.world import render
from unifusion.errors import InputError
from unifusion.vlm.loader import load_vlm
from unifusion.vlm.tiny import build_tiny_vlm
from unifusion.vlm.verifi import eos_token_ids, verifi_rewrite

MAX_NEW = 10


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    folder = build_tiny_vlm(tmp_path_factory.mktemp("bv"), "internvl", seed=1, vocab=demo_vocab(), num_layers=4,
                            hidden_size=32, image_size=64)
    vlm = load_vlm(folder)
    # Make the end-of-turn token a strong but state-dependent candidate, so rows stop at
    # different steps (some at once: the no-token fallback is covered too).
    eos = eos_token_ids(vlm)[0]
    with torch.no_grad():
        head = vlm.model.lm_head.weight
        head[eos] = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(3)) * head.norm(dim=1).mean() * 6
    return vlm


def _inputs():
    t2i, edits = sample_t2i(5, 0), sample_edits(4, 0)
    texts = [s.caption for s in t2i] + [e.instruction for e in edits] + [""]
    images = [[] for _ in t2i] + [[render(e.source)] for e in edits] + [[render(t2i[0].scene)]]
    return texts, images


def test_batch_equals_one_by_one(vlm):
    texts, images = _inputs()
    batch = verifi_rewrite_batch(vlm, texts, images, max_new_tokens=MAX_NEW, max_tiles=1)
    counts = set()
    for text, pics, ours in zip(texts, images, batch):
        ref = verifi_rewrite(vlm, text, pics, max_new_tokens=MAX_NEW, max_tiles=1)
        assert (ours.text, ours.generated_token_count, ours.finished) == (ref.text, ref.generated_token_count,
                                                                          ref.finished)
        assert torch.equal(ours.token_ids, ref.token_ids)
        for name in ("input_ids", "attention_mask", "is_image", "keep", "is_system", "is_instruction", "is_template"):
            assert torch.equal(getattr(ours.features, name), getattr(ref.features, name)), name
        torch.testing.assert_close(ours.features.features, ref.features.features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.features.frame_positions, ref.features.frame_positions, equal_nan=True)
        counts.add(ours.generated_token_count)
    assert len(counts) >= 3, f"rows should stop at different steps, got kept counts {counts}"


def test_batch_checks_its_inputs(vlm):
    with pytest.raises(InputError, match="one image list per text"):
        verifi_rewrite_batch(vlm, ["a red circle", "a blue square"], [[]])
