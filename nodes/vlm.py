"""The frozen VLM as a ComfyUI-managed model, plus progress/interrupt glue for the library.

A transformers model cannot sit in a ModelPatcher directly (ComfyUI assigns ``model.device``,
a read-only property there), so a plain ``nn.Module`` holds it. ComfyUI's memory manager
then loads it (``load_models_gpu``) when a node needs it and offloads it when sampling needs
the room. It is loaded in full: partial (low-VRAM) loading only works for comfy.ops layers.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.utils

from .. import unifusion as library
from ..unifusion.config import VLMIdentity
from ..unifusion.errors import InputError
from ..unifusion.vlm.fp8 import store_linear_weights_fp8
from ..unifusion.vlm.loader import LoadedVLM, load_vlm
from .inputs import parse_layers

logger = logging.getLogger(__name__)

VLM_DTYPES = {"default": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp8_e4m3fn": None}
FP8_STORAGE = "fp8_e4m3fn"  # Linear weights stored in fp8, computed in the default dtype


class VLMHolder(torch.nn.Module):
    """Owns the transformers model (a registered submodule, so it moves with the holder) and
    keeps the tokenizer/processor bundle beside it."""

    def __init__(self, loaded: LoadedVLM) -> None:
        super().__init__()
        self.vlm = loaded.model
        self.loaded = loaded


def default_vlm_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device runs it well, else fp16 on accelerators, fp32 on CPU."""
    mm = comfy.model_management
    if mm.is_device_cpu(device):
        return torch.float32
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if mm.should_use_fp16(device) else torch.float32


def load_vlm_patcher(folder: Path, dtype_name: str, layers: str, trust_remote_code: bool = False,
                     ) -> comfy.model_patcher.ModelPatcher:
    """Load a VLM folder on the offload device and wrap it for ComfyUI's memory manager.
    ``trust_remote_code`` stays off unless the user turns it on in the loader node (the
    library then logs a warning naming the folder)."""
    if dtype_name not in VLM_DTYPES:  # ComfyUI does not check V3 combo values against their options
        raise InputError(f"dtype: {dtype_name!r} is not one of {list(VLM_DTYPES)}; pick one from the list")
    mm = comfy.model_management
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    dtype = VLM_DTYPES[dtype_name] or default_vlm_dtype(load_device)
    loaded = load_vlm(folder, dtype=dtype, device=offload_device, trust_remote_code=bool(trust_remote_code))
    if dtype_name == FP8_STORAGE:
        converted = store_linear_weights_fp8(loaded.model)
        logger.info("VLM %s: %d Linear layers stored in fp8, computed in %s", folder.name, converted, dtype)
    loaded = replace(loaded, selected_layers=parse_layers(layers, loaded.num_layers))
    return comfy.model_patcher.ModelPatcher(VLMHolder(loaded), load_device=load_device, offload_device=offload_device)


def vlm_identity(patcher: comfy.model_patcher.ModelPatcher) -> VLMIdentity:
    """What the loaded VLM is (architecture, layers, width, captured layers); no weights move."""
    return patcher.model.loaded.identity


def use_vlm(patcher: comfy.model_patcher.ModelPatcher, layers: Optional[Sequence[int]] = None) -> LoadedVLM:
    """Ask ComfyUI to put the VLM on its load device (evicting others if needed) and return it,
    optionally capturing other layers than the loader chose."""
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    loaded = patcher.model.loaded
    return loaded if layers is None else replace(loaded, selected_layers=tuple(layers))


def progress_callback(node_id: Optional[str] = None) -> Callable[[int, int], None]:
    """``progress(done, total)`` for the library: drives the node's progress bar and raises
    ComfyUI's interrupt exception when the user cancels (between layers or tokens)."""
    bar: list[comfy.utils.ProgressBar] = []

    def progress(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if not bar:
            bar.append(comfy.utils.ProgressBar(total, node_id=node_id))
        bar[0].update_absolute(done, total)

    return progress


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def library_warnings() -> Iterator[list[str]]:
    """The warnings the library logs meanwhile (e.g. a prompt cut at the VLM's length limit),
    so the node can show them: a line in the server console is easy to miss."""
    handler = _Collect()
    log = logging.getLogger(library.__name__)
    log.addHandler(handler)
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)
