"""LoRA: adapted forward == merged weights, ComfyUI key mapping, LoRA-only training and export."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unifusion.checkpoint import load_model
from unifusion.config import tiny_preset
from unifusion.model import UniFusionModel
from unifusion.train.errors import TrainConfigError, TrainStateError
from unifusion.train.export import export_lora, export_release
from unifusion.train.lora import COMFY_PREFIX, add_lora, comfy_lora_keys, matching_linears
from unifusion.train.recipe import LoRAConfig, TrainConfig
from unifusion.train.trainer import Trainer

TARGETS = LoRAConfig().targets


# --- ComfyUI's LoRA logic, restated from Comfy-Org/ComfyUI a125cd84 (Oct 2025) -----------------

def comfy_key_map(model_keys: list[str]) -> dict[str, str]:
    """comfy/lora.py model_lora_keys_unet, the part that applies to every model."""
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                key_map[f"lora_unet_{key_lora}"] = k
                key_map[k[:-len(".weight")]] = k
            else:
                key_map[k] = k
    return key_map


def comfy_load_lora(lora: dict[str, torch.Tensor], to_load: dict[str, str]) -> tuple[dict, set[str]]:
    """comfy/lora.py load_lora with comfy/weight_adapter/lora.py LoRAAdapter.load (regular layout)."""
    patches, loaded = {}, set()
    for x in to_load:
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up in lora:
            patches[to_load[x]] = (lora[up], lora[down], alpha)
            loaded.update({up, down})
    return patches, set(lora) - loaded


def comfy_patch(weight: torch.Tensor, patch: tuple, strength: float = 1.0) -> torch.Tensor:
    """LoRAAdapter.calculate_weight: W + strength * (alpha / rank) * up @ down."""
    up, down, alpha = patch
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return weight + strength * scale * torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------

def _model(seed: int = 0) -> UniFusionModel:
    torch.manual_seed(seed)
    model = UniFusionModel(tiny_preset())
    with torch.no_grad():  # a DiT with non-zero adaLN/output layers, so the adapters show in the output
        for p in model.dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(cfg) -> tuple:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.dit.in_channels, 4, 4, generator=gen)
    context = torch.randn(2, 5, cfg.dit.hidden_size, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return x, torch.tensor([0.3, 0.8]), context, mask


def _randomise(lora) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in lora.parameters().items():
            if name.endswith("lora_up"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_adapted_forward_equals_merged_weights() -> None:
    model = _model()
    inputs = _inputs(model.cfg)
    with torch.no_grad():
        base = model(*inputs)
    lora = add_lora(model, rank=4, alpha=8.0, targets=TARGETS)
    with torch.no_grad():
        assert torch.equal(model(*inputs), base)  # lora_up starts at zero
    _randomise(lora)
    with torch.no_grad():
        adapted = model(*inputs)
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        f"dit.{n}" for n in lora.parameters())
    lora.merge()
    assert not any("lora_" in k for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), adapted, rtol=1e-5, atol=1e-5)


def test_comfy_export_keys_map_one_to_one_onto_the_dit() -> None:
    model = _model()
    model_keys = [f"diffusion_model.{k}" for k in model.state_dict()]  # the pack's MODEL layout
    lora = add_lora(model, rank=3, alpha=6.0, targets=TARGETS)
    _randomise(lora)
    exported = lora.comfy_state_dict()
    assert len(exported) == 3 * len(lora.adapters) == 3 * 4 * model.cfg.dit.depth
    assert all(k.startswith(COMFY_PREFIX) for k in exported)
    patches, unloaded = comfy_load_lora(exported, comfy_key_map(model_keys))
    assert unloaded == set()
    assert sorted(patches) == sorted(f"diffusion_model.dit.{n}.weight" for n in lora.adapters)
    assert set(comfy_lora_keys(list(lora.adapters)).values()) == set(patches)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora.merge()
    merged = model.state_dict()
    for key, patch in patches.items():
        name = key[len("diffusion_model."):]
        torch.testing.assert_close(comfy_patch(original[name], patch), merged[name], rtol=1e-6, atol=1e-6)


def test_targets_must_match() -> None:
    model = _model()
    assert "blocks.0.attn.qkv" in matching_linears(model.dit, ["blocks.*.attn.qkv"])
    assert "blocks.0.attn.qkv" not in matching_linears(model.dit, ["blocks.1.*"])
    with pytest.raises(TrainConfigError, match=r"'blocks\.\*\.cross_attn' matches no Linear layer"):
        add_lora(model, 2, 2.0, ["blocks.*.cross_attn"])


def test_lora_training_changes_only_adapters_and_exports(cache, model_config, tmp_path: Path) -> None:
    full = TrainConfig(steps=1, batch_size=2, ema_decay=0.0, save_every=10)
    base_state = Trainer(model_config, cache, full, tmp_path / "base", progress=False).train().state_dir
    base_path = export_release(base_state, tmp_path / "base.safetensors", use_ema=False)
    cfg = replace(full, steps=3, lr=1e-2, warmup_steps=0, init_from=str(base_path), ema_decay=0.5,
                  lora=LoRAConfig(rank=2, alpha=4.0, targets=("blocks.*.attn.qkv", "final_layer.linear")))
    trainer = Trainer(model_config, cache, cfg, tmp_path / "lora", progress=False)
    assert trainer.trainable == {f"dit.{n}" for n in trainer.lora.parameters()}
    result = trainer.train()
    base_model, _ = load_model(base_path)
    for name, value in base_model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
    assert any(p.abs().sum() > 0 for n, p in trainer.lora.parameters().items() if n.endswith("lora_up"))
    saved = load_file(str(result.state_dir / "model.safetensors"))
    assert set(saved) == trainer.trainable

    lora_file = export_lora(result.state_dir, tmp_path / "adapter.safetensors", use_ema=False)
    exported = load_file(str(lora_file))
    assert sorted(exported) == sorted(f"{COMFY_PREFIX}{n}.{s}" for n in ("blocks.0.attn.qkv", "blocks.1.attn.qkv",
                                                                          "final_layer.linear")
                                      for s in ("alpha", "lora_down.weight", "lora_up.weight"))
    merged, _ = load_model(export_release(result.state_dir, tmp_path / "merged.safetensors", use_ema=False))
    model_keys = [f"diffusion_model.{k}" for k in base_model.state_dict()]
    patches, unloaded = comfy_load_lora(exported, comfy_key_map(model_keys))
    assert not unloaded and len(patches) == 3
    base_sd, merged_sd = base_model.state_dict(), merged.state_dict()
    for key, value in merged_sd.items():
        expected = comfy_patch(base_sd[key], patches[f"diffusion_model.{key}"]) if f"diffusion_model.{key}" in \
            patches else base_sd[key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(TrainStateError, match="full training state, not a LoRA one"):
        export_lora(base_state, tmp_path / "no.safetensors")
