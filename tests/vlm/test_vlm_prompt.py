"""Chats built with each model's own template; every token's role checked another way."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from unifusion.errors import InputError
from unifusion.vlm.images import dynamic_tiles
from unifusion.vlm.prompt import build_prompt, build_prompts, images_then_text
from unifusion.vlm.tiny import build_tokenizer

PROMPT = "A red cat on the left, two blue dogs."
SYSTEM = "Describe the image in a detailed prompt."
PLACEHOLDER = {"internvl": "<IMG_CONTEXT>", "qwen2_5_vl": "<|image_pad|>", "qwen3_vl": "<|image_pad|>"}


def _image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _words(text):
    return text.lower().replace(",", " ,").replace(".", " .").split()


def _decode(tokenizer, ids, mask):
    return tokenizer.decode(ids[mask]).split()


def _expected_image_tokens(vlm, image, max_tiles):
    if vlm.family == "internvl":
        return len(dynamic_tiles(image, 448, max_tiles)) * 16  # tiny InternVL: 16 tokens per tile
    processor = vlm.image_processor
    kwargs = {"min_pixels": processor.size["shortest_edge"], "max_pixels": max_tiles * 448 * 448}
    return processor.get_number_of_image_patches(image.height, image.width, kwargs) // processor.merge_size**2


def _roles_partition(prompt):
    roles = torch.stack([prompt.is_image, prompt.is_system, prompt.is_instruction, prompt.is_template]).int()
    assert torch.equal(roles.sum(0), prompt.attention_mask.int())


def test_text_roles_and_ids_match_the_template(tiny_vlm):
    tokenizer = tiny_vlm.tokenizer
    prompt = build_prompt(tiny_vlm, [PROMPT], system_prompt=SYSTEM)
    ids = prompt.input_ids[0]
    _roles_partition(prompt)
    assert _decode(tokenizer, ids, prompt.is_instruction[0]) == _words(PROMPT)
    assert _decode(tokenizer, ids, prompt.is_system[0]) == _words(SYSTEM)
    assert not prompt.is_image.any()
    template = _decode(tokenizer, ids, prompt.is_template[0])
    assert template == ["<|im_start|>", "system", "<|im_end|>", "<|im_start|>", "user", "<|im_end|>",
                        "<|im_start|>", "assistant"]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.texts == [rendered]
    assert ids.tolist() == tokenizer(rendered, add_special_tokens=False).input_ids


def test_default_system_prompt_is_template(tiny_vlms):
    """Qwen2.5-VL's template adds 'You are a helpful assistant.' by itself: not the user's system prompt."""
    vlm = tiny_vlms["qwen2_5_vl"]
    prompt = build_prompt(vlm, [PROMPT], add_generation_prompt=False)
    assert not prompt.is_system.any()
    template = " ".join(_decode(vlm.tokenizer, prompt.input_ids[0], prompt.is_template[0]))
    assert "you are a helpful assistant ." in template
    assert "assistant" not in template.split("helpful assistant .")[1]  # no generation prompt


@pytest.mark.parametrize("max_tiles", [1, 2])
def test_image_tokens_match_tiles_and_processor_expansion(tiny_vlm, family, max_tiles):
    tokenizer = tiny_vlm.tokenizer
    image = _image(120, 50)
    prompt = build_prompt(tiny_vlm, [image, PROMPT], system_prompt=SYSTEM, max_tiles=max_tiles)
    _roles_partition(prompt)
    count = _expected_image_tokens(tiny_vlm, image, max_tiles)
    assert prompt.image_token_counts == [[count]]
    ids = prompt.input_ids[0]
    assert int((ids == tiny_vlm.model.config.image_token_id).sum()) == count
    assert int(prompt.is_image.sum()) == count + 2  # plus the start/end markers
    assert _decode(tokenizer, ids, prompt.is_instruction[0]) == _words(PROMPT)
    # reference: the processors' own string-level expansion of the placeholder
    token = PLACEHOLDER[family]
    block = f"<img>{token * count}</img>" if family == "internvl" else token * count
    expanded = prompt.texts[0].replace(token, block)
    assert ids.tolist() == tokenizer(expanded, add_special_tokens=False).input_ids
    image_block = ids[prompt.is_image[0]]
    assert tokenizer.convert_ids_to_tokens(image_block[[0, -1]].tolist()) == (
        ["<img>", "</img>"] if family == "internvl" else ["<|vision_start|>", "<|vision_end|>"])
    # the image comes before the text by default
    assert prompt.is_image[0].nonzero().max() < prompt.is_instruction[0].nonzero().min()
    if family == "internvl":
        assert prompt.image_inputs["pixel_values"].shape[0] == count // 16
    else:
        assert prompt.image_inputs["image_grid_thw"].shape == (1, 3)
        assert torch.equal(prompt.image_inputs["mm_token_type_ids"][0].bool(),
                           ids == tiny_vlm.model.config.image_token_id)


def test_interleaved_images_keep_their_order(tiny_vlm):
    first, second = _image(64, 64, 1), _image(200, 60, 2)
    prompt = build_prompt(tiny_vlm, ["left shape", first, "right shape", second, "make it blue"],
                          max_tiles=[1, 3])
    counts = [_expected_image_tokens(tiny_vlm, first, 1), _expected_image_tokens(tiny_vlm, second, 3)]
    assert prompt.image_token_counts == [counts]
    roles = torch.full(prompt.input_ids.shape[1:], -1)
    roles[prompt.is_instruction[0]] = 0
    roles[prompt.is_image[0]] = 1
    runs = [int(r) for r in torch.unique_consecutive(roles[roles >= 0])]
    assert runs == [0, 1, 0, 1, 0]
    words = _decode(tiny_vlm.tokenizer, prompt.input_ids[0], prompt.is_instruction[0])
    assert words == "left shape right shape make it blue".split()


def test_several_references_are_labelled_one_is_not(tiny_vlm):
    first, second = _image(64, 64, 1), _image(64, 64, 2)
    assert images_then_text([first], "make it blue") == [first, "make it blue"]
    assert images_then_text([first], None) == [first]
    content = images_then_text([first, second], "put the shape from image 2 on the left")
    assert [c for c in content if isinstance(c, Image.Image)] == [first, second]
    prompt = build_prompt(tiny_vlm, content, max_tiles=1)
    unlabelled = build_prompt(tiny_vlm, [first, second, "put the shape from image 2 on the left"], max_tiles=1)
    added = prompt.input_ids.shape[1] - unlabelled.input_ids.shape[1]
    # The labels add tokens of the template role only: the instruction and images keep theirs.
    assert added > 0 and int(prompt.is_template.sum() - unlabelled.is_template.sum()) == added
    for role in ("is_instruction", "is_image"):
        assert torch.equal(prompt.input_ids[0][getattr(prompt, role)[0]],
                           unlabelled.input_ids[0][getattr(unlabelled, role)[0]])
    text = prompt.texts[0]
    assert text.index("Image-1: ") < text.index("Image-2: ") < text.index("put the shape")


def test_batch_padding_sides(tiny_vlm):
    contents = [[PROMPT], ["one star"]]
    right = build_prompts(tiny_vlm, contents)
    left = build_prompts(tiny_vlm, contents, padding_side="left")
    lengths = right.attention_mask.sum(1)
    assert lengths[0] > lengths[1] and right.input_ids.shape == left.input_ids.shape
    assert right.attention_mask[1, : lengths[1]].all() and not right.attention_mask[1, lengths[1]:].any()
    assert left.attention_mask[1, -lengths[1]:].all() and not left.attention_mask[1, : -lengths[1]].any()
    for b in range(2):
        real_right, real_left = right.attention_mask[b], left.attention_mask[b]
        assert torch.equal(right.input_ids[b][real_right], left.input_ids[b][real_left])
        assert torch.equal(right.is_instruction[b][real_right], left.is_instruction[b][real_left])
    _roles_partition(right)
    _roles_partition(left)


def test_template_that_strips_text(tiny_vlms):
    """Templates that transform the text still give the right roles (spans found around the pieces)."""
    vlm = tiny_vlms["qwen3_vl"]
    tokenizer = build_tokenizer("qwen3_vl")
    tokenizer.chat_template = tokenizer.chat_template.replace("content['text'] }}", "content['text'] | trim }}")
    stripped = dataclasses.replace(vlm, tokenizer=tokenizer)
    prompt = build_prompt(stripped, ["   " + PROMPT + "   "], system_prompt="  " + SYSTEM)
    assert _decode(tokenizer, prompt.input_ids[0], prompt.is_instruction[0]) == _words(PROMPT)
    assert _decode(tokenizer, prompt.input_ids[0], prompt.is_system[0]) == _words(SYSTEM)
    _roles_partition(prompt)


class _SlowTokenizer:
    """A tokenizer without offsets, like a sentencepiece 'slow' one."""

    is_fast = False

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self._inner(text, **kwargs)


def test_tokenizer_without_offsets(tiny_vlms):
    vlm = tiny_vlms["internvl"]
    fast = build_prompt(vlm, [PROMPT], system_prompt=SYSTEM)
    slow = build_prompt(dataclasses.replace(vlm, tokenizer=_SlowTokenizer(vlm.tokenizer)), [PROMPT],
                        system_prompt=SYSTEM)
    for name in ("input_ids", "is_system", "is_instruction", "is_template"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name


def test_prompt_errors(tiny_vlms):
    vlm = tiny_vlms["internvl"]
    with pytest.raises(InputError, match="image token"):
        build_prompt(vlm, ["a cat <IMG_CONTEXT>"])
    with pytest.raises(InputError, match="one per image"):
        build_prompt(vlm, [_image(50, 50), "a cat"], max_tiles=[1, 2])
    with pytest.raises(InputError, match=">= 1"):
        build_prompt(vlm, [_image(50, 50), "a cat"], max_tiles=0)
    with pytest.raises(InputError, match="padding_side"):
        build_prompts(vlm, [["a cat"]], padding_side="middle")


@pytest.mark.parametrize("template", [
    # a text-only template: content lists would show up as their Python repr
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    # a template that only reads content lists
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'][0]['text'] }}<|im_end|>\n{% endfor %}",
])
def test_string_and_list_only_templates(tiny_vlms, template):
    vlm = tiny_vlms["qwen2_5_vl"]
    tokenizer = build_tokenizer("qwen2_5_vl")
    tokenizer.chat_template = template
    prompt = build_prompt(dataclasses.replace(vlm, tokenizer=tokenizer), [PROMPT], system_prompt=SYSTEM)
    assert "'type'" not in prompt.texts[0]
    assert _decode(tokenizer, prompt.input_ids[0], prompt.is_instruction[0]) == _words(PROMPT)
    assert _decode(tokenizer, prompt.input_ids[0], prompt.is_system[0]) == _words(SYSTEM)


def test_template_dropping_the_system_prompt(tiny_vlms):
    vlm = tiny_vlms["qwen2_5_vl"]
    tokenizer = build_tokenizer("qwen2_5_vl")
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>user\n"
                               "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    with pytest.raises(InputError, match="exactly once"):
        build_prompt(dataclasses.replace(vlm, tokenizer=tokenizer), [PROMPT], system_prompt=SYSTEM)


def _frame_grid(vlm, prompt, image_index=0):
    """(rows, cols) of the frame grid of one image, from the processor's own outputs."""
    if vlm.family == "internvl":
        return 4, 4  # tiny InternVL: 16 tokens per tile, the last tile covers the frame
    t, h, w = prompt.image_inputs["image_grid_thw"][image_index].tolist()
    return h // vlm.image_processor.merge_size, w // vlm.image_processor.merge_size


@pytest.mark.parametrize("max_tiles", [1, 4])
def test_frame_positions_place_the_tokens_that_cover_the_image(tiny_vlm, max_tiles):
    """The single tile or the thumbnail (InternVL, last) or the whole token grid (Qwen) lies over the
    image row-major, at its token centres; tiles of a part of the image, markers and text have no place."""
    image = _image(120, 50)
    prompt = build_prompt(tiny_vlm, [image, PROMPT], max_tiles=max_tiles)
    places = prompt.frame_positions[0]
    placed = torch.isfinite(places).all(dim=-1)
    assert torch.isnan(places[~placed]).all()
    features = (prompt.input_ids[0] == tiny_vlm.model.config.image_token_id).nonzero().flatten()
    rows, cols = _frame_grid(tiny_vlm, prompt)
    framed = features[-rows * cols:]
    assert placed.nonzero().flatten().tolist() == framed.tolist()  # the frame grid is the last feature tokens
    grid = places[framed].reshape(rows, cols, 2)
    assert torch.allclose(grid[..., 0], ((torch.arange(rows) + 0.5) / rows)[:, None].expand(rows, cols))
    assert torch.allclose(grid[..., 1], ((torch.arange(cols) + 0.5) / cols)[None, :].expand(rows, cols))


def test_frame_positions_follow_padding_truncation_and_several_images(tiny_vlms):
    vlm = tiny_vlms["internvl"]
    first, second = _image(64, 64, 1), _image(64, 64, 2)
    prompts = build_prompts(vlm, [[first, "a"], ["no image here at all"], [first, "b", second]], max_tiles=1,
                            padding_side="left")
    placed = torch.isfinite(prompts.frame_positions).all(dim=-1)
    assert placed.sum(dim=1).tolist() == [16, 0, 32]
    assert torch.equal(placed, prompts.is_image & (prompts.input_ids == vlm.model.config.image_token_id))
    long = build_prompt(vlm, [first, "word " * 5000], max_tiles=1, max_length=64)
    assert long.frame_positions.shape[:2] == long.input_ids.shape
    assert int(torch.isfinite(long.frame_positions).all(dim=-1).sum()) == 16
