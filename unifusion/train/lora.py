"""LoRA on the DiT's Linear layers: train only the adapters, export for ComfyUI, or merge.

The adapters are two parameters registered on the Linear itself (``lora_down (r, in)``,
``lora_up (out, r)``) plus a forward hook adding ``scale * up(down(x))`` with
``scale = alpha / rank``. The base weights keep their names, so release checkpoints load
into an adapted model unchanged, and any Linear class works (``torch.nn`` or ComfyUI's
``comfy.ops``). ``lora_up`` starts at zero: a fresh adapter changes nothing.

ComfyUI format (checked against comfy/lora.py ``model_lora_keys_unet`` + ``load_lora`` and
comfy/weight_adapter/lora.py ``LoRAAdapter``): for every ``diffusion_model.<name>.weight``
of a MODEL, the key ``diffusion_model.<name>`` is accepted, with the tensors
``<key>.lora_up.weight (out, r)``, ``<key>.lora_down.weight (r, in)`` and a scalar
``<key>.alpha``; the patch is ``W += strength * alpha / r * up @ down``. The pack's MODEL
(nodes/model.py) holds the whole `UniFusionModel` as ``diffusion_model``, so an adapter on
the DiT module ``blocks.0.attn.qkv`` is keyed ``diffusion_model.dit.blocks.0.attn.qkv``
(`COMFY_PREFIX` + the DiT-relative name; `comfy_lora_keys` gives the mapping).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..safetensors_file import write_safetensors
from .errors import TrainConfigError

COMFY_PREFIX = "diffusion_model.dit."  # MODEL.diffusion_model is the UniFusionModel; its DiT is .dit
LORA_FORMAT = "unifusion-lora"


@dataclass
class _Adapter:
    module: nn.Linear
    handle: Any
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _lora_hook(module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    x = inputs[0]
    down, up = module.lora_down.to(x.dtype), module.lora_up.to(x.dtype)
    return output + F.linear(F.linear(x, down), up) * module.lora_scale  # (..., out)


def matching_linears(root: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Linear]:
    """Linear modules of ``root`` whose names match any fnmatch pattern; every pattern must match."""
    linears = {name: m for name, m in root.named_modules() if isinstance(m, nn.Linear)}
    chosen: dict[str, nn.Linear] = {}
    for pattern in patterns:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            examples = ", ".join(list(linears)[:6])
            raise TrainConfigError(f"LoRA target {pattern!r} matches no Linear layer of the DiT; names look like "
                                   f"{examples}")
        chosen.update({n: linears[n] for n in hits})
    return dict(sorted(chosen.items()))


class LoRA:
    """Adapters added to a module tree (usually ``UniFusionModel.dit``)."""

    def __init__(self, root: nn.Module, rank: int, alpha: float, targets: Sequence[str],
                 generator: Optional[torch.Generator] = None) -> None:
        self.root = root
        self.adapters: dict[str, _Adapter] = {}
        for name, module in matching_linears(root, targets).items():
            w = module.weight
            down = torch.empty(rank, module.in_features, dtype=torch.float32)
            bound = 1.0 / math.sqrt(module.in_features)  # kaiming-uniform(a=sqrt(5)), as nn.Linear
            down.uniform_(-bound, bound, generator=generator)
            module.lora_down = nn.Parameter(down.to(device=w.device, dtype=w.dtype))
            module.lora_up = nn.Parameter(torch.zeros(module.out_features, rank, device=w.device, dtype=w.dtype))
            module.lora_scale = alpha / rank
            handle = module.register_forward_hook(_lora_hook)
            self.adapters[name] = _Adapter(module, handle, rank, float(alpha))

    def parameters(self) -> dict[str, nn.Parameter]:
        """Adapter parameters by name relative to the root."""
        out = {}
        for name, a in self.adapters.items():
            out[f"{name}.lora_down"] = a.module.lora_down
            out[f"{name}.lora_up"] = a.module.lora_up
        return out

    def delta(self, name: str) -> Tensor:
        """The weight change of one adapted module: scale * up @ down, float32 ``(out, in)``."""
        a = self.adapters[name]
        return a.scale * (a.module.lora_up.float() @ a.module.lora_down.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter into its base weight and remove the adapters."""
        for name, a in self.adapters.items():
            w = a.module.weight
            w.copy_((w.float() + self.delta(name)).to(w.dtype))
        self.remove()

    def remove(self) -> None:
        for a in self.adapters.values():
            a.handle.remove()
            for attr in ("lora_down", "lora_up", "lora_scale"):
                delattr(a.module, attr)
        self.adapters = {}

    def comfy_state_dict(self, prefix: str = COMFY_PREFIX) -> dict[str, Tensor]:
        """The adapters in ComfyUI's LoRA layout (see the module docstring)."""
        out: dict[str, Tensor] = {}
        for name, a in self.adapters.items():
            key = f"{prefix}{name}"
            out[f"{key}.lora_up.weight"] = a.module.lora_up.detach().float().cpu().contiguous()
            out[f"{key}.lora_down.weight"] = a.module.lora_down.detach().float().cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(a.alpha, dtype=torch.float32)
        return out


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str], seed: int = 0) -> LoRA:
    """Freeze ``model`` and add adapters to its DiT (``model.dit`` when present, else ``model``)."""
    model.requires_grad_(False)
    root = getattr(model, "dit", model)
    lora = LoRA(root, rank, alpha, targets, generator=torch.Generator().manual_seed(seed))
    for p in lora.parameters().values():
        p.requires_grad_(True)
    return lora


def comfy_lora_keys(module_names: Sequence[str], prefix: str = COMFY_PREFIX) -> dict[str, str]:
    """LoRA key -> the ComfyUI MODEL weight it patches, for DiT module names."""
    return {f"{prefix}{n}": f"{prefix}{n}.weight" for n in module_names}


def save_comfy_lora(lora: LoRA, path: str | Path, metadata: Optional[Mapping[str, str]] = None,
                    prefix: str = COMFY_PREFIX) -> Path:
    """Write a .safetensors LoRA that ComfyUI's LoraLoaderModelOnly applies to the UniFusion MODEL."""
    path = Path(path)
    if not lora.adapters:
        raise TrainConfigError("the LoRA has no adapters to export")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    first = next(iter(lora.adapters.values()))
    meta.update({"format": LORA_FORMAT, "rank": str(first.rank), "alpha": str(first.alpha),
                 "modules": str(len(lora.adapters))})
    return write_safetensors(path, lora.comfy_state_dict(prefix), meta)
