"""encode(): features equal a reference forward, the paper's keep rule, batching, limits, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from unifusion.errors import InputError
from unifusion.vlm.encode import VLMFeatures, encode
from unifusion.vlm.loader import load_vlm
from unifusion.vlm.prompt import build_prompt, images_then_text

PROMPT = "A red cat on the left, two blue dogs."
SYSTEM = "Describe the image in a detailed prompt."


def _image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _words(text):
    return text.lower().replace(",", " ,").replace(".", " .").split()


def test_features_match_hidden_states(tiny_vlm):
    """Hooked states equal output_hidden_states of the full model (LM head included) for k < num_layers."""
    image = _image(90, 60)
    feats = encode(tiny_vlm, PROMPT, images=[image], max_tiles=2, system_prompt=SYSTEM)
    assert feats.features.shape[2:] == (2, 64) and feats.layers == (4, 7)
    prompt = build_prompt(tiny_vlm, [image, PROMPT], system_prompt=SYSTEM, add_generation_prompt=False,
                          max_tiles=2)
    with torch.no_grad():
        out = tiny_vlm.model(**prompt.model_kwargs(), output_hidden_states=True, use_cache=False)
    reference = torch.stack([out.hidden_states[k] for k in feats.layers], dim=2)
    torch.testing.assert_close(feats.features, reference, atol=1e-5, rtol=0)
    assert torch.equal(feats.input_ids, prompt.input_ids)


def test_keep_rule_and_condition_tokens(tiny_vlm):
    image = _image(70, 70)
    feats = encode(tiny_vlm, PROMPT, images=[image], max_tiles=1, system_prompt=SYSTEM)
    keep, ids = feats.keep[0], feats.input_ids[0]
    assert torch.equal(keep, feats.is_image[0] | feats.is_instruction[0])
    assert not (keep & (feats.is_system[0] | feats.is_template[0])).any()
    text_kept = keep & ~feats.is_image[0]
    assert tiny_vlm.tokenizer.decode(ids[text_kept]).split() == _words(PROMPT)
    assert feats.text == [PROMPT]
    tokens, mask = feats.condition_tokens()
    assert tokens.shape == (1, int(keep.sum()), 2, 64) and mask.all()
    torch.testing.assert_close(tokens[0], feats.features[0][keep])


def test_condition_tokens_compact_left_with_padding():
    features = torch.arange(2 * 5 * 1 * 2, dtype=torch.float32).reshape(2, 5, 1, 2)
    keep = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    attention = torch.tensor([[True] * 5, [True, True, True, False, False]])
    feats = VLMFeatures(features, attention, torch.zeros_like(keep), keep, torch.zeros(2, 5, dtype=torch.long),
                        ["a", "b"])
    tokens, mask = feats.condition_tokens()
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(tokens[0], features[0, [1, 3, 4]])
    assert torch.equal(tokens[1, 0], features[1, 0]) and not tokens[1, 1:].any()


def test_batch_equals_single_prompts(tiny_vlm):
    images = [[_image(80, 50, 1)], []]
    batch = encode(tiny_vlm, [PROMPT, "one green star"], images=images, max_tiles=[1])
    assert batch.batch_size == 2 and batch.attention_mask.sum(1)[0] > batch.attention_mask.sum(1)[1]
    singles = [encode(tiny_vlm, PROMPT, images=images[0], max_tiles=1), encode(tiny_vlm, "one green star")]
    for b, single in enumerate(singles):
        n = single.features.shape[1]
        torch.testing.assert_close(batch.features[b, :n], single.features[0], atol=1e-5, rtol=0)
        assert torch.equal(batch.keep[b, :n], single.keep[0]) and not batch.keep[b, n:].any()
    tokens, mask = batch.condition_tokens()
    assert mask.sum(1).tolist() == [int(s.keep.sum()) for s in singles]


def test_image_only_and_interleaved_content(tiny_vlms):
    vlm = tiny_vlms["qwen3_vl"]
    only = encode(vlm, images=[_image(64, 64)], max_tiles=1)
    assert only.keep.sum() == only.is_image.sum() > 0
    comfy_batch = torch.rand(2, 48, 48, 3)  # a ComfyUI IMAGE batch counts as two images
    feats = encode(vlm, content=["put", comfy_batch, "on the left"], max_tiles=1)
    starts = (feats.input_ids[0] == vlm.model.config.vision_start_token_id).sum()
    assert starts == 2
    assert vlm.tokenizer.decode(feats.input_ids[0][feats.is_instruction[0]]).split() == "put on the left".split()


def test_several_references_reach_the_vlm_labelled(tiny_vlm):
    """Images passed beside the text are labelled when there are several: the same features as the
    labelled content given explicitly; the user text stays the prompt alone."""
    pictures = [_image(64, 64, 1), _image(64, 64, 2)]
    text = "put the shape from image 2 on the left"
    feats = encode(tiny_vlm, text, images=pictures, max_tiles=1)
    explicit = encode(tiny_vlm, content=images_then_text(pictures, text), max_tiles=1)
    assert torch.equal(feats.input_ids, explicit.input_ids)
    torch.testing.assert_close(feats.features, explicit.features)
    assert feats.text == [text]
    one = encode(tiny_vlm, text, images=pictures[:1], max_tiles=1)
    # The labels are the pack's, not the instruction: the DiT keeps the same text tokens as with one image.
    assert torch.equal(feats.input_ids[0][feats.is_instruction[0]], one.input_ids[0][one.is_instruction[0]])
    kept = feats.keep[0] & ~feats.is_image[0]
    assert torch.equal(feats.input_ids[0][kept], one.input_ids[0][one.keep[0] & ~one.is_image[0]])


def test_empty_prompt_is_an_error(tiny_vlms):
    vlm = tiny_vlms["internvl"]
    for text in ("", "   ", None):
        with pytest.raises(InputError, match="empty"):
            encode(vlm, text)
    with pytest.raises(InputError, match="empty"):
        encode(vlm, ["a cat", ""])
    with pytest.raises(InputError, match="not both"):
        encode(vlm, "a cat", content=["a dog"])
    with pytest.raises(InputError, match="one per prompt"):
        encode(vlm, ["a cat", "a dog"], images=[_image(40, 40)])


def test_long_prompt_is_truncated_with_warning(tiny_vlms, caplog):
    vlm = tiny_vlms["qwen2_5_vl"]
    words = ("red circle left " * 30).split()
    full = encode(vlm, " ".join(words))
    assert full.features.shape[1] > 40
    with caplog.at_level(logging.WARNING, logger="unifusion.vlm.prompt"):
        cut = encode(vlm, " ".join(words), max_length=40)
    assert "over the limit of 40" in caplog.text
    assert cut.features.shape[1] == 40
    kept = vlm.tokenizer.decode(cut.input_ids[0][cut.keep[0]]).split()
    assert 0 < len(kept) < len(words) and kept == words[: len(kept)]
    assert vlm.tokenizer.convert_ids_to_tokens(int(cut.input_ids[0, -1])) == "<|im_end|>"  # template intact
    n = int(cut.keep[0].nonzero().max()) + 1
    torch.testing.assert_close(cut.features[0, :n], full.features[0, :n], atol=1e-5, rtol=0)  # causal prefix
    with pytest.raises(InputError, match="fewer images or a smaller max_tiles"):
        encode(vlm, "a cat", images=[_image(400, 400)], max_tiles=1, max_length=40)


def test_progress_and_dtype(tiny_dirs):
    vlm = load_vlm(tiny_dirs["internvl"], dtype=torch.bfloat16)
    seen = []
    feats = encode(vlm, PROMPT, images=[_image(50, 50)], max_tiles=1, progress=lambda d, t: seen.append((d, t)))
    assert feats.features.dtype == torch.bfloat16 and seen[-1] == (8, 8)
    moved = feats.to(dtype=torch.float32)
    assert moved.features.dtype == torch.float32 and moved.keep.dtype == torch.bool


def test_condition_positions_follow_the_kept_tokens(tiny_vlms):
    """Positions come out in the order of `condition_tokens`: the image's tokens with their places,
    the text and the padding without."""
    vlm = tiny_vlms["internvl"]
    feats = encode(vlm, ["a red circle", "two"], images=[[_image(64, 64)], []], max_tiles=1)
    tokens, mask = feats.condition_tokens()
    places = feats.condition_positions()
    assert places.shape == (*mask.shape, 2)
    placed = torch.isfinite(places).all(dim=-1)
    assert placed[0].sum() == 16 and not placed[1].any() and not placed[~mask].any()
    kept = feats.keep[0] & feats.attention_mask[0]
    torch.testing.assert_close(places[0][: int(kept.sum())], feats.frame_positions[0][kept], equal_nan=True)
    bare = VLMFeatures(feats.features, feats.attention_mask, feats.is_image, feats.keep, feats.input_ids, feats.text)
    assert torch.isnan(bare.condition_positions()).all()
