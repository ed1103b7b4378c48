"""Rectified-flow helpers: time shift, schedules, training loss, Euler sampler with CFG.

Convention (same as unifusion.dit and ComfyUI's ModelType.FLOW)::

    x_t = (1 - t) * x0 + t * noise,   v = noise - x0,   t = 1 is pure noise.

Sampling walks t from 1 to 0 with ``x <- x + (t_next - t) * v``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .errors import InputError

VelocityFn = Callable[..., Tensor]
"""``fn(x (B, ...), t (B,), **cond) -> v (B, ...)``."""

StepCallback = Callable[[int, int, Tensor], None]
"""``callback(step, total, x)``, called after each step; raising from it stops sampling."""

TimeLike = Union[Tensor, float]


def check_guidance_interval(min_t: float, max_t: float) -> tuple[float, float]:
    """The guidance interval as floats with 0 <= min_t <= max_t <= 1 and max_t > 0, or an InputError naming it."""
    lo, hi = float(min_t), float(max_t)
    if not (0.0 <= lo <= hi <= 1.0 and hi > 0.0):
        raise InputError(f"the guidance interval needs 0 <= guidance_min_t <= guidance_max_t <= 1 and "
                         f"guidance_max_t > 0 ((0, 1) guides every step); got {min_t} and {max_t}")
    return lo, hi


def guided_at(t: float, min_t: float, max_t: float) -> bool:
    """Whether a step starting at noise level ``t`` applies classifier-free guidance."""
    return min_t - 1e-6 <= t <= max_t + 1e-6  # the tolerance keeps t = 1.0 guided at max_t = 1.0 in float32


def time_shift(t: TimeLike, shift: float) -> TimeLike:
    """t' = shift * t / (1 + (shift - 1) * t): shift > 1 spends more steps at high noise;
    0 and 1 stay fixed."""
    if shift <= 0:
        raise InputError(f"time shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(
    num_latent_tokens: int,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux-style shift exp(mu), mu linear in the latent token count: larger images keep
    more structure at a given t, so they need more time at high noise."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = base_shift + slope * (num_latent_tokens - base_tokens)
    return math.exp(mu)


def sample_training_timesteps(
    batch: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    shift: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Logit-normal t (SD3), then time-shifted; (batch,) float32 in (0, 1)."""
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.randn(batch, generator=generator, device=gen_device) * std + mean
    return time_shift(torch.sigmoid(u), shift).to(device or gen_device)


def _expand_t(t: Union[Tensor, float], like: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t


def add_noise(x0: Tensor, noise: Tensor, t: Union[Tensor, float]) -> Tensor:
    """x_t = (1 - t) * x0 + t * noise, with t (B,) or a scalar."""
    t = _expand_t(t, x0)
    return (1 - t) * x0 + t * noise


def flow_matching_loss(velocity_fn: VelocityFn, x0: Tensor, noise: Tensor, t: Tensor,
                       metric: Optional[Tensor] = None, **cond: Any) -> Tensor:
    """MSE between the predicted velocity at x_t and noise - x0: mean per sample, then over the batch.
    ``metric`` (C, C), when given, maps each token's channel error first (see
    `unifusion.train.latent_metric`)."""
    xt = add_noise(x0, noise, t)
    v = velocity_fn(xt, t, **cond)
    err = v.float() - (noise - x0).float()
    if metric is not None:
        err = torch.einsum("dc,bc...->bd...", metric.to(err), err)
    err = err.square()
    return err.reshape(err.shape[0], -1).mean(dim=1).mean()


def sampling_schedule(steps: int, shift: float = 1.0, device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """(steps + 1,) float32 times from 1 to 0, time-shifted."""
    if steps < 1:
        raise InputError(f"sampling needs at least 1 step, got {steps}")
    return time_shift(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def cfg_combine(cond_v: Tensor, uncond_v: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond_v + scale * (cond_v - uncond_v)


def _batchable(cond: dict[str, Any], uncond: dict[str, Any]) -> bool:
    """True when cond and uncond kwargs can share one forward (same keys, tensors of the same shape)."""
    if cond.keys() != uncond.keys():
        return False
    for key, a in cond.items():
        b = uncond[key]
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
                return False
        elif a is not b and a != b:
            return False
    return True


def _cat_kwargs(cond: dict[str, Any], uncond: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.cat([v, uncond[k]]) if isinstance(v, Tensor) else v for k, v in cond.items()}


def euler_sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    schedule: Union[Tensor, Sequence[float]],
    cfg_scale: float = 1.0,
    uncond_kwargs: Optional[dict[str, Any]] = None,
    callback: Optional[StepCallback] = None,
    guidance_min_t: float = 0.0,
    guidance_max_t: float = 1.0,
    **cond_kwargs: Any,
) -> Tensor:
    """Integrate dx/dt = v from schedule[0] (noise) to schedule[-1] with Euler steps.

    With ``cfg_scale != 1`` and ``uncond_kwargs`` given, cond and uncond run in one batched
    call when their shapes match, else in two calls, at the steps whose t lies in
    [``guidance_min_t``, ``guidance_max_t``]; the other steps take the conditional velocity alone (one call).
    """
    interval = check_guidance_interval(guidance_min_t, guidance_max_t)
    times = [float(t) for t in schedule]
    total = len(times) - 1
    guided = cfg_scale != 1.0 and uncond_kwargs is not None
    batched = guided and _batchable(cond_kwargs, uncond_kwargs)
    both = _cat_kwargs(cond_kwargs, uncond_kwargs) if batched else None
    x = noise
    b = noise.shape[0]
    for i in range(total):
        t_curr, t_next = times[i], times[i + 1]
        t_batch = torch.full((b,), t_curr, dtype=torch.float32, device=noise.device)
        if not guided or not guided_at(t_curr, *interval):
            v = velocity_fn(x, t_batch, **cond_kwargs)
        elif batched:
            cond_v, uncond_v = velocity_fn(torch.cat([x, x]), torch.cat([t_batch, t_batch]), **both).chunk(2)
            v = cfg_combine(cond_v, uncond_v, cfg_scale)
        else:
            v = cfg_combine(velocity_fn(x, t_batch, **cond_kwargs), velocity_fn(x, t_batch, **uncond_kwargs),
                            cfg_scale)
        x = x + (t_next - t_curr) * v.to(x.dtype)
        if callback is not None:
            callback(i + 1, total, x)
    return x


def seeded_noise(
    shape: Sequence[int],
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> Tensor:
    """Gaussian noise from a CPU generator, then moved: a seed gives the same noise on any
    device and in any dtype (drawn in float32 first)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
