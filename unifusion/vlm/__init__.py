"""The frozen VLM encoder: loading, chat building, image tiling, layer capture, encoding.

Verifi (prompt rewriting with per-token capture during ``generate``) builds on
`build_prompts` (``padding_side="left"`` for batched generation) and `LayerCapture`.
"""

from .encode import VLMFeatures, encode, encode_prompt, paper_keep
from .images import dynamic_tiles, max_pixels_for_tiles, tile_grid, to_pil, to_pil_list
from .layers import LayerCapture, LayerCaptureError, find_decoder_layers, layer_progress
from .loader import LoadedVLM, VLMLoadError, identity_of, load_vlm
from .prompt import PromptInputs, build_prompt, build_prompts
from .tiny import FAMILIES, TinyVLMError, build_tiny_vlm, build_tokenizer

__all__ = [
    "FAMILIES",
    "LayerCapture",
    "LayerCaptureError",
    "LoadedVLM",
    "PromptInputs",
    "TinyVLMError",
    "VLMFeatures",
    "VLMLoadError",
    "build_prompt",
    "build_prompts",
    "build_tiny_vlm",
    "build_tokenizer",
    "dynamic_tiles",
    "encode",
    "encode_prompt",
    "find_decoder_layers",
    "identity_of",
    "layer_progress",
    "load_vlm",
    "max_pixels_for_tiles",
    "paper_keep",
    "tile_grid",
    "to_pil",
    "to_pil_list",
]
