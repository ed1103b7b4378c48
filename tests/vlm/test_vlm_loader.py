"""load_vlm: tiny folders of every family load; unusable folders give errors naming the fix."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from unifusion.config import VLMIdentity, paper_preset
from unifusion.vlm.loader import LoadedVLM, VLMLoadError, identity_of, load_vlm

ARCH = {
    "internvl": "InternVLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


def test_loads_every_family(tiny_dir, family):
    vlm = load_vlm(tiny_dir)
    assert isinstance(vlm, LoadedVLM)
    assert vlm.family == family
    assert vlm.identity == VLMIdentity(ARCH[family], 8, 64, (4, 7))
    assert not vlm.model.training
    assert all(not p.requires_grad for p in vlm.model.parameters())
    assert vlm.dtype == torch.float32 and vlm.device.type == "cpu"
    assert vlm.tokenizer.chat_template and vlm.image_processor is not None
    assert vlm.base_model is vlm.model.model  # no LM head when encoding


def test_never_swaps_in_hub_kernels(tiny_dirs, monkeypatch):
    """transformers replaces layers with Hub kernels by default where `kernels` is installed; on CUDA
    that fetches code from the Hub (an offline GPU machine failed to load the demo VLM) and would change
    the layers LAP was trained on."""
    from transformers import PreTrainedModel

    asked, original = [], PreTrainedModel.set_use_kernels

    def record(self, use_kernels, *args, **kwargs):
        asked.append(use_kernels)
        return original(self, use_kernels, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", record)
    load_vlm(tiny_dirs["internvl"])
    assert asked == [False]


def test_layer_selection_and_dtype(tiny_dirs):
    vlm = load_vlm(tiny_dirs["qwen3_vl"], dtype=torch.bfloat16, layer_stride=2)
    assert vlm.selected_layers == (3, 5, 7)
    assert vlm.dtype == torch.bfloat16
    vlm = load_vlm(tiny_dirs["qwen3_vl"], selected_layers=[1, 8])
    assert vlm.identity.selected_layers == (1, 8)
    with pytest.raises(VLMLoadError, match=r"outside 0\.\.8"):
        load_vlm(tiny_dirs["qwen3_vl"], selected_layers=[9])


def test_paper_internvl_identity_on_meta():
    """An InternVL2.5-8B-shaped config (InternLM2.5-7B as Llama, InternViT-300M) gives the paper's identity."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, LlamaConfig

    text = LlamaConfig(vocab_size=92553, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768)
    vision = InternVLVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096, image_size=448, patch_size=14)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=92546, downsample_ratio=0.5)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    identity = identity_of(model)
    assert identity == paper_preset().vlm
    assert identity.selected_layers == (4, 7, 10, 13, 16, 19, 22, 25, 28, 31)


def _write_config(folder, raw):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(VLMLoadError, match="does not exist"):
        load_vlm(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(VLMLoadError, match="is a file"):
        load_vlm(tmp_path / "model.safetensors")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(VLMLoadError, match="no config.json"):
        load_vlm(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(VLMLoadError, match="diffusers pipeline"):
        load_vlm(tmp_path)


def test_text_only_and_diffusion_configs(tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "llm"
    LlamaConfig(num_hidden_layers=2, hidden_size=32, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    with pytest.raises(VLMLoadError, match="'llama' model .*not a vision-language model"):
        load_vlm(folder)
    folder = _write_config(tmp_path / "dit", {"_class_name": "FluxTransformer2DModel", "num_layers": 19})
    with pytest.raises(VLMLoadError, match="FluxTransformer2DModel.*not a VLM"):
        load_vlm(folder)


def test_original_internvl_layout_points_to_hf(tmp_path):
    folder = _write_config(tmp_path, {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
                                      "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}})
    with pytest.raises(VLMLoadError, match="-hf.*InternVL2_5-8B-MPO-hf"):
        load_vlm(folder, trust_remote_code=True)


def test_remote_code_needs_permission(tmp_path):
    folder = _write_config(tmp_path, {"architectures": ["MyVLM"], "model_type": "my_vlm",
                                      "auto_map": {"AutoConfig": "configuration_my.MyConfig"}})
    with pytest.raises(VLMLoadError, match="trust_remote_code=True"):
        load_vlm(folder)


def test_missing_tokenizer_or_processor(tmp_path, tiny_dirs):
    folder = shutil.copytree(tiny_dirs["internvl"], tmp_path / "no_tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(VLMLoadError, match="no tokenizer files"):
        load_vlm(folder)
    folder = shutil.copytree(tiny_dirs["internvl"], tmp_path / "no_proc")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(VLMLoadError, match="no image processor config"):
        load_vlm(folder)


def test_trust_remote_code_warns(tiny_dirs, caplog):
    with caplog.at_level(logging.WARNING, logger="unifusion.vlm.loader"):
        load_vlm(tiny_dirs["qwen2_5_vl"], trust_remote_code=True)
    assert "trust_remote_code=True" in caplog.text
