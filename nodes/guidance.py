"""Classifier-free guidance limited to the lower noise levels, as `unifusion generate` samples by default."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from ..unifusion.config import DEFAULT_GUIDANCE_MAX_T
from ..unifusion.flow import check_guidance_max_t, guided_at
from .types import CATEGORY


def limit_guidance(model: Any, guidance_max_t: float) -> Any:
    """A clone of ``model`` whose sampler keeps the CFG result only at noise levels (sigma, which is t for
    a flow model) up to ``guidance_max_t`` and the conditional prediction above it. A post-CFG function,
    so it chains with other guidance nodes instead of replacing them."""
    limit = check_guidance_max_t(guidance_max_t)
    patched = model.clone()
    if limit >= 1.0:
        return patched  # every step guided: nothing to change

    def conditional_above_limit(args: dict[str, Any]) -> Any:
        if args.get("uncond_denoised") is None or guided_at(float(args["sigma"].max()), limit):
            return args["denoised"]
        return args["cond_denoised"]

    patched.set_model_sampler_post_cfg_function(conditional_above_limit)
    return patched


class UniFusionGuidanceInterval(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniFusionGuidanceInterval",
            display_name="UniFusion Guidance Interval",
            category=CATEGORY,
            description="Applies KSampler's CFG only at noise levels up to guidance_max_t; the first, noisiest "
                        "steps follow the prompt alone. There the layout is decided, and guidance pushes what a "
                        "prompt leaves open (where the shapes go) into every place at once: on the demo model, "
                        "prompts that name no place drew extra shapes. `unifusion generate` samples the same way.",
            inputs=[
                io.Model.Input("model", tooltip="From Load UniFusion Model (after any ModelSampling node)."),
                io.Float.Input("guidance_max_t", default=DEFAULT_GUIDANCE_MAX_T, min=0.01, max=1.0, step=0.01,
                               tooltip="Highest noise level (sigma, 1 = pure noise) at which CFG applies. 1.0: "
                                       "every step, as without this node. 0.8: the demo's default (with 20 "
                                       "steps at shift 1.6, the first 6 steps unguided)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with limited guidance, for KSampler.")],
        )

    @classmethod
    def execute(cls, model, guidance_max_t: float) -> io.NodeOutput:
        return io.NodeOutput(limit_guidance(model, guidance_max_t))
