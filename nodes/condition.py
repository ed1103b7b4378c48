"""Nodes that turn VLM features into native CONDITIONING through the checkpoint's LAP."""

from __future__ import annotations

from typing import Optional

from comfy_api.latest import io

from ..unifusion.vlm.verifi import DEFAULT_SYSTEM_PROMPT
from .encode import MAX_NEW_TOKENS
from .encoding import check_vlm, encode_features, lap_conditioning, unifusion_config, verifi_features
from .types import CATEGORY, VLM, Features, References
from .values import ConditionFeatures, References as ReferenceTuple

GAINS_TOOLTIP = ("Optional per-layer LAP gains, an artist control: one value per pooled VLM layer ('1, 1, 0.5, "
                 "...') or layer=gain pairs ('7=0.5, 31=2', others stay 1). 0 drops a layer, above 1 "
                 "strengthens it. Empty: the model as trained.")


class UniFusionLAPPool(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniFusionLAPPool",
            display_name="UniFusion LAP Pool",
            category=CATEGORY,
            description="Runs the checkpoint's layerwise attention pooling and refiner once on the VLM features "
                        "and gives the CONDITIONING for KSampler. For the negative use ConditioningZeroOut.",
            inputs=[
                io.Model.Input("model", tooltip="From Load UniFusion Model (LoRAs applied to it apply here too)."),
                Features.Input("features", tooltip="From UniFusion Encode or UniFusion Verifi Rewrite."),
                io.String.Input("layer_gains", default="", optional=True, tooltip=GAINS_TOOLTIP),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="Condition tokens with their attention mask.")],
        )

    @classmethod
    def execute(cls, model, features: ConditionFeatures, layer_gains: str = "") -> io.NodeOutput:
        return io.NodeOutput(lap_conditioning(model, features, layer_gains))


NODE_NAME = "UniFusion Text Encode"


class UniFusionTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniFusionTextEncode",
            display_name=NODE_NAME,
            category=CATEGORY,
            description="Prompt (+ references) to CONDITIONING in one node: VLM encode or Verifi rewrite, then "
                        "LAP. Always captures the VLM layers the checkpoint was trained on.",
            inputs=[
                VLM.Input("vlm", tooltip="From Load UniFusion VLM."),
                io.Model.Input("model", tooltip="From Load UniFusion Model."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt, or the edit instruction when references are connected."),
                io.Boolean.Input("verifi", default=False,
                                 tooltip="On: the VLM first rewrites the prompt (Verifi) with the default "
                                         "system prompt, greedy decoding."),
                io.Int.Input("max_new_tokens", default=128, min=1, max=MAX_NEW_TOKENS,
                             tooltip="Longest Verifi rewrite in tokens (only with verifi on)."),
                References.Input("references", optional=True,
                                 tooltip="Reference images from UniFusion Reference nodes (for editing)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="For KSampler's positive input."),
                io.String.Output(display_name="prompt",
                                 tooltip="The rewritten prompt with verifi on, else the prompt as given."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, vlm, model, text: str, verifi: bool, max_new_tokens: int,
                references: Optional[ReferenceTuple] = None) -> io.NodeOutput:
        check_vlm(model, vlm)
        layers = unifusion_config(model).vlm.selected_layers
        node_id = cls.hidden.unique_id
        if verifi:
            features = verifi_features(vlm, text, references, DEFAULT_SYSTEM_PROMPT, max_new_tokens, 0, False,
                                       node_id=node_id, layers=layers, node=NODE_NAME)
        else:
            features = encode_features(vlm, text, references, node_id=node_id, layers=layers, node=NODE_NAME)
        prompt = features.rewritten if verifi else text
        ui = {"unifusion_summary": [features.summary]}
        if verifi:
            ui["unifusion_text"] = [prompt]
        return io.NodeOutput(lap_conditioning(model, features), prompt, ui=ui)
