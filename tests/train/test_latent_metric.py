"""The whitened flow-loss metric: its algebra, and the trainer using it (and resuming exactly)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_trainer import BASE, _assert_identical, _snapshot

from unifusion.flow import flow_matching_loss
from unifusion.train.errors import TrainConfigError
from unifusion.train.latent_metric import metric_sample, whitening_matrix
from unifusion.train.recipe import TrainConfig
from unifusion.train.trainer import Trainer


def _anisotropic_latents(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 4, 4) latents whose channels are mixed with known covariance, and that covariance."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.2, 0.1, 0.3]])
    white = torch.randn(n, 4, 4, 3, generator=gen, dtype=torch.float64)
    latents = (white @ mix.double().T).permute(0, 3, 1, 2).float()
    flat = latents.double().permute(0, 2, 3, 1).reshape(-1, 3)
    return latents, torch.cov(flat.T)


def test_full_whitening_makes_the_covariance_isotropic() -> None:
    latents, cov = _anisotropic_latents()
    a = whitening_matrix(latents, power=1.0).double()
    whitened = a @ cov @ a.T
    scale = whitened.diagonal().mean()
    torch.testing.assert_close(whitened, scale * torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    # mean weight 1: the eigenvalues of A^T A average to 1
    assert float(torch.linalg.eigvalsh(a.T @ a).mean()) == pytest.approx(1.0, rel=1e-5)


def test_power_zero_is_plain_mse_and_half_power_is_between() -> None:
    latents, cov = _anisotropic_latents()
    torch.testing.assert_close(whitening_matrix(latents, power=0.0), torch.eye(3), atol=1e-6, rtol=0)
    small = torch.linalg.eigh(cov).eigenvectors[:, 0].float()  # the lowest-variance direction
    gains = [float((whitening_matrix(latents, p) @ small).norm()) for p in (0.0, 0.5, 1.0)]
    assert gains[0] < gains[1] < gains[2]


def test_tiny_eigenvalues_are_floored() -> None:
    latents = torch.randn(8, 2, 3, 3)
    latents[:, 1] = 0.0  # a dead channel: variance 0
    a = whitening_matrix(latents, power=1.0, floor=1e-2)
    assert torch.isfinite(a).all() and float(a.abs().max()) < 100


def test_bad_latents_are_refused() -> None:
    with pytest.raises(ValueError, match="latents must be"):
        whitening_matrix(torch.zeros(2, 3), 1.0)


def test_metric_sample_is_fixed_and_bounded() -> None:
    pool = list(range(1000, 3000))
    picked = metric_sample(pool, 512)
    assert picked == metric_sample(pool, 512) and len(picked) == 512 and set(picked) <= set(pool)
    assert metric_sample([4, 5], 512) == [4, 5]


def test_loss_under_a_metric() -> None:
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.rand(2)

    def off_by(channel_error: list[float]):
        def velocity(xt, tt):
            return noise - x0 + torch.tensor(channel_error).view(1, 3, 1, 1)
        return velocity

    identity = torch.eye(3)
    assert flow_matching_loss(off_by([1.0, 0, 0]), x0, noise, t, metric=identity).item() == pytest.approx(1 / 3)
    stretch = torch.diag(torch.tensor([2.0, 1.0, 1.0]))
    assert flow_matching_loss(off_by([1.0, 0, 0]), x0, noise, t, metric=stretch).item() == pytest.approx(4 / 3)
    assert flow_matching_loss(off_by([0, 1.0, 0]), x0, noise, t, metric=stretch).item() == pytest.approx(1 / 3)


def test_option_is_validated() -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(TrainConfigError, match="loss_whitening"):
            TrainConfig(loss_whitening=bad)


def test_trainer_whitens_and_resumes_exactly(cache, model_config, tmp_path: Path) -> None:
    config = replace(BASE, loss_whitening=1.0)
    plain = Trainer(model_config, cache, BASE, tmp_path / "plain", progress=False)
    assert plain.metric is None
    straight = Trainer(model_config, cache, config, tmp_path / "a", progress=False)
    assert straight.metric is not None and straight.metric.shape == (cache.latent_shape[0],) * 2
    full = straight.train()
    assert full.losses != plain.train().losses
    first = Trainer(model_config, cache, replace(config, steps=2), tmp_path / "b", progress=False)
    first.train()
    second = Trainer(model_config, cache, config, tmp_path / "b", progress=False)
    second.resume(tmp_path / "b" / "states" / "step-00000002")
    assert second.train().losses == full.losses[2:]
    _assert_identical(_snapshot(straight), _snapshot(second))
