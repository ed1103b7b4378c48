"""Layerwise Attention Pooling (LAP) and the bidirectional condition refiner.

For each condition token the hidden states of the L selected VLM layers form a short
sequence. LAP lets them attend to each other (the paper finds tokens favour clusters of
adjacent layers) and an FC layer over the flattened (L*H) gives one vector per token.
The refiner then mixes the tokens bidirectionally, countering the VLM's causal position
bias, and projects to the DiT width. Neither depends on the timestep: they run once per
prompt.

Per-layer gains are an artist control: gain ``g_j`` adds ``log(g_j)`` to layer j's
attention logits (as a key) and multiplies layer j's pooled state before the FC, so
``g_j = 0`` removes layer j exactly and ``g_j > 1`` strengthens it.

Refiner positions: 1D RoPE over the index of each token among the *real* tokens of its
row (cumulative sum of the mask), so padding anywhere in the row never shifts or
changes the real tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import (
    AttentionFn,
    FeedForward,
    SelfAttention,
    has_padding,
    key_padding_bias,
    masked_bias_value,
    rope_frequencies,
)
from .config import LAPConfig
from .errors import InputError, VLMMismatchError

REFINER_ROPE_THETA = 10000.0
# Tokens pooled at once: bounds LAP's activation peak (at paper size, 3 references pooled in one
# go need ~3.75 GiB, in chunks of 512 tokens ~0.74 GiB) at no cost in speed.
LAP_CHUNK_TOKENS = 512

Gains = Union[Tensor, Sequence[float], None]


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Both branches end in zero-initialised projections, so a fresh block is the identity:
    a fresh LAP is then a linear map of the stacked layers (what the last-layer and mean
    baselines are) and learns the cross-layer attention from there, instead of starting
    from a random mix of the layers that the DiT must first learn to see through.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        dtype=None,
        device=None,
        operations=None,
        attention: Optional[AttentionFn] = None,
    ) -> None:
        super().__init__()
        operations = operations or nn
        self.norm1 = operations.LayerNorm(dim, eps=1e-6, dtype=dtype, device=device)
        self.attn = SelfAttention(dim, num_heads, dtype=dtype, device=device, operations=operations,
                                  attention=attention)
        self.norm2 = operations.LayerNorm(dim, eps=1e-6, dtype=dtype, device=device)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dtype=dtype, device=device, operations=operations)
        for layer in (self.attn.proj, self.mlp.fc2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, freqs: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), freqs=freqs, mask=mask)  # (B, N, D)
        return x + self.mlp(self.norm2(x))  # (B, N, D)


def validate_gains(gains: Gains, num_layers: int, like: Tensor) -> Optional[Tensor]:
    """Check per-layer gains and return them as a (L,) tensor on ``like``'s device, or None
    when they are absent or all ones (the untouched model, computed exactly)."""
    if gains is None:
        return None
    g = torch.as_tensor(gains, dtype=torch.float32).to(like.device)
    if g.ndim != 1 or g.shape[0] != num_layers:
        raise InputError(
            f"LAP gains must be one value per selected VLM layer ({num_layers}), got shape {tuple(g.shape)}; "
            "pass a list of that length or None"
        )
    if not torch.isfinite(g).all() or (g < 0).any():
        raise InputError(f"LAP gains must be finite and >= 0 (0 drops a layer), got {g.tolist()}")
    if not (g > 0).any():
        raise InputError("LAP gains are all zero, which drops every layer; keep at least one gain above 0")
    if bool((g == 1).all()):
        return None
    return g


class LayerwiseAttentionPooling(nn.Module):
    """(B, S, L, H) VLM states of L layers per token -> (B, S, H), one vector per token."""

    def __init__(
        self,
        cfg: LAPConfig,
        dtype=None,
        device=None,
        operations=None,
        attention: Optional[AttentionFn] = None,
    ) -> None:
        super().__init__()
        operations = operations or nn
        self.cfg = cfg
        h, l = cfg.vlm_hidden_size, cfg.num_vlm_layers
        self.layer_embed = nn.Parameter(torch.empty(l, h, dtype=dtype, device=device))
        nn.init.normal_(self.layer_embed, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(h, cfg.num_heads, cfg.mlp_ratio, dtype=dtype, device=device, operations=operations,
                             attention=attention)
            for _ in range(cfg.num_blocks if cfg.pooling == "attention" else 0)
        )
        self.norm_out = operations.LayerNorm(h, eps=1e-6, dtype=dtype, device=device)
        # The ablation baselines see one vector per token, so their FC is (H -> H).
        fc_in = l * h if cfg.pooling == "attention" else h
        self.fc = operations.Linear(fc_in, h, bias=True, dtype=dtype, device=device)

    def forward(self, features: Tensor, gains: Gains = None, chunk_tokens: int = LAP_CHUNK_TOKENS) -> Tensor:
        """Pool every token; tokens are independent here, so they go through in chunks of
        ``chunk_tokens`` to bound the activation peak (the result does not depend on it)."""
        b, s, l, h = _check_features(features, self.cfg)
        g = validate_gains(gains, l, features)
        x = features.reshape(b * s, l, h)  # (B*S, L, H)
        if chunk_tokens < 1:
            raise InputError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        pooled = [self._pool_tokens(part, g) for part in x.split(chunk_tokens)]
        return torch.cat(pooled).view(b, s, h)  # (B, S, H)

    def _pool_tokens(self, x: Tensor, g: Optional[Tensor]) -> Tensor:
        """(T, L, H) stacked layer states of T tokens -> (T, H)."""
        t, l, h = x.shape
        # VLM states carry huge outlier channels: normalise each layer's vector on its own.
        x = F.rms_norm(x.float(), (h,), eps=1e-6).to(x.dtype)  # (T, L, H)
        if self.cfg.pooling == "last":
            return self.fc(x[:, -1] if g is None else x[:, -1] * g[-1].to(x.dtype))  # (T, H)
        if self.cfg.pooling == "mean":
            weights = torch.ones(l, device=x.device) if g is None else g
            mixed = (x * weights.to(x.dtype).view(1, l, 1)).sum(1) / weights.sum().to(x.dtype)  # (T, H)
            return self.fc(mixed)
        x = x + self.layer_embed.to(dtype=x.dtype, device=x.device)  # (T, L, H)
        bias = None
        if g is not None:
            log_g = torch.where(g > 0, g.clamp_min(1e-30).log(), torch.full_like(g, masked_bias_value(x.dtype)))
            bias = log_g.to(x.dtype).view(1, 1, 1, l)  # key bias over the layer axis
        for block in self.blocks:
            x = block(x, mask=bias)  # (T, L, H)
        x = self.norm_out(x)  # (T, L, H)
        if g is not None:
            x = x * g.to(x.dtype).view(1, l, 1)
        return self.fc(x.reshape(t, l * h))  # (T, H)


class ConditionRefiner(nn.Module):
    """Bidirectional blocks over the condition tokens, then Linear(H -> out_dim)."""

    def __init__(
        self,
        cfg: LAPConfig,
        dtype=None,
        device=None,
        operations=None,
        attention: Optional[AttentionFn] = None,
    ) -> None:
        super().__init__()
        operations = operations or nn
        h = cfg.vlm_hidden_size
        self.head_dim = h // cfg.refiner_heads
        self.blocks = nn.ModuleList(
            TransformerBlock(h, cfg.refiner_heads, cfg.mlp_ratio, dtype=dtype, device=device, operations=operations,
                             attention=attention)
            for _ in range(cfg.refiner_blocks)
        )
        self.norm_out = operations.LayerNorm(h, eps=1e-6, dtype=dtype, device=device)
        self.proj = operations.Linear(h, cfg.out_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        b, s, _ = x.shape
        if mask is None:
            pos = torch.arange(s, device=x.device).expand(b, s)
            bias = None
        else:
            pos = (mask.long().cumsum(dim=1) - 1).clamp_min(0)  # index among real tokens
            bias = key_padding_bias(mask, x.dtype) if has_padding(mask) else None  # (B, 1, 1, S)
        freqs = rope_frequencies(pos[..., None].float(), (self.head_dim,), REFINER_ROPE_THETA)
        for block in self.blocks:
            x = block(x, freqs=freqs, mask=bias)  # (B, S, H)
        return self.proj(self.norm_out(x))  # (B, S, out_dim)


class LAPConditioner(nn.Module):
    """LAP + refiner: VLM features (B, S, L, H) and mask (B, S) -> condition tokens (B, S, out_dim)."""

    def __init__(
        self,
        cfg: LAPConfig,
        dtype=None,
        device=None,
        operations=None,
        attention: Optional[AttentionFn] = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.pool = LayerwiseAttentionPooling(cfg, dtype=dtype, device=device, operations=operations,
                                              attention=attention)
        self.refiner = ConditionRefiner(cfg, dtype=dtype, device=device, operations=operations,
                                        attention=attention)

    def forward(self, features: Tensor, mask: Optional[Tensor] = None, gains: Gains = None) -> Tensor:
        b, s, _, h = _check_features(features, self.cfg)
        if mask is None:
            mask = torch.ones(b, s, dtype=torch.bool, device=features.device)
        if mask.shape != (b, s) or mask.dtype != torch.bool:
            raise InputError(
                f"LAP mask must be a (B, S) = {(b, s)} bool tensor (True = real token), "
                f"got {tuple(mask.shape)} {mask.dtype}"
            )
        if s == 0:
            return features.new_zeros(b, 0, self.cfg.out_dim)
        if torch.compiler.is_compiling() or bool(mask.all()):
            # Every token, padding too under torch.compile: packing the real ones has a data-dependent shape.
            pooled = self.pool(features, gains)  # (B, S, H)
        else:
            # Pool only the real tokens: LAP is per token, padding would be wasted work.
            pooled = features.new_zeros(b, s, h)
            pooled[mask] = self.pool(features[mask].unsqueeze(0), gains)[0].to(pooled.dtype)
        out = self.refiner(pooled, mask)  # (B, S, out_dim)
        return out.masked_fill(~mask[..., None], 0.0)


def _check_features(features: Tensor, cfg: LAPConfig) -> tuple[int, int, int, int]:
    if features.ndim != 4 or features.shape[2:] != (cfg.num_vlm_layers, cfg.vlm_hidden_size):
        raise VLMMismatchError(
            f"LAP features must be (B, S, L={cfg.num_vlm_layers}, H={cfg.vlm_hidden_size}), got "
            f"{tuple(features.shape)}; the VLM features were captured from other layers or another VLM"
        )
    b, s, l, h = features.shape
    return b, s, l, h

