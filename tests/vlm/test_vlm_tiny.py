"""The tiny folders load with plain transformers, offline, and carry the family's tokens."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from unifusion.vlm.tiny import TinyVLMError, build_tiny_vlm, build_tokenizer

ARCH = {
    "internvl": "InternVLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


def test_folder_loads_offline(tiny_dir, family):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    AutoImageProcessor.from_pretrained(tiny_dir, local_files_only=True)
    assert type(model).__name__ == ARCH[family]
    assert (tiny_dir / "model.safetensors").is_file()
    assert json.loads((tiny_dir / "config.json").read_text())["architectures"] == [ARCH[family]]
    text_config = model.config.get_text_config()
    assert (text_config.num_hidden_layers, text_config.hidden_size) == (8, 64)
    assert text_config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template
    image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
    assert image_token in ("<IMG_CONTEXT>", "<|image_pad|>")


def test_same_seed_same_weights(tmp_path):
    a = build_tiny_vlm(tmp_path / "a", "qwen3_vl", seed=3, num_layers=2, hidden_size=32)
    b = build_tiny_vlm(tmp_path / "b", "qwen3_vl", seed=3, num_layers=2, hidden_size=32)
    c = build_tiny_vlm(tmp_path / "c", "qwen3_vl", seed=4, num_layers=2, hidden_size=32)
    wa, wb, wc = (AutoModelForImageTextToText.from_pretrained(p).state_dict() for p in (a, b, c))
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(wa[key], wb[key])
    assert not torch.equal(wa[key], wc[key])


def test_internvl_tokenizer_names_image_tokens():
    tokenizer = build_tokenizer("internvl")
    assert tokenizer.start_image_token == "<img>"
    assert tokenizer.end_image_token == "</img>"
    assert tokenizer.context_image_token == "<IMG_CONTEXT>"
    ids = tokenizer("<img><IMG_CONTEXT></img>", add_special_tokens=False).input_ids
    assert ids == [tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "<IMG_CONTEXT>", "</img>")]


def test_custom_vocab_round_trips():
    tokenizer = build_tokenizer("qwen2_5_vl", vocab=["zorp", "blick", "Quux", "."])
    ids = tokenizer("Zorp blick quux.", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "zorp blick quux ."
    # words the template writes itself (Qwen2.5-VL's default system prompt) are always known
    ids = tokenizer("You are a helpful assistant.", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("family", sorted(ARCH))
def test_vision_tower_size_is_configurable(tmp_path, family):
    """Every family takes a vision-tower width and depth (the demo tried wider towers for shapes)."""
    folder = build_tiny_vlm(tmp_path, family, num_layers=2, hidden_size=32, vision_hidden_size=48, vision_layers=3)
    vision = json.loads((folder / "config.json").read_text())["vision_config"]
    width = vision["hidden_size"]
    depth = vision.get("num_hidden_layers", vision.get("depth"))
    assert (width, depth, vision["intermediate_size"]) == (48, 3, 96)
    AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)


def test_internvl_patch_grid_sets_the_image_tokens_per_tile(tmp_path):
    """6x6 patches per 96 px tile: 3x3 tokens after the pixel shuffle, one per demo grid cell."""
    from PIL import Image

    from unifusion.vlm.loader import load_vlm
    from unifusion.vlm.prompt import build_prompt

    folder = build_tiny_vlm(tmp_path, "internvl", num_layers=2, hidden_size=32, image_size=96, patches_per_side=6)
    config = json.loads((folder / "config.json").read_text())
    assert (config["vision_config"]["patch_size"], config["image_seq_length"]) == ([16, 16], 9)
    vlm = load_vlm(folder)
    prompt = build_prompt(vlm, [Image.new("RGB", (64, 64)), "hi"], add_generation_prompt=True, max_tiles=1)
    assert prompt.input_ids[0].tolist().count(vlm.model.config.image_token_id) == 9
    with torch.no_grad():
        features = vlm.model.get_image_features(pixel_values=prompt.image_inputs["pixel_values"])
    features = getattr(features, "pooler_output", features)  # (tiles, tokens, width)
    assert tuple(features.shape[:2]) == (1, 9)


def test_bad_arguments(tmp_path):
    with pytest.raises(TinyVLMError, match="unknown tiny VLM family"):
        build_tiny_vlm(tmp_path, "llava")
    with pytest.raises(TinyVLMError, match="hidden_size"):
        build_tiny_vlm(tmp_path, "internvl", hidden_size=40)
    with pytest.raises(TinyVLMError, match="vision_hidden_size"):
        build_tiny_vlm(tmp_path, "internvl", vision_hidden_size=40)
    with pytest.raises(TinyVLMError, match="patches_per_side"):
        build_tiny_vlm(tmp_path, "internvl", image_size=96, patches_per_side=5)
