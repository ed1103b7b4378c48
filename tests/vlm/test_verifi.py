"""Verifi: the states captured during one generate pass equal a fresh forward over the whole
sequence, for greedy and seeded sampling, with the right keep mask and no leaked hooks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from unifusion.errors import InputError
from unifusion.vlm.layers import LayerCapture
from unifusion.vlm.loader import load_vlm
from unifusion.vlm.prompt import build_prompt
from unifusion.vlm.verifi import (DEFAULT_SYSTEM_PROMPT, eos_token_ids, forced_rewrite, forced_rewrite_batch, kept_count,
                                  verifi_rewrite)

N = 6


@pytest.fixture(scope="module")
def vlms(tiny_dirs):
    return {family: load_vlm(path) for family, path in tiny_dirs.items()}


@pytest.fixture(scope="module")
def picture():
    pixels = (np.random.default_rng(0).random((200, 280, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels)


def fresh_states(vlm, result, images=(), system_prompt=DEFAULT_SYSTEM_PROMPT, max_tiles=2):
    """Reference: one uncached forward of the base model over prompt + kept tokens."""
    prompt = build_prompt(vlm, list(images) + ["a red circle"], system_prompt=system_prompt, max_tiles=max_tiles)
    ids = result.features.input_ids
    assert torch.equal(ids[:, : prompt.input_ids.shape[1]], prompt.input_ids)
    kwargs = dict(prompt.image_inputs)
    if "mm_token_type_ids" in kwargs:
        extra = ids.shape[1] - prompt.input_ids.shape[1]
        kwargs["mm_token_type_ids"] = torch.nn.functional.pad(kwargs["mm_token_type_ids"], (0, extra))
    with torch.no_grad(), LayerCapture(vlm.decoder_layers, vlm.selected_layers) as capture:
        vlm.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs)
    return capture.stacked()


def our_hooks(vlm) -> int:
    return sum(hook.__qualname__.startswith(("LayerCapture", "layer_progress"))
               for layer in vlm.decoder_layers for hook in layer._forward_hooks.values())


@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_matches_fresh_forward(vlms, family, picture, with_image):
    vlm = vlms[family]
    images = [picture] if with_image else []
    result = verifi_rewrite(vlm, "a red circle", images=images, max_new_tokens=N, max_tiles=2, min_new_tokens=N)
    features = result.features
    assert result.generated_token_count == N and not result.finished
    assert features.features.shape == (1, features.input_ids.shape[1], len(vlm.selected_layers), vlm.hidden_size)
    reference = fresh_states(vlm, result, images)
    torch.testing.assert_close(features.features, reference, atol=1e-5, rtol=0)
    # the generated tokens are the first N of a plain N-token greedy run
    prompt = build_prompt(vlm, images + ["a red circle"], system_prompt=DEFAULT_SYSTEM_PROMPT, max_tiles=2)
    plain = vlm.model.generate(**prompt.model_kwargs(), max_new_tokens=N, min_new_tokens=N, do_sample=False)
    assert torch.equal(plain[0, prompt.input_ids.shape[1]:], result.token_ids)
    assert result.text == vlm.tokenizer.decode(result.token_ids.tolist(), skip_special_tokens=True).strip()
    check_keep(features, prompt)


def check_keep(f, prompt):
    """keep = image tokens (with their markers) + generated tokens; nothing of the chat else."""
    length = prompt.input_ids.shape[1]
    assert torch.equal(f.keep, torch.cat([prompt.is_image, torch.ones(1, N, dtype=torch.bool)], dim=1))
    assert f.is_system[:, :length].any() and f.is_instruction[:, :length].any()
    assert not (f.keep & (f.is_system | f.is_instruction | f.is_template)).any()
    assert not f.is_image[:, length:].any() and f.attention_mask.all()
    tokens, mask = f.condition_tokens()
    assert tokens.shape[1] == int(prompt.is_image.sum()) + N and mask.all()
    torch.testing.assert_close(tokens[:, -N:], f.features[:, -N:])


def test_seeded_sampling(vlms, family):
    vlm = vlms[family]
    state = torch.get_rng_state()
    runs = [verifi_rewrite(vlm, "a red circle", max_new_tokens=N, do_sample=True, seed=s, temperature=1.0,
                           min_new_tokens=N) for s in (7, 7, 8)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert runs[0].text == runs[1].text and torch.equal(runs[0].features.features, runs[1].features.features)
    assert not torch.equal(runs[2].token_ids, runs[0].token_ids)  # typical at temperature 1
    for run in (runs[0], runs[2]):
        torch.testing.assert_close(run.features.features, fresh_states(vlm, run), atol=1e-5, rtol=0)
    # the kept tokens are those of a plain N-token run with the same seed
    prompt = build_prompt(vlm, ["a red circle"], system_prompt=DEFAULT_SYSTEM_PROMPT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        plain = vlm.model.generate(**prompt.model_kwargs(), max_new_tokens=N, min_new_tokens=N, do_sample=True,
                                   temperature=1.0, top_p=0.9, top_k=0)
    assert torch.equal(plain[0, prompt.input_ids.shape[1]:], runs[0].token_ids)


def _force_eos_at(vlm, step: int):
    """Make the LM head pick EOS at generated token `step` (1-based)."""
    eos = eos_token_ids(vlm)[0]
    calls = []

    def hook(module, args, output):
        calls.append(None)
        if len(calls) == step:
            output = output.clone()
            output[..., -1, eos] = output.abs().max() * 10 + 100
        return output

    return vlm.model.lm_head.register_forward_hook(hook), eos


def test_eos_stop(vlms, family):
    vlm = vlms[family]
    handle, eos = _force_eos_at(vlm, 4)
    try:
        result = verifi_rewrite(vlm, "a red circle", max_new_tokens=N)
    finally:
        handle.remove()
    assert result.finished and result.generated_token_count == 3
    assert eos not in result.token_ids.tolist()
    assert result.features.keep.sum() == 3 and result.features.keep[0, -3:].all()
    torch.testing.assert_close(result.features.features, fresh_states(vlm, result), atol=1e-5, rtol=0)


def test_eos_first_falls_back_to_prompt(vlms, caplog):
    vlm = vlms["internvl"]
    handle, _ = _force_eos_at(vlm, 1)
    try:
        with caplog.at_level(logging.WARNING):
            result = verifi_rewrite(vlm, "a red circle", max_new_tokens=N)
    finally:
        handle.remove()
    assert result.generated_token_count == 0 and result.text == "" and "no tokens" in caplog.text
    assert torch.equal(result.features.keep, result.features.is_instruction)


def test_kept_count():
    assert kept_count([5, 6, 7, 8], {9}, 3, 3) == (3, False)  # look-ahead token dropped
    assert kept_count([5, 9, 7], {9}, 3, 2) == (1, True)  # EOS excluded
    assert kept_count([5, 6, 7, 9], {9}, 3, 3) == (3, True)  # EOS as the look-ahead token: complete
    assert kept_count([5, 6], {9}, 3, 1) == (1, False)  # stopped early: only fed-back tokens


def test_hooks_removed_and_progress(vlms, family):
    vlm = vlms[family]
    before = our_hooks(vlm)
    steps = []
    verifi_rewrite(vlm, "a red circle", max_new_tokens=N, min_new_tokens=N, progress=lambda s, t: steps.append((s, t)))
    assert steps == [(s, N) for s in range(1, N + 1)]
    assert our_hooks(vlm) == before == 0

    def cancel(step, total):
        if step == 2:
            raise KeyboardInterrupt("cancelled")

    state = torch.get_rng_state()
    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        verifi_rewrite(vlm, "a red circle", max_new_tokens=N, do_sample=True, seed=3, progress=cancel)
    assert our_hooks(vlm) == 0
    assert torch.equal(torch.get_rng_state(), state)


def test_system_prompt_changes_output(vlms, family):
    vlm = vlms[family]
    default = verifi_rewrite(vlm, "a red circle", max_new_tokens=N, min_new_tokens=N)
    other = verifi_rewrite(vlm, "a red circle", system_prompt="describe a blue star", max_new_tokens=N,
                           min_new_tokens=N)
    gen_default = default.features.features[:, -N:]
    gen_other = other.features.features[:, -N:]
    assert not torch.allclose(gen_default, gen_other, atol=1e-3)
    assert int(other.features.is_system.sum()) < int(default.features.is_system.sum())
    torch.testing.assert_close(other.features.features,
                               fresh_states(vlm, other, system_prompt="describe a blue star"), atol=1e-5, rtol=0)


def test_inputs(vlms, picture):
    vlm = vlms["qwen2_5_vl"]
    with pytest.raises(InputError, match="empty prompt"):
        verifi_rewrite(vlm, "   ")
    with pytest.raises(InputError, match="max_new_tokens"):
        verifi_rewrite(vlm, "a cat", max_new_tokens=0)
    with pytest.raises(InputError, match="temperature"):
        verifi_rewrite(vlm, "a cat", do_sample=True, temperature=0.0)
    result = verifi_rewrite(vlm, "", images=[picture], max_new_tokens=2, max_tiles=1)  # images alone are a prompt
    assert result.features.is_image.any() and not result.features.is_instruction.any()
    no_system = verifi_rewrite(vlm, "a cat", system_prompt="", max_new_tokens=2)  # "" sends no system prompt
    assert not no_system.features.is_system.any() and no_system.features.is_instruction.any()


@pytest.mark.parametrize("with_image", [False, True])
def test_forced_rewrite_matches_generated(vlms, family, picture, with_image):
    """Forcing the text a greedy pass wrote gives that pass's features: same ids, same states."""
    vlm = vlms[family]
    images = [picture] if with_image else []
    written = verifi_rewrite(vlm, "a red circle", images=images, max_new_tokens=N, max_tiles=2, min_new_tokens=N)
    answer = vlm.tokenizer.decode(written.token_ids.tolist(), skip_special_tokens=False)
    forced = forced_rewrite(vlm, "a red circle", answer, images=images, max_tiles=2)
    assert torch.equal(forced.token_ids, written.token_ids) and forced.finished
    assert forced.generated_token_count == N and forced.text == written.text
    torch.testing.assert_close(forced.features.features, written.features.features, atol=1e-5, rtol=0)
    prompt = build_prompt(vlm, images + ["a red circle"], system_prompt=DEFAULT_SYSTEM_PROMPT, max_tiles=2)
    check_keep(forced.features, prompt)
    cut = forced_rewrite(vlm, "a red circle", answer, images=images, max_tiles=2, max_new_tokens=N - 2)
    assert torch.equal(cut.token_ids, written.token_ids[: N - 2]) and not cut.finished
    torch.testing.assert_close(cut.features.features, written.features.features[:, :-2], atol=1e-5, rtol=0)


def test_forced_batch_matches_one_by_one(vlms, family, picture):
    """Rows of other lengths, with and without images, padded into one forward: each row's ids,
    states and masks equal its own forced_rewrite."""
    vlm = vlms[family]
    texts = ["a red circle", "make it blue", "two small green squares at the top and a cat"]
    answers = ["a red circle in the center", "a blue circle", "cat cat"]
    images = [[], [picture], [picture, picture]]
    batch = forced_rewrite_batch(vlm, texts, answers, images, max_tiles=2, max_new_tokens=4)
    for text, answer, pics, got in zip(texts, answers, images, batch):
        one = forced_rewrite(vlm, text, answer, images=pics, max_tiles=2, max_new_tokens=4)
        assert got.text == one.text and got.finished == one.finished
        assert torch.equal(got.token_ids, one.token_ids)
        assert torch.equal(got.features.input_ids, one.features.input_ids)
        for mask in ("attention_mask", "is_image", "keep", "is_system", "is_instruction", "is_template"):
            assert torch.equal(getattr(got.features, mask), getattr(one.features, mask)), mask
        torch.testing.assert_close(got.features.features, one.features.features, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.features.frame_positions, one.features.frame_positions, equal_nan=True)
        places = got.features.condition_positions()[0]  # image tokens, then the answer's tokens without a place
        placed = torch.isfinite(places).all(dim=-1)
        assert bool(placed.any()) == bool(pics)
        assert not placed[int(got.features.keep[0].sum()) - got.generated_token_count:].any()
    with pytest.raises(InputError, match="one answer and one image list per text"):
        forced_rewrite_batch(vlm, texts, answers[:2])


def test_forced_rewrite_inputs(vlms):
    vlm = vlms["qwen2_5_vl"]
    with pytest.raises(InputError, match="empty answer"):
        forced_rewrite(vlm, "a cat", "")
    with pytest.raises(InputError, match="empty prompt"):
        forced_rewrite(vlm, " ", "a cat on a mat")
    with pytest.raises(InputError, match="no room"):
        forced_rewrite(vlm, "a cat", " ".join(["cat"] * (vlm.max_length + 8)))
