"""What the encode, Verifi, LAP and text-encode nodes run: library calls between ComfyUI's
memory manager (load before use) and its intermediate device (where node outputs live)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import comfy.model_management
import comfy.model_patcher

from ..unifusion.checkpoint import check_vlm_identity
from ..unifusion.config import UniFusionConfig
from ..unifusion.errors import InputError
from ..unifusion.vlm.encode import VLMFeatures, encode
from ..unifusion.vlm.verifi import verifi_rewrite
from .inputs import check_prompt, encode_summary, layer_positions, parse_gains
from .model import compute_dtype
from .values import ConditionFeatures, Reference, reference_pixels, split_references
from .vlm import library_warnings, progress_callback, use_vlm, vlm_identity

DEFAULT_TILES = 6


def _summary(features: VLMFeatures, tiles: Sequence[int], prefix: str = "", warnings: Sequence[str] = ()) -> str:
    mask = features.attention_mask
    notes = "".join(f"WARNING: {w}. " for w in warnings)  # first, where the artist sees it
    return notes + prefix + encode_summary(int(mask.sum()), int((features.keep & mask).sum()), tiles,
                                           int((features.is_image & mask).sum()))


def encode_features(vlm: comfy.model_patcher.ModelPatcher, text: str, references: Optional[Sequence[Reference]],
                    system_prompt: str = "", node_id: Optional[str] = None, layers: Optional[Sequence[int]] = None,
                    node: str = "UniFusion Encode") -> ConditionFeatures:
    """Prompt + references -> selected-layer features (the paper's keep rule, no rewrite)."""
    images, tiles = split_references(references)
    text = check_prompt(text, len(images), node)
    loaded = use_vlm(vlm, layers)
    with library_warnings() as warnings:
        features = encode(loaded, text, [reference_pixels(image) for image in images],
                          max_tiles=tiles or DEFAULT_TILES, system_prompt=(system_prompt or "").strip() or None,
                          progress=progress_callback(node_id))
    features = features.to(comfy.model_management.intermediate_device())
    return ConditionFeatures(features, loaded.identity, _summary(features, tiles, warnings=warnings))


def verifi_features(vlm: comfy.model_patcher.ModelPatcher, text: str, references: Optional[Sequence[Reference]],
                    system_prompt: str, max_new_tokens: int, seed: int, do_sample: bool,
                    node_id: Optional[str] = None, layers: Optional[Sequence[int]] = None,
                    node: str = "UniFusion Verifi Rewrite") -> ConditionFeatures:
    """The VLM rewrites the prompt; the features are those of the generated tokens (+ images)."""
    images, tiles = split_references(references)
    text = check_prompt(text, len(images), node)
    loaded = use_vlm(vlm, layers)
    with library_warnings() as warnings:
        result = verifi_rewrite(loaded, text, [reference_pixels(image) for image in images],
                                system_prompt=system_prompt or "", max_new_tokens=max_new_tokens, do_sample=do_sample,
                                seed=seed, max_tiles=tiles or DEFAULT_TILES, progress=progress_callback(node_id))
    features = result.features.to(comfy.model_management.intermediate_device())
    cut = "" if result.finished else " (cut at max_new_tokens)"
    prefix = f"rewrite: {result.generated_token_count} tokens{cut}; "
    return ConditionFeatures(features, loaded.identity, _summary(features, tiles, prefix, warnings), result.text)


def checkpoint_name(model: comfy.model_patcher.ModelPatcher) -> str:
    return getattr(model.model, "unifusion_checkpoint", "the UniFusion checkpoint")


def unifusion_config(model: comfy.model_patcher.ModelPatcher) -> UniFusionConfig:
    config = getattr(model.model, "unifusion_config", None)
    if config is None:
        raise InputError(f"model: this MODEL is a {type(model.model).__name__}, not a UniFusion model; connect "
                         "Load UniFusion Model")
    return config


def check_vlm(model: comfy.model_patcher.ModelPatcher, vlm: comfy.model_patcher.ModelPatcher) -> None:
    """Fail before any work when the checkpoint was trained with another VLM."""
    check_vlm_identity(unifusion_config(model).vlm, vlm_identity(vlm), checkpoint_name(model))


def lap_conditioning(model: comfy.model_patcher.ModelPatcher, features: ConditionFeatures,
                     layer_gains: str = "") -> list:
    """Run the MODEL's LAP + refiner once on the kept tokens -> CONDITIONING
    ``[[tokens (B, S, D), {"attention_mask": (B, S) long, "image_positions": (B, S, 2) float}]]``
    (where each image token lies on its image's frame grid, NaN for text)."""
    config, name = unifusion_config(model), checkpoint_name(model)
    check_vlm_identity(config.vlm, features.vlm, name)
    positions = layer_positions(config.vlm.selected_layers, features.features.layers, name)
    gains = parse_gains(layer_gains, config.vlm.selected_layers)
    feats, mask = features.features.condition_tokens()  # (B, S', L_captured, H), (B, S')
    if not bool(mask.any()):
        raise InputError("the prompt produced no condition tokens; write a prompt or connect a reference image")
    feats = feats[:, :, positions]  # (B, S', L, H)
    comfy.model_management.load_models_gpu([model])
    device, dtype = model.load_device, compute_dtype(model)
    gains_t = None if gains is None else torch.tensor(gains, dtype=torch.float32, device=device)
    tokens = model.model.diffusion_model.encode_condition(feats.to(device=device, dtype=dtype), mask.to(device),
                                                          gains_t)  # (B, S', D)
    out = comfy.model_management.intermediate_device()
    places = features.features.condition_positions()  # (B, S', 2)
    return [[tokens.to(device=out, dtype=torch.float32), {"attention_mask": mask.to(device=out, dtype=torch.long),
                                                          "image_positions": places.to(device=out)}]]
