"""Classifier-free guidance limited to an interval of noise levels, as `unifusion generate` samples by default."""

from __future__ import annotations

from typing import Any

import comfy.patcher_extension
from comfy_api.latest import io

from ..unifusion.config import DEFAULT_GUIDANCE_MAX_T, DEFAULT_GUIDANCE_MIN_T
from ..unifusion.flow import check_guidance_interval, guided_at
from .types import CATEGORY

WRAPPER_KEY = "unifusion_guidance_interval"


def limit_guidance(model: Any, guidance_min_t: float, guidance_max_t: float) -> Any:
    """A clone of ``model`` that runs the unconditional prediction only at noise levels (sigma, which is t
    for a flow model) in [``guidance_min_t``, ``guidance_max_t``]. Elsewhere it skips that forward and hands
    KSampler the conditional prediction as both, so CFG returns the conditional one, as
    `unifusion.flow.euler_sample` does. A calc-cond-batch wrapper (as ComfyUI's EasyCache), so it chains
    with other sampler patches instead of replacing them."""
    interval = check_guidance_interval(guidance_min_t, guidance_max_t)
    patched = model.clone()
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY)
    if interval == (0.0, 1.0):
        return patched  # every step guided: nothing to change

    def conditional_outside_interval(executor: Any, model: Any, conds: list, x_in: Any, timestep: Any,
                                     model_options: dict) -> list:
        if len(conds) != 2 or conds[1] is None or guided_at(float(timestep.max()), *interval):
            return executor(model, conds, x_in, timestep, model_options)
        cond_out = executor(model, [conds[0], None], x_in, timestep, model_options)[0]
        return [cond_out, cond_out]

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                 conditional_outside_interval)
    return patched


class UniFusionGuidanceInterval(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniFusionGuidanceInterval",
            display_name="UniFusion Guidance Interval",
            category=CATEGORY,
            description="Applies KSampler's CFG only at noise levels from guidance_min_t to guidance_max_t; the "
                        "other steps follow the prompt alone. At the noisiest steps the layout is decided, and "
                        "guidance pushes what a prompt leaves open (where the shapes go) into every place at once; "
                        "at the last ones it reshapes what is already drawn. On the demo model the interval draws "
                        "placeless prompts with the right count and keeps more of an edited image. `unifusion "
                        "generate` samples the same way.",
            inputs=[
                io.Model.Input("model", tooltip="From Load UniFusion Model (after any ModelSampling node)."),
                io.Float.Input("guidance_min_t", default=DEFAULT_GUIDANCE_MIN_T, min=0.0, max=1.0, step=0.01,
                               tooltip="Lowest noise level (sigma: 1 is pure noise, 0 the image) at which CFG "
                                       "applies. 0 with guidance_max_t 1: every step, as without this node."),
                io.Float.Input("guidance_max_t", default=DEFAULT_GUIDANCE_MAX_T, min=0.01, max=1.0, step=0.01,
                               tooltip="Highest noise level at which CFG applies. The defaults 0.5 to 0.8 guide 7 "
                                       "of 20 steps at shift 1.6 (the demo's); the other 13 skip the "
                                       "unconditional pass."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with limited guidance, for KSampler.")],
        )

    @classmethod
    def execute(cls, model, guidance_min_t: float, guidance_max_t: float) -> io.NodeOutput:
        return io.NodeOutput(limit_guidance(model, guidance_min_t, guidance_max_t))
