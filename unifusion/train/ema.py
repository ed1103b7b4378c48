"""Exponential moving average of the trainable weights, kept in float32.

``shadow <- d * shadow + (1 - d) * param`` after every optimizer step, with
``d = min(decay, (1 + n) / (10 + n))`` during warmup (n = updates so far), so early shadows
are not dominated by the random initialisation. The release checkpoint uses the shadow.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """Float32 shadows of named parameters (those with requires_grad by default)."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = float(decay), bool(warmup)
        self.params = params
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)  # d * shadow + (1 - d) * p
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor], updates: int) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        for name in self.shadow:
            self.shadow[name] = state[name].detach().float().clone().to(self.shadow[name].device)
        self.updates = int(updates)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the shadows into the parameters (e.g. to export or evaluate)."""
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.shadow[name].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])
