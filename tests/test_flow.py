"""Flow-matching helpers: shifts, schedules, loss, Euler sampler, CFG, seeded noise."""

import math

import pytest
import torch

from unifusion.errors import InputError
from unifusion.flow import (
    add_noise,
    cfg_combine,
    check_guidance_interval,
    euler_sample,
    flow_matching_loss,
    guided_at,
    resolution_shift,
    sample_training_timesteps,
    sampling_schedule,
    seeded_noise,
    time_shift,
)


def test_time_shift_properties():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(time_shift(t, 1.0), t)
    for shift in (0.5, 3.0):
        s = time_shift(t, shift)
        assert s[0] == 0 and s[-1] == 1
        assert (s[1:] > s[:-1]).all()  # monotone
    assert (time_shift(t[1:-1], 3.0) > t[1:-1]).all()  # shift > 1 moves towards noise
    # flux form: exp(mu) / (exp(mu) + (1/t - 1)) with shift = exp(mu)
    mu = 0.7
    ref = math.exp(mu) / (math.exp(mu) + (1 / 0.3 - 1))
    assert time_shift(0.3, math.exp(mu)) == pytest.approx(ref)
    # inverse: shifting by 1/s undoes s
    torch.testing.assert_close(time_shift(time_shift(t, 3.0), 1 / 3.0), t)
    with pytest.raises(InputError, match="> 0"):
        time_shift(t, 0.0)


def test_resolution_shift_linear_in_tokens():
    assert resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert resolution_shift(4096) == pytest.approx(math.exp(1.15))
    mid = resolution_shift((256 + 4096) // 2)
    assert math.log(mid) == pytest.approx((0.5 + 1.15) / 2)


def test_training_timesteps_logit_normal():
    gen = torch.Generator().manual_seed(0)
    t = sample_training_timesteps(20000, generator=gen)
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1) < 0.05
    shifted = sample_training_timesteps(20000, generator=torch.Generator().manual_seed(0), shift=3.0)
    torch.testing.assert_close(shifted, time_shift(t, 3.0))
    again = sample_training_timesteps(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, sample_training_timesteps(5, generator=torch.Generator().manual_seed(1)))


def test_add_noise_endpoints_and_broadcast():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 1.0, 0.25])
    xt = add_noise(x0, noise, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    torch.testing.assert_close(xt[2], 0.75 * x0[2] + 0.25 * noise[2])
    torch.testing.assert_close(add_noise(x0, noise, 0.5), (x0 + noise) / 2)


def test_loss_zero_for_exact_velocity_and_mean_per_sample():
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.rand(4)
    seen = {}

    def exact(xt, tt, offset=0.0):
        seen["t"] = tt
        return noise - x0 + offset

    assert flow_matching_loss(exact, x0, noise, t).item() == 0.0
    assert torch.equal(seen["t"], t)
    assert flow_matching_loss(exact, x0, noise, t, offset=2.0).item() == pytest.approx(4.0)
    # per-sample mean then batch mean: a sample-wise error of e_i gives mean(e_i^2)
    offsets = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(4, 1, 1, 1)
    assert flow_matching_loss(exact, x0, noise, t, offset=offsets).item() == pytest.approx(3.5)


def test_sampling_schedule():
    s = sampling_schedule(4)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = sampling_schedule(10, shift=3.0)
    assert shifted.shape == (11,) and shifted[0] == 1 and shifted[-1] == 0
    assert (shifted[1:] < shifted[:-1]).all()
    with pytest.raises(InputError, match="at least 1 step"):
        sampling_schedule(0)


def test_euler_recovers_x0_on_exact_field():
    # x_t = (1-t) x0 + t n has constant velocity n - x0 = (x_t - x0) / t
    x0 = torch.full((2, 3, 4, 4), 0.7)
    noise = seeded_noise((2, 3, 4, 4), seed=1)

    def field(x, t, target):
        tt = t.view(-1, 1, 1, 1)
        return (x - target) / tt

    for steps, shift in ((1, 1.0), (7, 3.0)):
        out = euler_sample(field, noise, sampling_schedule(steps, shift), target=x0)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_euler_callback_counts_and_can_interrupt():
    calls = []
    euler_sample(lambda x, t: torch.zeros_like(x), torch.zeros(1, 2), sampling_schedule(3),
                 callback=lambda i, n, x: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]

    class Stop(Exception):
        pass

    def stop(i, n, x):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        euler_sample(lambda x, t: torch.zeros_like(x), torch.zeros(1, 2), sampling_schedule(5), callback=stop)


def test_cfg_combine():
    c, u = torch.tensor([3.0]), torch.tensor([1.0])
    assert cfg_combine(c, u, 1.0).item() == 3.0
    assert cfg_combine(c, u, 0.0).item() == 1.0
    assert cfg_combine(c, u, 4.0).item() == 9.0


def test_euler_cfg_batches_when_shapes_match_and_splits_otherwise():
    noise = torch.randn(2, 3)
    sched = sampling_schedule(2)
    calls = []

    def field(x, t, context, mask=None):
        calls.append(x.shape[0])
        return context.mean(dim=1) + 0 * x  # (B, 3)

    cond, uncond = torch.ones(2, 4, 3), torch.zeros(2, 4, 3)
    out = euler_sample(field, noise, sched, cfg_scale=3.0, uncond_kwargs={"context": uncond}, context=cond)
    assert calls == [4, 4]  # one batched call per step
    torch.testing.assert_close(out, noise - 3.0)  # v = 0 + 3 * (1 - 0) over t from 1 to 0

    calls.clear()
    short = torch.zeros(2, 1, 3)
    out2 = euler_sample(field, noise, sched, cfg_scale=3.0, uncond_kwargs={"context": short}, context=cond)
    assert calls == [2, 2, 2, 2]
    torch.testing.assert_close(out2, out)

    calls.clear()
    euler_sample(field, noise, sched, cfg_scale=1.0, uncond_kwargs={"context": uncond}, context=cond)
    assert calls == [2, 2]  # scale 1 skips the unconditional pass


def test_guidance_applies_only_inside_its_interval():
    noise = torch.randn(2, 3)
    sched = sampling_schedule(4)  # steps start at t = 1, 0.75, 0.5, 0.25
    seen = []

    def field(x, t, context):
        seen.append((round(float(t[0]), 2), x.shape[0]))
        return context.mean(dim=1) + 0 * x  # (B, 3)

    cond, uncond = torch.ones(2, 4, 3), torch.zeros(2, 4, 3)
    out = euler_sample(field, noise, sched, cfg_scale=3.0, uncond_kwargs={"context": uncond}, context=cond,
                       guidance_min_t=0.4, guidance_max_t=0.8)
    # outside [0.4, 0.8] one conditional call per step (v = 1); inside one batched guided call (v = 3)
    assert seen == [(1.0, 2), (0.75, 4), (0.5, 4), (0.25, 2)]
    torch.testing.assert_close(out, noise - 0.5 * 1.0 - 0.5 * 3.0)

    seen.clear()
    every = euler_sample(field, noise, sched, cfg_scale=3.0, uncond_kwargs={"context": uncond}, context=cond,
                         guidance_min_t=0.0, guidance_max_t=1.0)
    assert [n for _, n in seen] == [4, 4, 4, 4]  # (0, 1) guides every step, t = 1 included
    torch.testing.assert_close(every, noise - 3.0)


@pytest.mark.parametrize("bad", [(0.0, 0.0), (-0.1, 0.8), (0.5, 1.5), (0.9, 0.8), (0.5, float("nan"))])
def test_guidance_interval_outside_its_range_is_refused(bad):
    with pytest.raises(InputError, match=r"guidance interval needs 0 <= guidance_min_t <= guidance_max_t <= 1"):
        euler_sample(lambda x, t: x, torch.zeros(1, 2), sampling_schedule(2), guidance_min_t=bad[0],
                     guidance_max_t=bad[1])
    assert check_guidance_interval(0.5, 0.8) == (0.5, 0.8)
    assert guided_at(1.0, 0.0, 1.0) and guided_at(0.5, 0.5, 0.8) and not guided_at(0.83, 0.5, 0.8)
    assert not guided_at(0.44, 0.5, 0.8)


def test_seeded_noise():
    a = seeded_noise((2, 4, 8, 8), seed=42)
    assert torch.equal(a, seeded_noise((2, 4, 8, 8), seed=42))
    assert not torch.equal(a, seeded_noise((2, 4, 8, 8), seed=43))
    ref = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, ref)
    b16 = seeded_noise((2, 4, 8, 8), seed=42, dtype=torch.bfloat16)
    assert b16.dtype == torch.bfloat16 and torch.equal(b16, a.bfloat16())
    meta = seeded_noise((2, 3), seed=0, device="meta")
    assert meta.is_meta
