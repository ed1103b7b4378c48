"""Parsing and checking of node widget values; pure (no ComfyUI), so tests run anywhere.

Every error is an `InputError` whose message names the node input and says what to type
instead; ComfyUI shows it as the prompt's failure message.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from ..unifusion.config import default_layer_selection
from ..unifusion.errors import InputError

LAYERS_PAPER = "paper"
LAYERS_ALL = "all"
_SPLIT = re.compile(r"[,\s;]+")


def _numbers(text: str) -> list[str]:
    return [item for item in _SPLIT.split(text.strip()) if item]


def parse_layers(text: str, num_layers: int, stride: int = 3) -> tuple[int, ...]:
    """VLM layers to capture: "" or "paper" (every 3rd from 4, the paper's choice),
    "all" (0 to the last), or a list such as "4, 7, 10" (layer k = output of decoder layer k, from 1;
    layer 0 = the input embeddings)."""
    value = (text or "").strip().lower()
    if value in ("", LAYERS_PAPER):
        return default_layer_selection(num_layers, stride)
    if value == LAYERS_ALL:
        return tuple(range(0, num_layers + 1))
    layers = []
    for item in _numbers(value):
        try:
            layers.append(int(item))
        except ValueError:
            raise InputError(
                f"layers: {item!r} is not a layer number; type 'paper', 'all' or numbers like '4, 7, 10'"
            ) from None
    bad = [k for k in layers if not 0 <= k <= num_layers]
    if bad:
        raise InputError(f"layers: {bad} are outside 0..{num_layers}; this VLM has {num_layers} decoder layers "
                         "(0 is the input embeddings)")
    if len(set(layers)) != len(layers):
        raise InputError(f"layers: {layers} lists a layer twice; list each layer once")
    return tuple(sorted(layers))


def layer_positions(wanted: Sequence[int], captured: Sequence[int], checkpoint: str = "the checkpoint") -> list[int]:
    """Positions of the checkpoint's layers inside the captured ones (a superset is fine)."""
    index = {layer: i for i, layer in enumerate(captured)}
    missing = [layer for layer in wanted if layer not in index]
    if missing:
        need = ", ".join(str(k) for k in wanted)
        raise InputError(
            f"{checkpoint} pools VLM layers [{need}] but the features hold layers {list(captured)} "
            f"(missing {missing}). Set 'layers' on Load UniFusion VLM to '{need}' (or 'all'), or use "
            "UniFusion Text Encode, which always captures the checkpoint's layers."
        )
    return [index[layer] for layer in wanted]


def parse_gains(text: str, layers: Sequence[int]) -> list[float] | None:
    """Per-layer LAP gains: "" (none), one value per pooled layer ("1, 1, 0.5, ..."), or
    layer=gain pairs ("7=0.5, 31=2") where unlisted layers keep 1. None means untouched."""
    value = (text or "").strip()
    if not value:
        return None
    items = _numbers(value)
    if any("=" in item or ":" in item for item in items):
        gains = _pairs(items, layers)
    else:
        if len(items) != len(layers):
            raise InputError(
                f"layer_gains: {len(items)} values given but the checkpoint pools {len(layers)} VLM layers "
                f"{list(layers)}; give {len(layers)} values, or pairs like '{layers[0]}=0.5'"
            )
        gains = [_gain(item) for item in items]
    if not any(g > 0 for g in gains):
        raise InputError("layer_gains: every gain is 0, which drops every layer; keep at least one above 0")
    return gains


def _gain(item: str) -> float:
    try:
        value = float(item)
    except ValueError:
        raise InputError(f"layer_gains: {item!r} is not a number; use values like 1, 0.5 or 2") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"layer_gains: {item} must be a finite number >= 0 (0 drops a layer)")
    return value


def _pairs(items: Sequence[str], layers: Sequence[int]) -> list[float]:
    gains = {layer: 1.0 for layer in layers}
    for item in items:
        key, sep, val = item.replace(":", "=").partition("=")
        if not sep:
            raise InputError(f"layer_gains: mix of plain values and layer=gain pairs ({item!r}); use one form")
        try:
            layer = int(key)
        except ValueError:
            raise InputError(f"layer_gains: {key!r} in {item!r} is not a layer number") from None
        if layer not in gains:
            raise InputError(f"layer_gains: layer {layer} is not pooled by this checkpoint; pooled layers: "
                             f"{list(layers)}")
        gains[layer] = _gain(val)
    return [gains[layer] for layer in layers]


def check_prompt(text: str, num_images: int, node: str) -> str:
    """The prompt text, or a clear error when there is neither text nor an image."""
    text = text or ""
    if not text.strip() and num_images == 0:
        raise InputError(f"{node}: the text is empty and no reference image is connected; type a prompt or "
                         "connect a UniFusion Reference")
    return text


def encode_summary(tokens: int, condition_tokens: int, tiles: Sequence[int], image_tokens: int) -> str:
    """One line for the encode node: tokens, condition tokens, images and their tile budgets."""
    line = f"{tokens} tokens, {condition_tokens} condition"
    if tiles:
        budget = ", ".join(str(t) for t in tiles)
        line += f"; {len(tiles)} image{'s' if len(tiles) != 1 else ''} ({image_tokens} image tokens, tiles <= {budget})"
    else:
        line += "; no images"
    return line
