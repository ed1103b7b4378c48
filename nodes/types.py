"""The pack's socket types (custom ComfyUI types; values are defined in `values`)."""

from __future__ import annotations

from comfy_api.latest import io

VLM = io.Custom("UNIFUSION_VLM")
"""A ModelPatcher holding a frozen VLM (see `vlm.VLMHolder`)."""

Features = io.Custom("UNIFUSION_FEATURES")
"""`values.ConditionFeatures`: selected-layer VLM states of one prompt and their origin."""

References = io.Custom("UNIFUSION_REFERENCES")
"""`values.References`: reference images in order, each with its own tile budget."""

CATEGORY = "UniFusion"
