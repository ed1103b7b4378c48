"""VLM encoding nodes: reference images, plain encoding and the Verifi rewrite."""

from __future__ import annotations

from typing import Optional

import torch
from comfy_api.latest import io

from ..unifusion.vlm.verifi import DEFAULT_SYSTEM_PROMPT
from .encoding import encode_features, verifi_features
from .types import CATEGORY, VLM, Features, References
from .values import MAX_TILES, References as ReferenceTuple, add_references

MAX_NEW_TOKENS = 4096


class UniFusionReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniFusionReference",
            display_name="UniFusion Reference",
            category=CATEGORY,
            description="Adds reference images for editing. Chain these nodes for any number of references; "
                        "their order is the order the VLM sees them in. Several references reach the VLM labelled "
                        "'Image-1: ', 'Image-2: ', ... (InternVL's multi-image chat), so an instruction can name "
                        "them as 'image 1', 'image 2'.",
            inputs=[
                io.Image.Input("image", tooltip="The reference image; every image of a batch becomes its own "
                                                "reference."),
                io.Int.Input("max_tiles", default=6, min=1, max=MAX_TILES,
                             tooltip="Tile budget of this image: more tiles keep more detail and cost more VLM "
                                     "tokens (InternVL: 448x448 tiles, 256 tokens each; Qwen: a pixel cap of "
                                     "that many tiles)."),
                References.Input("references", optional=True,
                                 tooltip="References from a previous UniFusion Reference node; this image is "
                                         "added after them."),
            ],
            outputs=[References.Output(display_name="references",
                                       tooltip="The references so far, in order.")],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, max_tiles: int,
                references: Optional[ReferenceTuple] = None) -> io.NodeOutput:
        return io.NodeOutput(add_references(references, image, max_tiles))


def _text_input(tooltip: str) -> io.String.Input:
    return io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip=tooltip)


class UniFusionEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniFusionEncode",
            display_name="UniFusion Encode",
            category=CATEGORY,
            description="Encodes the prompt and reference images with the VLM (one forward pass). The image "
                        "tokens and the prompt's own tokens condition the image; the system prompt and chat "
                        "template only give context.",
            inputs=[
                VLM.Input("vlm", tooltip="From Load UniFusion VLM."),
                _text_input("The prompt, or the edit instruction when references are connected."),
                References.Input("references", optional=True,
                                 tooltip="Reference images from UniFusion Reference nodes (for editing)."),
                io.String.Input("system_prompt", multiline=True, default="", dynamic_prompts=False, optional=True,
                                tooltip="Optional system prompt (context only: its tokens do not condition "
                                        "the image). Empty sends none."),
            ],
            outputs=[Features.Output(display_name="features",
                                     tooltip="VLM layer features for UniFusion LAP Pool.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, vlm, text: str, references: Optional[ReferenceTuple] = None,
                system_prompt: str = "") -> io.NodeOutput:
        features = encode_features(vlm, text, references, system_prompt, node_id=cls.hidden.unique_id)
        return io.NodeOutput(features, ui={"unifusion_summary": [features.summary]})


class UniFusionVerifiRewrite(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniFusionVerifiRewrite",
            display_name="UniFusion Verifi Rewrite",
            category=CATEGORY,
            description="Verifi: the VLM rewrites the prompt into a detailed description in one generation "
                        "pass, and the image is conditioned on the states of the tokens it wrote (plus the "
                        "reference images). Shows the rewritten prompt on the node.",
            inputs=[
                VLM.Input("vlm", tooltip="From Load UniFusion VLM."),
                _text_input("The request to rewrite (a prompt or an edit instruction)."),
                References.Input("references", optional=True,
                                 tooltip="Reference images from UniFusion Reference nodes (for editing)."),
                io.String.Input("system_prompt", multiline=True, default=DEFAULT_SYSTEM_PROMPT,
                                dynamic_prompts=False,
                                tooltip="Tells the VLM how to rewrite. Empty sends no system prompt."),
                io.Int.Input("max_new_tokens", default=128, min=1, max=MAX_NEW_TOKENS,
                             tooltip="Longest rewrite in tokens; a longer answer is cut there."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for sampling (used only when do_sample is on)."),
                io.Boolean.Input("do_sample", default=False,
                                 tooltip="Off: greedy decoding (the same rewrite every time). On: sampled "
                                         "(temperature 0.7, top-p 0.9), different per seed."),
            ],
            outputs=[
                Features.Output(display_name="features", tooltip="VLM features of the rewrite, for UniFusion "
                                                                 "LAP Pool."),
                io.String.Output(display_name="rewritten", tooltip="The rewritten prompt as text."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, vlm, text: str, system_prompt: str, max_new_tokens: int, seed: int, do_sample: bool,
                references: Optional[ReferenceTuple] = None) -> io.NodeOutput:
        features = verifi_features(vlm, text, references, system_prompt, max_new_tokens, seed, do_sample,
                                   node_id=cls.hidden.unique_id)
        return io.NodeOutput(features, features.rewritten,
                             ui={"unifusion_text": [features.rewritten], "unifusion_summary": [features.summary]})
