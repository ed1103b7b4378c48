"""Refuse NaN/Inf before the DiT runs on them; pure (no ComfyUI), so tests run anywhere.

A single NaN in the latent or the conditioning spreads to every pixel through attention and
the sampler, and the saved picture is plain black with no hint of why. The MODEL checks its
inputs on every call (one reduction over the latent, negligible next to a DiT step) and
names the likely cause: at the first step the ``latent_image`` itself, later an overflow
during sampling, and in the conditioning an overflowing encoder.
"""

from __future__ import annotations

from typing import Optional

import torch


def _step(transformer_options: Optional[dict]) -> tuple[int, int]:
    """(step, steps) of this call, 1-based, from the sampler's schedule; (1, 0) when unknown."""
    options = transformer_options or {}
    schedule, sigma = options.get("sample_sigmas"), options.get("sigmas")
    if not isinstance(schedule, torch.Tensor) or not isinstance(sigma, torch.Tensor) or schedule.numel() < 2:
        return 1, 0
    current = sigma.reshape(-1)[:1].to(schedule.device, schedule.dtype)
    index = int((schedule - current).abs().argmin())
    return index + 1, schedule.numel() - 1


def nonfinite_problem(x: torch.Tensor, context: Optional[torch.Tensor],
                      transformer_options: Optional[dict] = None) -> Optional[str]:
    """None when ``x`` (B, C, H, W) and ``context`` (B, S, D) are finite, else what is wrong
    and what to do about it."""
    if context is not None and not bool(torch.isfinite(context).all()):
        return ("the conditioning holds NaN or Inf values, so every pixel would be black. "
                "The VLM or the LAP overflowed (fp16 on this device?): load the VLM with dtype bf16 or fp32 and "
                "the model with weight_dtype bf16 or fp32, then encode again")
    if bool(torch.isfinite(x).all()):
        return None
    step, steps = _step(transformer_options)
    if step == 1:
        return ("the latent_image given to the sampler holds NaN or Inf values, so the image would "
                "be black. Connect a clean latent (EmptyLatentImage, or VAEEncode of a valid image) or fix the "
                "node that produced this one")
    return (f"sampling produced NaN/Inf values at step {step} of {steps}: the model overflowed. Load the model "
            "with weight_dtype bf16 or fp32 (not fp16), or lower cfg")
