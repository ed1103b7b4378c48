"""The metric the flow loss measures its error in: plain MSE, or MSE after whitening the latent channels.

In the demo autoencoder's latents, two shapes of one colour but another kind differ ~17x less
(squared) than two colours of one kind, though in pixels the gap is ~6.5x: most channel variance
is brightness and hue, and the corners that tell a square from a circle sit in low-variance
directions. Plain MSE then hardly rewards drawing the right kind. Whitening the per-token
channel vector by the latents' own covariance (power 1) brings that gap to ~6.6x, the pixels' own.
The optimum of the loss (the conditional mean velocity) is the same under any fixed metric; what
changes is which errors a model of limited size and training removes first.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

METRIC_SAMPLES = 512  # latents the covariance is estimated from (evenly spaced over the pool)


def whitening_matrix(latents: Tensor, power: float, floor: float = 1e-3) -> Tensor:
    """(C, C) symmetric A with A^T A = Cov^-power over the channels of ``latents`` (N, C, h, w),
    scaled so the mean weight over the eigen-directions is 1 (a loss of the same size for
    errors spread evenly). Eigenvalues below ``floor`` x the largest are raised to it."""
    if latents.ndim != 4 or latents.shape[0] < 1:
        raise ValueError(f"latents must be (N, C, h, w) with N >= 1, got {tuple(latents.shape)}")
    channels = latents.shape[1]
    flat = latents.double().permute(0, 2, 3, 1).reshape(-1, channels)
    cov = torch.cov(flat.T).reshape(channels, channels)
    eigenvalues, vectors = torch.linalg.eigh(cov)
    eigenvalues = eigenvalues.clamp_min(float(eigenvalues.max()) * floor)
    weights = eigenvalues.pow(-power)
    weights = weights / weights.mean()
    return (vectors @ torch.diag(weights.sqrt()) @ vectors.T).float()


def metric_sample(pool: Sequence[int], count: int = METRIC_SAMPLES) -> list[int]:
    """Up to ``count`` pool entries, evenly spaced: the same on every run and resume."""
    step = max(1, len(pool) // count)
    return list(pool[::step][:count])

