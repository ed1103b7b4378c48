"""Load a local transformers VLM folder as the frozen condition encoder.

Only local folders are read (``local_files_only=True``) and only safetensors weights
(``use_safetensors=True``): a folder with nothing but pickled ``.bin``/``.pt`` weights is
refused before transformers could ``torch.load`` it. Supported: InternVL in the
native ``-hf`` layout (``InternVLForConditionalGeneration``), Qwen2.5-VL, Qwen3-VL and any
other ``AutoModelForImageTextToText`` model whose decoder layers can be found (text
prompts only for those). The tokenizer and the image processor are loaded separately
rather than as one ``AutoProcessor``: InternVL's and Qwen's processors also build a
video processor, which needs torchvision; `unifusion.vlm.prompt` expands the image
tokens itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from torch import nn

from ..config import ConfigError, VLMIdentity, default_layer_selection
from ..errors import UniFusionError
from .layers import LayerCaptureError, find_decoder_layers

logger = logging.getLogger(__name__)

# model_type -> prompt family; families decide how image placeholders are expanded.
FAMILY_BY_MODEL_TYPE = {
    "internvl": "internvl",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl",
}
HF_INTERNVL_HINT = "OpenGVLab/InternVL2_5-8B-MPO-hf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


class VLMLoadError(UniFusionError, ValueError):
    """A VLM folder cannot be used; the message names the folder and the fix."""


def identity_of(model: nn.Module, selected_layers: Sequence[int] | None = None, layer_stride: int = 3) -> VLMIdentity:
    """The `VLMIdentity` a UniFusion checkpoint records for this model (works on meta tensors)."""
    text_config = model.config.get_text_config()
    num_layers = len(find_decoder_layers(model))
    if selected_layers is None:
        selected_layers = default_layer_selection(num_layers, layer_stride)
    layers = tuple(selected_layers)
    return VLMIdentity(type(model).__name__, num_layers, int(text_config.hidden_size), layers)


@dataclass
class LoadedVLM:
    """A frozen VLM with what encoding needs: tokenizer, image processor, chosen layers."""

    model: nn.Module
    tokenizer: Any
    image_processor: Any | None
    family: str
    selected_layers: tuple[int, ...]
    folder: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_parts(
        cls,
        model: nn.Module,
        tokenizer: Any,
        image_processor: Any | None = None,
        layer_stride: int = 3,
        selected_layers: Sequence[int] | None = None,
        folder: Path | None = None,
    ) -> "LoadedVLM":
        """Wrap an in-memory model (e.g. one being trained) like `load_vlm` does."""
        identity = identity_of(model, selected_layers, layer_stride)
        family = FAMILY_BY_MODEL_TYPE.get(model.config.model_type, model.config.model_type)
        return cls(model, tokenizer, image_processor, family, identity.selected_layers, folder)

    @property
    def identity(self) -> VLMIdentity:
        return identity_of(self.model, self.selected_layers)

    @cached_property
    def decoder_layers(self) -> nn.ModuleList:
        return find_decoder_layers(self.model)

    @property
    def base_model(self) -> nn.Module:
        """The model without its LM head (``ForConditionalGeneration.model``)."""
        return self.model.base_model

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def max_length(self) -> int:
        """Longest prompt in tokens: the position limit, or the tokenizer's if smaller."""
        limit = int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 0) or 1 << 30)
        tokenizer_limit = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        return min(limit, tokenizer_limit) if 0 < tokenizer_limit < 1 << 30 else limit

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (with fp8 weight storage, the dtype weights are cast to)."""
        from .fp8 import compute_dtype

        return compute_dtype(self.model)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        if (folder / "model_index.json").is_file():
            raise VLMLoadError(
                f"{folder} is a diffusers pipeline (model_index.json), not a VLM; pick a vision-language model "
                f"folder such as {HF_INTERNVL_HINT}"
            )
        raise VLMLoadError(
            f"{folder} has no config.json, so it is not a transformers model folder; download the whole model "
            f"repository (e.g. {HF_INTERNVL_HINT}) into it"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VLMLoadError(f"{path} is unreadable ({exc}); download the model folder again") from exc


def _check_config(folder: Path, raw: dict[str, Any], trust_remote_code: bool) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if "InternVLChatModel" in architectures or model_type == "internvl_chat":
        raise VLMLoadError(
            f"{folder} is the original InternVL remote-code layout (InternVLChatModel), which does not run under "
            f"transformers 5; use the '-hf' conversion of the same model instead (e.g. {HF_INTERNVL_HINT})"
        )
    if model_type is None:
        kind = f"a {raw['_class_name']} (diffusers) model" if "_class_name" in raw else "a model without model_type"
        raise VLMLoadError(f"{folder}/config.json describes {kind}, not a VLM; pick a vision-language model folder")
    remote = "auto_map" in raw and model_type not in CONFIG_MAPPING_NAMES
    if remote and not trust_remote_code:
        raise VLMLoadError(
            f"{folder} needs its own Python code (model_type {model_type!r} is unknown to transformers); use a "
            "natively supported VLM folder, or pass trust_remote_code=True if you trust that code"
        )
    if not remote and model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise VLMLoadError(
            f"{folder} holds a {model_type!r} model ({', '.join(architectures) or 'no architectures'}), which is not "
            f"a vision-language model; pick an image-text-to-text folder such as {HF_INTERNVL_HINT}"
        )


def _check_files(folder: Path) -> None:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise VLMLoadError(
            f"{folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); copy them from the model repository"
        )
    if not any((folder / name).is_file() for name in _IMAGE_PROCESSOR_FILES):
        raise VLMLoadError(
            f"{folder} has no image processor config ({' or '.join(_IMAGE_PROCESSOR_FILES)}); copy it from the "
            "model repository"
        )


def _check_weights(folder: Path) -> None:
    """Safetensors weights only: pickled files can run code when loaded, so they are never read."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in _PICKLED_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise VLMLoadError(
            f"{folder} holds only pickled weights ({', '.join(pickled[:3])}), which are never loaded because "
            "unpickling can run code; download the repository's .safetensors files instead"
        )
    raise VLMLoadError(f"{folder} has no weights (model.safetensors or its shards); download the model folder again")


def _chat_template(folder: Path, tokenizer: Any) -> None:
    """Processor-level templates (chat_template.json / .jinja) also count; the tokenizer needs one."""
    if getattr(tokenizer, "chat_template", None):
        return
    jinja, js = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        tokenizer.chat_template = jinja.read_text(encoding="utf-8")
    elif js.is_file():
        tokenizer.chat_template = json.loads(js.read_text(encoding="utf-8"))["chat_template"]
    else:
        raise VLMLoadError(f"{folder} has no chat template (tokenizer_config.json, chat_template.jinja or .json)")


def load_vlm(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    layer_stride: int = 3,
    selected_layers: Sequence[int] | None = None,
) -> LoadedVLM:
    """Load a local VLM folder, frozen and in eval mode, with its tokenizer and image processor."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    folder = Path(folder).expanduser()
    if not folder.exists():
        raise VLMLoadError(f"VLM folder {folder} does not exist; download a model folder (e.g. {HF_INTERNVL_HINT})")
    if not folder.is_dir():
        raise VLMLoadError(f"{folder} is a file; point to the model folder that holds config.json and the weights")
    raw = _read_config(folder)
    _check_config(folder, raw, trust_remote_code)
    _check_files(folder)
    _check_weights(folder)
    if trust_remote_code:
        logger.warning("loading %s with trust_remote_code=True: Python code from that folder will run", folder)
    common = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **common)
        image_processor = AutoImageProcessor.from_pretrained(folder, **common)
    except (OSError, ValueError, KeyError) as exc:
        raise VLMLoadError(
            f"cannot load the tokenizer/image processor of {folder} ({exc}); copy the tokenizer files "
            f"({', '.join(_TOKENIZER_FILES)}) and {_IMAGE_PROCESSOR_FILES[0]} from the model repository"
        ) from exc
    _chat_template(folder, tokenizer)
    try:
        # use_kernels=False: transformers swaps layers for Hub kernels by default where the `kernels` package is
        # installed (on CUDA it fetches them from the Hub, which fails offline and runs downloaded code); the
        # checkpoint's LAP was trained on the model's own layers.
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, device_map=str(device),
                                                            use_safetensors=True, use_kernels=False, **common)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise VLMLoadError(f"cannot load the weights of {folder} ({exc}); download the model folder again") from exc
    model.eval().requires_grad_(False)
    try:
        return LoadedVLM.from_parts(model, tokenizer, image_processor, layer_stride, selected_layers, folder)
    except (LayerCaptureError, ConfigError) as exc:
        raise VLMLoadError(f"{folder}: {exc}") from exc
