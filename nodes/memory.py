"""How much activation memory the DiT needs, in the units ComfyUI's memory manager uses; pure.

ComfyUI estimates the memory of one sampling call as ``B*H*W * dtype_size * 0.01 * factor`` MB
for a latent (B, C, H, W) when flash/xformers attention is in use (model_base.memory_required),
plus the same for the shapes ``extra_conds_shapes`` reports. A single-stream DiT holds about
``ACTIVATION_WIDTHS * hidden_size`` activation elements per sequence token at its peak (one
block's QKV, RoPE copies in fp32, MLP), and sees ``H*W / patch^2`` latent tokens.
"""

from __future__ import annotations

from ..unifusion.config import DiTConfig

ACTIVATION_WIDTHS = 20.0
"""Peak live activations per token in units of the hidden width. Measured 17.5-18.5 in bf16 with
tests/nodes/test_memory.py's allocation tracker (chunked attention, as flash attention on GPU);
rounded up."""

_MB = 1024 * 1024


def memory_usage_factor(dit: DiTConfig) -> float:
    """The ``memory_usage_factor`` that makes ComfyUI's estimate match the DiT's activations."""
    return ACTIVATION_WIDTHS * dit.hidden_size / (dit.patch_size**2 * 0.01 * _MB)


def comfy_estimate_bytes(factor: float, latent_shape: tuple[int, ...], cond_tokens: int, patch_size: int,
                         dtype_size: int) -> float:
    """ComfyUI's flash-path estimate for a latent batch and ``cond_tokens`` condition tokens
    (reported as ``[1, 1, cond_tokens * patch^2]``, see UniFusionBaseModel.extra_conds_shapes)."""
    area = latent_shape[0] * latent_shape[2] * latent_shape[3] + cond_tokens * patch_size**2
    return area * dtype_size * 0.01 * factor * _MB


def batch_scaled_cond_shapes(input_shape: list[int], cond_shapes: dict) -> dict:
    """ComfyUI's estimate_memory reports each condition's shape once, but every latent of the
    batch attends over its own copy of the condition tokens: scale each condition shape by the
    latents per condition (2B latents over 2 conditions, or B over 1 for the minimum estimate)."""
    conds = cond_shapes.get("c_crossattn") or []
    if not conds:
        return cond_shapes
    per_cond = max(1, input_shape[0] // len(conds))
    return dict(cond_shapes, c_crossattn=[[shape[0] * per_cond, *shape[1:]] for shape in conds])
