"""Single-stream DiT over [condition tokens; latent tokens], trained with flow matching.

Flow convention (rectified flow, as ComfyUI's ``ModelType.FLOW`` expects)::

    x_t = (1 - t) * x0 + t * noise        t in [0, 1], t = 1 is pure noise
    v   = model(x_t, t, context) ~ noise - x0

so one Euler step from t to t' is ``x + (t' - t) * v``. The model takes ``t`` in [0, 1]
and embeds ``t * 1000`` sinusoidally (ComfyUI's flow sampling must use multiplier 1.0).

Condition tokens (already at DiT width, from the LAP conditioner) and patchified latent
tokens are concatenated and every block sees both (single stream). The timestep enters
through adaLN-Zero: each block maps the timestep embedding to shift/scale/gate for the
attention and MLP branches; gates and the final projection start at zero so a fresh model
is the identity on its residual stream and predicts zero velocity.

Positions: 3-axis RoPE. Condition token ``i`` gets ``(i, 0, 0)``, where ``i`` counts the
real (unpadded) tokens of its row, so padding never moves a token; the latent token at
``(row, col)`` gets ``(0, row, col)``. Padded condition tokens are masked as keys.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionFn, FeedForward, SelfAttention, has_padding, key_padding_bias, rope_frequencies
from .config import DiTConfig
from .errors import InputError

TIMESTEP_FREQ_DIM = 256  # width of the sinusoidal timestep features (as in DiT)
TIMESTEP_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000
# Floor of t in the velocity (x_t - x0) / t of an x0-predicting DiT (DiTConfig.predict_x0): near
# t = 0 the division would blow small x0 errors up.
X0_MIN_T = 0.05


def timestep_embedding(t: Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of ``t (B,)`` -> ``(B, dim)`` float32 ([cos | sin])."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def place_condition_tokens(ids: Tensor, positions: Tensor, h: int, w: int) -> Tensor:
    """RoPE ids (B, S+N, 3) with the condition tokens that have a place (finite ``positions``
    (B, S, 2), fractions of the frame) moved to the latent row/column they lie over: the centre
    fraction f of an h-row grid sits at row ``f * h - 0.5``, between the latent rows it covers."""
    s = positions.shape[1]
    placed = torch.isfinite(positions).all(dim=-1, keepdim=True)  # (B, S, 1)
    grid = positions.float().nan_to_num(0.0) * positions.new_tensor([h, w], dtype=torch.float32) - 0.5
    cond = ids[:, :s]
    cond = torch.cat([cond[..., :1], torch.where(placed, grid.to(cond.device), cond[..., 1:])], dim=-1)
    return torch.cat([cond, ids[:, s:]], dim=1)


def underlying_image_features(context: Tensor, positions: Tensor, h: int, w: int,
                               mask: Optional[Tensor] = None) -> Tensor:
    """(B, h*w, D): for each latent token (row-major), the mean of the placed condition tokens
    (finite ``positions`` (B, S, 2), frame fractions as in `place_condition_tokens`; real per
    ``mask`` (B, S)) nearest to it; zeros where a row has none. A 4x4 grid of image tokens over
    an 8x8 latent gives each latent token the one token it lies under; several references at the
    same place are averaged."""
    placed = torch.isfinite(positions).all(dim=-1)  # (B, S)
    if mask is not None:
        placed = placed & mask.to(torch.bool)
    grid = positions.float().nan_to_num(0.0) * positions.new_tensor([h, w], dtype=torch.float32) - 0.5  # (B, S, 2)
    rows = torch.arange(h, device=grid.device, dtype=torch.float32)
    cols = torch.arange(w, device=grid.device, dtype=torch.float32)
    cells = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(1, h * w, 1, 2)  # (1, N, 1, 2)
    dist = ((cells - grid[:, None]) ** 2).sum(-1)  # (B, N, S)
    dist = dist.masked_fill(~placed[:, None], float("inf"))
    nearest = dist <= dist.min(dim=-1, keepdim=True).values + 1e-4  # (B, N, S)
    weights = (nearest & placed[:, None]).to(context.dtype)
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return weights @ context  # (B, N, D)


def grid_position_embedding(height: int, width: int, dim: int, theta: float, device=None) -> Tensor:
    """(H*W, dim) sin/cos of each token's (row, column), half the channels per axis, frequencies
    from 1 down to 1/theta (row-major like the token order)."""
    quarter = dim // 4
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))  # (dim/4,)
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * freqs  # (H, dim/4)
    cols = torch.arange(width, device=device, dtype=torch.float32)[:, None] * freqs  # (W, dim/4)
    row_part = torch.cat([rows.sin(), rows.cos()], dim=-1)[:, None].expand(height, width, 2 * quarter)
    col_part = torch.cat([cols.sin(), cols.cos()], dim=-1)[None].expand(height, width, 2 * quarter)
    emb = torch.cat([row_part, col_part], dim=-1).reshape(height * width, 4 * quarter)  # (H*W, 4*(dim/4))
    return F.pad(emb, (0, dim - 4 * quarter))  # (H*W, dim)


def pad_to_patch_size(x: Tensor, patch_size: int) -> Tensor:
    """Pad H and W up to multiples of ``patch_size`` (circular, like comfy.ldm.common_dit)."""
    pad_h = (-x.shape[-2]) % patch_size
    pad_w = (-x.shape[-1]) % patch_size
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="circular")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t*1000 -> MLP -> (B, time_embed_dim)."""

    def __init__(self, out_dim: int, dtype=None, device=None, operations=None) -> None:
        super().__init__()
        operations = operations or nn
        self.linear_1 = operations.Linear(TIMESTEP_FREQ_DIM, out_dim, bias=True, dtype=dtype, device=device)
        self.act = nn.SiLU()
        self.linear_2 = operations.Linear(out_dim, out_dim, bias=True, dtype=dtype, device=device)

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        emb = timestep_embedding(t.float() * TIMESTEP_SCALE).to(dtype)  # (B, 256)
        return self.linear_2(self.act(self.linear_1(emb)))  # (B, E)


class DiTBlock(nn.Module):
    """Pre-norm block with adaLN-Zero modulation of attention and MLP."""

    def __init__(
        self,
        cfg: DiTConfig,
        dtype=None,
        device=None,
        operations=None,
        attention: Optional[AttentionFn] = None,
    ) -> None:
        super().__init__()
        operations = operations or nn
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, cfg.num_heads, dtype=dtype, device=device, operations=operations,
                                  attention=attention)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(d, int(d * cfg.mlp_ratio), dtype=dtype, device=device, operations=operations)
        self.modulation = operations.Linear(cfg.time_embed_dim, 6 * d, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor, c: Tensor, freqs: Tensor, mask: Optional[Tensor]) -> Tensor:
        mod = self.modulation(c)[:, None]  # (B, 1, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # each (B, 1, D)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), freqs=freqs, mask=mask)  # (B, N, D)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN then Linear(D -> patch*patch*C)."""

    def __init__(self, cfg: DiTConfig, dtype=None, device=None, operations=None) -> None:
        super().__init__()
        operations = operations or nn
        d = cfg.hidden_size
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.modulation = operations.Linear(cfg.time_embed_dim, 2 * d, bias=True, dtype=dtype, device=device)
        out = cfg.patch_size * cfg.patch_size * cfg.in_channels
        self.linear = operations.Linear(d, out, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)  # each (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


class UniFusionDiT(nn.Module):
    """Velocity model: (x_t (B,C,H,W), t (B,), context (B,S,D), mask (B,S)) -> v (B,C,H,W)."""

    def __init__(
        self,
        cfg: DiTConfig,
        dtype=None,
        device=None,
        operations=None,
        attention: Optional[AttentionFn] = None,
    ) -> None:
        super().__init__()
        operations = operations or nn
        self.cfg = cfg
        self.gradient_checkpointing = False
        p, d = cfg.patch_size, cfg.hidden_size
        self.x_embedder = operations.Linear(cfg.in_channels * p * p, d, bias=True, dtype=dtype, device=device)
        self.t_embedder = TimestepEmbedder(cfg.time_embed_dim, dtype=dtype, device=device, operations=operations)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg, dtype=dtype, device=device, operations=operations, attention=attention)
            for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(cfg, dtype=dtype, device=device, operations=operations)
        if cfg.image_injection:
            self.image_injection = operations.Linear(d, d, bias=False, dtype=dtype, device=device)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """adaLN-Zero: zero every modulation and the final projection (a checkpoint load overwrites this)."""
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        for layer in (self.final_layer.modulation, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.cfg.image_injection:
            nn.init.zeros_(self.image_injection.weight)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=0.02)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        context_positions: Optional[Tensor] = None,
    ) -> Tensor:
        """``context_positions`` (B, S, 2): where each condition token lies in the frame, as (row,
        column) fractions of its height and width (token centres), NaN for tokens without a place
        (text, tiles of a part of an image). Used when ``cfg.image_positions`` is on."""
        b, c_in, height, width = x.shape
        p = self.cfg.patch_size
        if c_in != self.cfg.in_channels:
            raise InputError(
                f"UniFusionDiT expects {self.cfg.in_channels} latent channels, got {c_in}; "
                "use the VAE this checkpoint was trained with"
            )
        xp = pad_to_patch_size(x, p)  # (B, C, H', W')
        h, w = xp.shape[-2] // p, xp.shape[-1] // p
        tokens = xp.view(b, c_in, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c_in * p * p)
        img = self.x_embedder(tokens)  # (B, N, D)
        if self.cfg.absolute_position:
            img = img + grid_position_embedding(h, w, img.shape[-1], self.cfg.rope_theta, img.device).to(img.dtype)

        context, context_mask = self._check_context(context, context_mask, img)
        s = context.shape[1]
        ids = self._position_ids(b, s, h, w, context_mask, img.device)  # (B, S+N, 3)
        if context_positions is not None and s > 0 and (self.cfg.image_positions or self.cfg.image_injection):
            context_positions = self._check_positions(context_positions, b, s)
            if self.cfg.image_positions:
                ids = place_condition_tokens(ids, context_positions, h, w)
            if self.cfg.image_injection:
                under = underlying_image_features(context, context_positions.to(img.device), h, w, context_mask)
                img = img + self.image_injection(under.to(img.dtype))
        freqs = rope_frequencies(ids, self.cfg.rope_axes, self.cfg.rope_theta)  # (B, 1, S+N, hd/2, 2, 2)
        bias = None
        if context_mask is not None and s > 0 and has_padding(context_mask):
            full = torch.cat([context_mask, context_mask.new_ones(b, h * w)], dim=1)  # (B, S+N)
            bias = key_padding_bias(full, img.dtype)  # (B, 1, 1, S+N)

        t = timesteps.reshape(-1).to(img.device)
        if t.shape[0] not in (1, b):
            raise InputError(f"UniFusionDiT timesteps must have 1 or B={b} values, got {tuple(timesteps.shape)}")
        t = t.expand(b)
        cond = F.silu(self.t_embedder(t, img.dtype))  # (B, E)

        seq = torch.cat([context, img], dim=1)  # (B, S+N, D)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                seq = checkpoint(block, seq, cond, freqs, bias, use_reentrant=False)
            else:
                seq = block(seq, cond, freqs, bias)  # (B, S+N, D)

        out = self.final_layer(seq[:, s:], cond)  # (B, N, p*p*C)
        out = out.view(b, h, w, c_in, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c_in, h * p, w * p)
        out = out[:, :, :height, :width]  # (B, C, H, W)
        if self.cfg.predict_x0:  # the head guessed x0: the velocity that takes x_t there
            return (x - out) / t.clamp_min(X0_MIN_T).to(out.dtype).view(b, 1, 1, 1)
        return out

    def _check_context(
        self, context: Optional[Tensor], mask: Optional[Tensor], img: Tensor
    ) -> tuple[Tensor, Optional[Tensor]]:
        b, d = img.shape[0], self.cfg.hidden_size
        if context is None:
            return img.new_zeros(b, 0, d), None
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != d:
            raise InputError(
                f"UniFusionDiT context must be (B={b}, S, D={d}), got {tuple(context.shape)}; "
                "condition tokens come from the LAP conditioner of the same checkpoint"
            )
        if mask is not None and (mask.shape != context.shape[:2] or mask.dtype != torch.bool):
            raise InputError(
                f"UniFusionDiT context_mask must be a {tuple(context.shape[:2])} bool tensor (True = real token), "
                f"got {tuple(mask.shape)} {mask.dtype}"
            )
        return context.to(img.dtype), mask

    @staticmethod
    def _check_positions(positions: Tensor, b: int, s: int) -> Tensor:
        if positions.ndim != 3 or positions.shape[0] not in (1, b) or positions.shape[1:] != (s, 2):
            raise InputError(
                f"UniFusionDiT context_positions must be (B={b}, S={s}, 2) (row, column) fractions, "
                f"got {tuple(positions.shape)}; they come with the condition tokens of the same prompt"
            )
        return positions.expand(b, -1, -1)

    @staticmethod
    def _position_ids(b: int, s: int, h: int, w: int, mask: Optional[Tensor], device: torch.device) -> Tensor:
        if mask is None:
            cond_pos = torch.arange(s, device=device).expand(b, s)
        else:
            cond_pos = (mask.long().cumsum(dim=1) - 1).clamp_min(0)  # index among real tokens
        cond_ids = torch.zeros(b, s, 3, device=device)
        cond_ids[..., 0] = cond_pos.float()
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float().expand(b, h * w, 3)
        return torch.cat([cond_ids, img_ids], dim=1)  # (B, S+N, 3)
