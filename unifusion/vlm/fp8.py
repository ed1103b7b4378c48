"""fp8 weight storage for the frozen VLM, so an 8B VLM fits a 12 GB card.

Nearly all of a VLM's weights sit in its Linear layers. Each of them is stored as
``float8_e4m3fn`` with one scale per output row (the row's largest magnitude maps to the
format's maximum, so small weights do not fall into fp8's coarse subnormal range), and cast
back to the activation dtype inside ``forward``. Activations, norms, embeddings and the LM
head keep their dtype: only storage changes, and the weights stay 1 byte each while the
model sits on the GPU. This is weight-only quantisation; the VLM is frozen, so nothing is
trained on these weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
# The LM head picks Verifi's tokens; its errors would change the rewrite, so it stays exact.
KEEP_EXACT = ("lm_head",)


class Fp8Linear(nn.Linear):
    """A Linear whose weight is fp8 with a per-row ``weight_scale``; computes in the input's dtype."""

    weight_scale: Tensor

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)  # (out, in)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


def store_linear_weights_fp8(model: nn.Module, keep_exact: tuple[str, ...] = KEEP_EXACT) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` (except names ending in ``keep_exact``) into an
    `Fp8Linear` in place; returns how many were converted. Calling it twice changes nothing."""
    converted = 0
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name.split(".")[-1] in keep_exact:
            continue
        weight = module.weight.detach()
        with torch.no_grad():
            scale = weight.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX  # (out, 1)
            stored = (weight.float() / scale).to(FP8_DTYPE)
        module.weight = nn.Parameter(stored, requires_grad=False)
        module.register_buffer("weight_scale", scale.to(weight.dtype))
        module.__class__ = Fp8Linear
        converted += 1
    return converted


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations run in: that of the first parameter not stored as fp8."""
    for param in model.parameters():
        if param.dtype != FP8_DTYPE:
            return param.dtype
    return torch.float32
