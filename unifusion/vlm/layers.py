"""Find a VLM's language-model decoder layers and capture the selected ones with hooks.

Layer ``k`` (counted from 1) is the output of decoder layer index ``k - 1``, taken before
any final norm, so it equals ``hidden_states[k]`` of ``output_hidden_states=True`` for
every ``k`` below the layer count without keeping every layer's states in memory.
Layer 0 is the input of decoder layer index 0 (the token embeddings with any image
features merged in, ``hidden_states[0]``).
Each forward appends only its new positions, so one capture works for a single
encoding forward and for ``generate``, where each step sees one new token.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import UniFusionError

# Where transformers keeps the language model's decoder layers, most specific first.
_KNOWN_PATHS = (
    "model.language_model.layers",
    "model.language_model.model.layers",
    "language_model.model.layers",
    "language_model.layers",
    "model.text_model.layers",
    "model.layers",
)
_VISION_HINTS = ("vision", "visual", "image", "audio", "projector")


class LayerCaptureError(UniFusionError, ValueError):
    """Decoder layers cannot be found or a requested layer does not exist."""


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of a transformers VLM (or a bare text model)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    expected = getattr(text_config, "num_hidden_layers", None)
    for path in _KNOWN_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (expected is None or len(module) == expected)
        and not any(hint in name.lower() for hint in _VISION_HINTS)
    ]
    if len(candidates) == 1:
        return candidates[0][1]
    found = ", ".join(name for name, _ in candidates) or "none"
    raise LayerCaptureError(
        f"cannot find the language-model decoder layers of {type(model).__name__} "
        f"(expected {expected} layers; candidate ModuleLists: {found}); this architecture is not supported yet, "
        "use InternVL (-hf), Qwen2.5-VL or Qwen3-VL"
    )


def _check_selection(layers: nn.ModuleList, selected: Sequence[int]) -> tuple[int, ...]:
    selected = tuple(int(k) for k in selected)
    if not selected:
        raise LayerCaptureError("no layers selected: pass at least one layer number (counted from 1; "
                                "0 = the input embeddings)")
    bad = [k for k in selected if not 0 <= k <= len(layers)]
    if bad:
        raise LayerCaptureError(
            f"layers {bad} do not exist: this VLM has decoder layers 1..{len(layers)} (layer k = output of layer k, "
            "layer 0 = the input embeddings)"
        )
    return selected


class LayerCapture:
    """Context manager hooking the selected decoder layers.

    Each forward writes its selected layer outputs straight into one ``(B, n_new, L, H)``
    buffer (no per-layer lists, no copy at the end), so capture holds the selected
    layers once: about 1/N of what ``output_hidden_states=True`` keeps. `stacked`
    concatenates the forwards along the sequence (generate runs one forward per token),
    giving ``(B, S, L, H)`` in the order of `selected`.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        selected: Sequence[int],
        store_device: torch.device | str | None = None,
    ) -> None:
        self.layers = layers
        self.selected = _check_selection(layers, selected)
        self.store_device = store_device
        self._slots: dict[int, list[int]] = {}
        for i, k in enumerate(self.selected):
            self._slots.setdefault(k, []).append(i)
        self._first = min(self.selected)  # hooks fire in layer order: this one opens a new forward
        self._buffers: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, k: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            self._store(k, output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    def _input_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Layer 0: the hidden states decoder layer 1 is called with."""
        self._store(0, args[0] if args else kwargs["hidden_states"])

    def _store(self, k: int, hidden: torch.Tensor) -> None:
        hidden = hidden.detach()  # (B, n_new, H)
        if k == self._first:
            b, n, h = hidden.shape
            device = self.store_device if self.store_device is not None else hidden.device
            self._buffers.append(hidden.new_empty((b, n, len(self.selected), h), device=device))
        buf = self._buffers[-1]  # (B, n_new, L, H)
        for i in self._slots[k]:
            buf[:, :, i] = hidden

    def __enter__(self) -> "LayerCapture":
        for k in self._slots:
            if k == 0:
                self._handles.append(self.layers[0].register_forward_pre_hook(self._input_hook, with_kwargs=True))
            else:
                self._handles.append(self.layers[k - 1].register_forward_hook(self._hook(k)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget captured states (e.g. between prompts) while keeping the hooks."""
        self._buffers.clear()

    @property
    def num_forwards(self) -> int:
        return len(self._buffers)

    def per_layer(self, k: int) -> list[torch.Tensor]:
        """The raw per-forward outputs of layer `k`, each ``(B, n_new, H)``."""
        i = self._slots[k][0]
        return [buf[:, :, i] for buf in self._buffers]

    def stacked(self) -> torch.Tensor:
        """``(B, S, L, H)``: all captured positions for each selected layer."""
        if self.num_forwards == 0:
            raise LayerCaptureError("nothing captured: run the model inside the `with LayerCapture(...)` block")
        if self.num_forwards == 1:
            return self._buffers[0]
        return torch.cat(self._buffers, dim=1)  # (B, S, L, H)


@contextlib.contextmanager
def layer_progress(layers: nn.ModuleList, callback: Callable[[int, int], None] | None) -> Iterator[None]:
    """Call ``callback(done, total)`` after each decoder layer; it may raise to abort
    (ComfyUI's interrupt does), which stops the forward at once."""
    if callback is None:
        yield
        return
    total = len(layers)
    handles = [
        layer.register_forward_hook(lambda module, args, output, i=i: callback(i + 1, total))
        for i, layer in enumerate(layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
