"""Loader nodes: the frozen VLM and the UniFusion checkpoint (LAP + DiT) as a native MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from ..unifusion.checkpoint import read_checkpoint_header
from . import paths
from .model import WEIGHT_DTYPES, load_model_patcher
from .types import CATEGORY, VLM
from .vlm import VLM_DTYPES, load_vlm_patcher


class UniFusionVLMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniFusionVLMLoader",
            display_name="Load UniFusion VLM",
            category=CATEGORY,
            description="Loads the frozen vision-language model that encodes prompts and reference images. "
                        "Use the VLM the UniFusion checkpoint was trained with.",
            inputs=[
                io.Combo.Input("vlm", options=paths.vlm_names(),
                               tooltip="A transformers VLM folder under models/unifusion_vlm/ (config.json, "
                                       "weights, tokenizer), or the bundled demo VLM."),
                io.Combo.Input("dtype", options=list(VLM_DTYPES), default="default",
                               tooltip="Weight dtype. default: bf16 on GPUs that support it, fp16 on other "
                                       "GPUs, fp32 on CPU. fp8_e4m3fn: Linear weights stored in 8 bits (about "
                                       "half the memory of bf16, e.g. an 8B VLM on a 12 GB card), computed in "
                                       "the default dtype."),
                io.String.Input("layers", default="paper",
                                tooltip="Decoder layers whose states are captured: 'paper' (every 3rd layer "
                                        "from 4, the paper's choice), 'all' (0 to the last; the demo "
                                        "checkpoint pools 0, 4, 7, 10), or numbers like '4, 7, 10' (0 is the "
                                        "input embeddings). UniFusion LAP Pool needs the checkpoint's layers "
                                        "among them; UniFusion Text Encode always uses the checkpoint's."),
                io.Boolean.Input("trust_remote_code", default=False, optional=True,
                                 tooltip="Off (safe): only VLMs that transformers supports natively load. On: "
                                         "Python code shipped in the model folder runs when it loads; turn it on "
                                         "only for a folder whose code you trust."),
            ],
            outputs=[VLM.Output(display_name="vlm", tooltip="The VLM, managed by ComfyUI's memory manager.")],
        )

    @classmethod
    def execute(cls, vlm: str, dtype: str, layers: str, trust_remote_code: bool = False) -> io.NodeOutput:
        return io.NodeOutput(load_vlm_patcher(paths.vlm_path(vlm), dtype, layers, trust_remote_code))


class UniFusionModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniFusionModelLoader",
            display_name="Load UniFusion Model",
            category=CATEGORY,
            description="Loads a UniFusion checkpoint (LAP + DiT) as a MODEL for the native KSampler. "
                        "Change the sampling shift with ModelSamplingAuraFlow.",
            inputs=[
                io.Combo.Input("checkpoint", options=paths.checkpoint_names(),
                               tooltip="A UniFusion .safetensors checkpoint from models/diffusion_models/, or "
                                       "the bundled demo checkpoint."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Storage dtype of the weights. default: chosen by ComfyUI for this "
                                       "device; fp8_e4m3fn halves memory (computed in a wider dtype)."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="A flow-matching MODEL; it also carries the LAP weights that "
                                             "UniFusion LAP Pool runs.")],
        )

    @classmethod
    def execute(cls, checkpoint: str, weight_dtype: str) -> io.NodeOutput:
        path = paths.checkpoint_path(checkpoint)
        head = read_checkpoint_header(path)  # a clear error for a foreign or damaged file, before loading
        vae = paths.training_vae_path(head.config.extra, checkpoint)
        return io.NodeOutput(load_model_patcher(path, weight_dtype, vae))
