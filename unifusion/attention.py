"""The one attention entry point, RoPE, and the attention/MLP layers every block shares.

`sdpa_attention` has the signature and semantics of ComfyUI's
``comfy.ldm.modules.attention.optimized_attention``, so the nodes can inject ComfyUI's
function (xformers, sage, split, ...) into the same modules. RoPE follows
``comfy/ldm/flux/math.py``: frequencies and rotation in float32, rotation of adjacent
pairs, frequency tensors of shape ``(B, 1, N, head_dim/2, 2, 2)``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionFn = Callable[..., Tensor]
"""``fn(q, k, v, heads, mask=None, skip_reshape=False) -> (B, N, heads*dim)``."""
CPU_UPCAST = (torch.bfloat16, torch.float16)  # input dtypes whose CPU attention runs in float32


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Optional[Tensor] = None, skip_reshape: bool = False
) -> Tensor:
    """Scaled dot-product attention with ComfyUI's calling convention.

    q, k, v are ``(B, N, heads*dim)``, or ``(B, heads, N, dim)`` with ``skip_reshape``.
    ``mask`` is an additive float bias (or bool, True = attend) broadcastable to
    ``(B, heads, Nq, Nk)``; a 2D mask is ``(Nq, Nk)``, a 3D mask ``(B, Nq, Nk)``.
    Returns ``(B, N, heads*dim)``.
    """
    if skip_reshape:
        b, _, _, dim = q.shape
    else:
        b, _, inner = q.shape
        dim = inner // heads
        q, k, v = (t.view(b, -1, heads, dim).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, dim)
    upcast = q.device.type == "cpu" and (q.dtype in CPU_UPCAST or torch.is_autocast_enabled("cpu"))
    compute = torch.float32 if upcast else q.dtype
    if mask is not None:
        if mask.ndim == 2:  # (Nq, Nk) -> add batch
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:  # (B, Nq, Nk) -> add heads
            mask = mask.unsqueeze(1)
        if mask.dtype != torch.bool and mask.dtype != compute:
            mask = mask.to(compute)
    if upcast:
        out = _float32_attention(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Nq, dim)
    return out.transpose(1, 2).reshape(b, -1, heads * dim)


def _float32_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """SDPA in float32 outside any autocast (``mask`` bool or float32), the result in q's dtype.
    PyTorch's CPU kernels for half-precision attention run slower than the float32 ones (forward
    and backward of a demo training batch 3x slower in bfloat16), while the matmuls around them
    gain 4x."""
    dtype = q.dtype
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return out.to(dtype)  # (B, heads, Nq, dim)


def masked_bias_value(dtype: torch.dtype) -> float:
    """A large negative bias that zeroes a key's softmax weight exactly. Half of the dtype's
    minimum, so adding an attention score to it cannot overflow to -inf (a fully masked row
    then stays finite instead of turning into NaN)."""
    return torch.finfo(dtype).min / 2


def has_padding(mask: Tensor) -> bool:
    """Whether a (B, N) key mask hides any token, so attention needs a bias. Under ``torch.compile``
    the answer is True without reading the mask: a branch on its values would split the graph and
    recompile whenever a batch happens to have no padding, and a zero bias changes nothing."""
    return torch.compiler.is_compiling() or not bool(mask.all())


def key_padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive key bias from a key padding mask ``(B, N)`` bool (True = real token).

    Returns ``(B, 1, 1, N)``: 0 for real keys, a large negative value for padded keys.
    """
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(
            f"key_padding_bias expects a (B, N) bool mask (True = real token), got {tuple(mask.shape)} {mask.dtype}"
        )
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(~mask, masked_bias_value(dtype))
    return bias[:, None, None, :]  # (B, 1, 1, N)


def _rope_axis(pos: Tensor, dim: int, theta: float) -> Tensor:
    """(B, N) positions -> (B, N, dim/2, 2, 2) float32 rotation matrices."""
    if dim % 2:
        raise ValueError(f"RoPE axis dimension must be even, got {dim}")
    # float64 keeps angles of far positions exact; MPS has no float64.
    wide = torch.float32 if pos.device.type == "mps" else torch.float64
    scale = torch.arange(0, dim, 2, dtype=wide, device=pos.device) / dim
    omega = 1.0 / (theta**scale)  # (dim/2,)
    angles = pos.to(wide)[..., None] * omega  # (B, N, dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)  # (B, N, dim/2, 4)
    return rot.reshape(*rot.shape[:-1], 2, 2).to(torch.float32)


def rope_frequencies(ids: Tensor, axes_dim: Sequence[int], theta: float) -> Tensor:
    """Multi-axis RoPE: ``ids (B, N, n_axes)`` -> ``(B, 1, N, sum(axes_dim)/2, 2, 2)`` in float32.

    Axis ``i`` of the position rotates ``axes_dim[i]`` channels of each head.
    """
    if ids.ndim != 3 or ids.shape[-1] != len(axes_dim):
        raise ValueError(f"rope ids must be (B, N, {len(axes_dim)}), got {tuple(ids.shape)}")
    parts = [_rope_axis(ids[..., i], int(d), theta) for i, d in enumerate(axes_dim)]
    return torch.cat(parts, dim=-3).unsqueeze(1)  # (B, 1, N, head_dim/2, 2, 2)


def _apply_rope1(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate each adjacent channel pair of ``x`` by its ``freqs`` matrix [[cos, -sin], [sin, cos]].

    Written with the matrix's cos and sin rather than as FLUX's broadcast matrix product: the same float32
    products and sums, so the same bits forward and backward, without the (..., dim/2, 2, 2) temporaries
    whose backward sums over the broadcast axis (`benchmarks/train_precision.py` measures both)."""
    cos, sin = freqs[..., 0, 0], freqs[..., 1, 0]  # (B, 1, N, dim/2)
    x0, x1 = x.to(freqs.dtype).unflatten(-1, (-1, 2)).unbind(-1)  # each (B, H, N, dim/2)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def apply_rope(q: Tensor, k: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ``q, k (B, heads, N, dim)`` by ``freqs (B, 1, N, dim/2, 2, 2)`` in float32."""
    return _apply_rope1(q, freqs), _apply_rope1(k, freqs)


def rms_norm_layer(operations, dim: int, dtype=None, device=None, eps: float = 1e-6) -> nn.Module:
    """A weighted RMSNorm from ``operations``; older ComfyUI ops lack RMSNorm, so fall back to torch."""
    cls = getattr(operations, "RMSNorm", None) or nn.RMSNorm
    return cls(dim, eps=eps, elementwise_affine=True, dtype=dtype, device=device)


class SelfAttention(nn.Module):
    """Fused-QKV self-attention with QK RMSNorm and optional RoPE."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dtype=None,
        device=None,
        operations=None,
        attention: Optional[AttentionFn] = None,
    ) -> None:
        super().__init__()
        operations = operations or nn
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention = attention or sdpa_attention
        self.qkv = operations.Linear(dim, 3 * dim, bias=True, dtype=dtype, device=device)
        self.q_norm = rms_norm_layer(operations, self.head_dim, dtype=dtype, device=device)
        self.k_norm = rms_norm_layer(operations, self.head_dim, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor, freqs: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)  # (B, N, 3, heads, dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if freqs is not None:
            q, k = apply_rope(q, k, freqs)
        out = self.attention(q, k, v, self.num_heads, mask=mask, skip_reshape=True)  # (B, N, heads*dim)
        return self.proj(out)  # (B, N, D)


class FeedForward(nn.Module):
    """Two-layer MLP with tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int, dtype=None, device=None, operations=None) -> None:
        super().__init__()
        operations = operations or nn
        self.fc1 = operations.Linear(dim, hidden, bias=True, dtype=dtype, device=device)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = operations.Linear(hidden, dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D)
