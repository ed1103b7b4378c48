"""Recipe pieces: condition dropout and reconstruction rates, data order, LR schedule, EMA math."""

from __future__ import annotations

import math

import pytest
import torch

from unifusion.flow import resolution_shift, time_shift
from unifusion.train.ema import EMA
from unifusion.train.errors import TrainConfigError
from unifusion.train.recipe import (
    TrainConfig,
    learning_rate,
    micro_generator,
    plan_micro_batch,
    sample_indices,
)


def _within(count: int, trials: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p))


def test_condition_dropout_and_verifi_rates() -> None:
    cfg = TrainConfig(cond_dropout=0.1, verifi_prob=0.25, recon_prob=0.0)
    drops = verifi = total = 0
    for micro in range(500):
        plan = plan_micro_batch(micro_generator(0, 0, micro, 0), 32, cfg, has_verifi=True, has_recon=True, shift=1.0)
        assert not plan.recon and plan.drop.shape == (32,) and plan.drop.dtype == torch.bool
        drops += int(plan.drop.sum())
        verifi += plan.variants.count("verifi")
        total += 32
    assert _within(drops, total, 0.1) and _within(verifi, total, 0.25)
    never = plan_micro_batch(micro_generator(0, 0, 0, 0), 64, TrainConfig(cond_dropout=0.0, verifi_prob=1.0),
                             has_verifi=True, has_recon=False, shift=1.0)
    assert not never.drop.any() and never.variants == ["verifi"] * 64


def test_reconstruction_batch_rate() -> None:
    cfg = TrainConfig(recon_prob=0.03)
    trials = 8000
    gen = micro_generator(1, 0, 0, 0)
    recon = [plan_micro_batch(gen, 2, cfg, True, True, 1.0) for _ in range(trials)]
    count = sum(p.recon for p in recon)
    assert _within(count, trials, 0.03)
    assert all(p.variants == ["recon", "recon"] for p in recon if p.recon)
    assert not any(plan_micro_batch(micro_generator(1, s, 0, 0), 2, cfg, True, False, 1.0).recon for s in range(300))


def test_timesteps_follow_shifted_logit_normal() -> None:
    cfg = TrainConfig(logit_mean=0.3, logit_std=0.7)
    shift = resolution_shift(64)
    gen = micro_generator(0, 3, 1, 0)
    plan = plan_micro_batch(gen, 8, cfg, False, False, shift)
    # same draws by hand: recon flag, verifi, dropout, then the logit-normal normals
    ref = micro_generator(0, 3, 1, 0)
    torch.rand((), generator=ref), torch.rand(8, generator=ref), torch.rand(8, generator=ref)
    u = torch.randn(8, generator=ref) * 0.7 + 0.3
    torch.testing.assert_close(plan.timesteps, time_shift(torch.sigmoid(u), shift))
    assert (plan.timesteps > 0).all() and (plan.timesteps < 1).all()


def test_sample_indices_are_epoch_permutations() -> None:
    stream = sample_indices(7, seed=3, start=0, count=21)
    for epoch in range(3):
        assert sorted(stream[epoch * 7: epoch * 7 + 7]) == list(range(7))
    assert stream[:7] != stream[7:14]
    assert sample_indices(7, 3, start=5, count=9) == stream[5:14]  # any window of the same stream


def test_learning_rate_schedule() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=4, steps=14, schedule="cosine", min_lr_ratio=0.1)
    assert [learning_rate(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 4) == pytest.approx(1.0)
    assert learning_rate(cfg, 9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(cfg, 14) == pytest.approx(0.1)
    assert learning_rate(TrainConfig(lr=2.0, warmup_steps=0), 100) == 2.0


def test_config_validation_and_resume_conflicts() -> None:
    with pytest.raises(TrainConfigError, match="cond_dropout is a probability"):
        TrainConfig(cond_dropout=1.5)
    with pytest.raises(TrainConfigError, match="stage must be one of"):
        TrainConfig(stage="video")
    with pytest.raises(TrainConfigError, match="unknown training options"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1})
    a = TrainConfig()
    assert a.resume_conflicts(TrainConfig(steps=5000, save_every=7)) == []
    assert a.resume_conflicts(TrainConfig(lr=1e-3)) == ["lr: saved 0.0003, now 0.001"]
    assert TrainConfig.from_dict(a.to_dict()) == a


def test_ema_matches_the_recurrence() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    ema = EMA({"w": p}, decay=0.9, warmup=True)
    shadow = p.detach().double().clone()
    for n in range(25):
        with torch.no_grad():
            p.add_(torch.tensor([0.5, 0.25, -1.0]) * (n % 3 - 1))
        d = min(0.9, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * p.detach().double()
        ema.update()
        torch.testing.assert_close(ema.shadow["w"].double(), shadow, rtol=1e-6, atol=1e-6)
    assert ema.updates == 25 and ema.current_decay() == pytest.approx(26 / 35)
    plain = EMA({"w": p}, decay=0.5, warmup=False)
    before = plain.shadow["w"].clone()
    with torch.no_grad():
        p.add_(2.0)
    plain.update()
    torch.testing.assert_close(plain.shadow["w"], 0.5 * before + 0.5 * p.detach())
    with plain.swapped_in():
        assert torch.equal(p.detach(), plain.shadow["w"])
    assert torch.equal(p.detach(), before + 2.0)
