"""DiT + LAP as one module, the unit a checkpoint stores.

State-dict keys are ``lap.*`` (LAPConditioner) and ``dit.*`` (UniFusionDiT); checkpoints
depend on these names. The unconditional (negative) condition is an all-zero condition
tensor: it is what ComfyUI's ConditioningZeroOut produces and what condition dropout
uses in training, so both worlds agree on what "no prompt" means.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .attention import AttentionFn
from .config import UniFusionConfig
from .dit import UniFusionDiT
from .lap import Gains, LAPConditioner


class UniFusionModel(nn.Module):
    """VLM features -> condition tokens (once per prompt); latents + t + tokens -> velocity."""

    def __init__(
        self,
        cfg: UniFusionConfig,
        dtype=None,
        device=None,
        operations=None,
        attention: Optional[AttentionFn] = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.lap = LAPConditioner(cfg.lap, dtype=dtype, device=device, operations=operations, attention=attention)
        self.dit = UniFusionDiT(cfg.dit, dtype=dtype, device=device, operations=operations, attention=attention)

    def encode_condition(self, features: Tensor, mask: Optional[Tensor] = None, gains: Gains = None) -> Tensor:
        """(B, S, L, H) VLM features and (B, S) bool mask -> (B, S, D) condition tokens (padding zeroed)."""
        return self.lap(features, mask, gains)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        context_positions: Optional[Tensor] = None,
    ) -> Tensor:
        """Velocity ``v ~ noise - x0`` for the noised latent ``x (B, C, H, W)`` at ``timesteps (B,)``;
        ``context_positions`` (B, S, 2): see `UniFusionDiT.forward`."""
        return self.dit(x, timesteps, context, context_mask, context_positions)

    @staticmethod
    def null_condition(like: Tensor) -> Tensor:
        """The unconditional condition: zeros shaped like a condition tensor."""
        return torch.zeros_like(like)
