"""LAP, refiner and conditioner: shapes, gains, padding invariance, references."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unifusion.config import LAPConfig
from unifusion.errors import InputError, VLMMismatchError
from unifusion.lap import ConditionRefiner, LAPConditioner, LayerwiseAttentionPooling

CFG = LAPConfig(vlm_hidden_size=32, num_vlm_layers=4, out_dim=24, num_heads=4, refiner_heads=4, refiner_blocks=1)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (norm weights away from 1, biases non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + offset)
    return module


def features(b=2, s=5, seed=0, cfg=CFG, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, cfg.num_vlm_layers, cfg.vlm_hidden_size, generator=gen) * scale


@pytest.fixture(scope="module")
def pool():
    torch.manual_seed(0)
    return randomize(LayerwiseAttentionPooling(CFG)).eval()


def test_pool_shape_and_outlier_robustness(pool):
    x = features()
    out = pool(x)
    assert out.shape == (2, 5, 32) and out.dtype == torch.float32
    # each layer's vector is RMS-normalised first, so a per-layer scale (VLM outliers) changes nothing
    scaled = x * torch.tensor([1.0, 300.0, 0.5, 5000.0]).view(1, 1, 4, 1)
    torch.testing.assert_close(pool(scaled), out, atol=1e-4, rtol=1e-4)


def test_pool_without_blocks_matches_manual_reference():
    cfg = LAPConfig(vlm_hidden_size=8, num_vlm_layers=3, out_dim=8, num_heads=2, num_blocks=0, refiner_heads=2)
    p = randomize(LayerwiseAttentionPooling(cfg), seed=1)
    x = features(b=2, s=3, cfg=cfg)
    y = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() + p.layer_embed
    y = F.layer_norm(y, (8,), p.norm_out.weight, p.norm_out.bias, eps=1e-6)
    # FC over the concatenation [layer 0 | layer 1 | layer 2]
    w = p.fc.weight.view(8, 3, 8)
    ref = torch.einsum("bslh,olh->bso", y, w) + p.fc.bias
    torch.testing.assert_close(p(x), ref, atol=1e-5, rtol=1e-5)


def test_fresh_blocks_are_the_identity():
    """A fresh LAP with blocks equals the block-free one (a linear map of the stacked layers),
    and a fresh refiner only projects: training starts from the baselines' simple signal."""
    cfg = LAPConfig(vlm_hidden_size=8, num_vlm_layers=3, out_dim=8, num_heads=2, num_blocks=2, refiner_heads=2)
    torch.manual_seed(3)
    with_blocks = LayerwiseAttentionPooling(cfg)
    without = LayerwiseAttentionPooling(replace(cfg, num_blocks=0))
    without.load_state_dict({k: v for k, v in with_blocks.state_dict().items() if not k.startswith("blocks.")})
    x = features(b=2, s=3, cfg=cfg)
    torch.testing.assert_close(with_blocks(x), without(x))
    refiner = ConditionRefiner(cfg)
    pooled = x[:, :, 0]
    mask = torch.ones(2, 3, dtype=torch.bool)
    torch.testing.assert_close(refiner(pooled, mask), refiner.proj(refiner.norm_out(pooled)))
    # the zeroed projections still learn: their gradient is not zero
    with_blocks(x).square().sum().backward()
    assert all(float(b.attn.proj.weight.grad.abs().sum()) > 0 for b in with_blocks.blocks)


def test_pool_is_per_token(pool):
    x = features()
    out = pool(x)
    torch.testing.assert_close(pool(x[1:, 2:3]), out[1:, 2:3], atol=1e-5, rtol=1e-5)


def test_gain_zero_drops_layer_exactly(pool):
    x = features()
    gains = torch.tensor([1.0, 0.0, 1.5, 1.0])
    base = pool(x, gains)
    x2 = x.clone()
    x2[:, :, 1] = torch.randn_like(x2[:, :, 1]) * 50
    assert torch.equal(pool(x2, gains), base)  # zero attention weight and zero FC input: exact
    assert not torch.allclose(pool(x2), pool(x), atol=1e-3)  # without the gain, layer 1 matters


def test_unit_gains_equal_no_gains(pool):
    x = features()
    assert torch.equal(pool(x, torch.ones(4)), pool(x))
    assert torch.equal(pool(x, [1.0, 1.0, 1.0, 1.0]), pool(x))


def test_uniform_gain_scales_fc_input(pool):
    # a constant key bias log(c) leaves softmax unchanged, so only the FC input is scaled by c
    x = features()
    b = pool.fc.bias
    out1, out3 = pool(x) - b, pool(x, [3.0] * 4) - b
    torch.testing.assert_close(out3, 3.0 * out1, atol=1e-4, rtol=1e-4)


def test_gain_above_one_changes_output(pool):
    x = features()
    assert not torch.allclose(pool(x, [1.0, 2.0, 1.0, 1.0]), pool(x), atol=1e-3)


@pytest.mark.parametrize(
    "gains,match",
    [([1.0, 1.0], "one value per selected VLM layer"), ([1.0, -1.0, 1.0, 1.0], ">= 0"),
     ([1.0, float("nan"), 1.0, 1.0], "finite"), ([0.0] * 4, "all zero")],
)
def test_bad_gains_raise(pool, gains, match):
    with pytest.raises(InputError, match=match):
        pool(features(), gains)


def test_wrong_feature_shape_names_the_cause(pool):
    with pytest.raises(VLMMismatchError, match="other layers or another VLM"):
        pool(torch.randn(1, 2, 3, 32))


def test_refiner_padding_anywhere_leaves_real_tokens_unchanged():
    torch.manual_seed(2)
    ref = randomize(ConditionRefiner(CFG), seed=2).eval()
    real = torch.randn(1, 4, 32)
    alone = ref(real)
    assert alone.shape == (1, 4, 24)
    # right padding and interleaved padding, with garbage in the padded slots
    padded = torch.randn(2, 7, 32) * 10
    mask = torch.zeros(2, 7, dtype=torch.bool)
    padded[0, :4], mask[0, :4] = real[0], True
    idx = torch.tensor([0, 2, 3, 6])
    padded[1, idx], mask[1, idx] = real[0], True
    out = ref(padded, mask)
    torch.testing.assert_close(out[0, :4], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, idx], alone[0], atol=1e-5, rtol=1e-5)


def test_refiner_is_bidirectional_and_order_aware():
    ref = randomize(ConditionRefiner(CFG), seed=3).eval()
    x = torch.randn(1, 4, 32)
    out = ref(x)
    x2 = x.clone()
    x2[0, 3] = torch.randn(32)  # (a constant shift would vanish in LayerNorm)
    assert not torch.allclose(ref(x2)[0, 0], out[0, 0], atol=1e-4)  # the first token sees the last
    assert not torch.allclose(ref(x.flip(1)).flip(1), out, atol=1e-4)  # positions matter (RoPE)


@pytest.fixture(scope="module")
def conditioner():
    torch.manual_seed(4)
    return randomize(LAPConditioner(CFG), seed=4).eval()


def test_conditioner_zeroes_padding_and_matches_unpadded(conditioner):
    x = features(b=2, s=6, seed=5)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    out = conditioner(x, mask)
    assert out.shape == (2, 6, 24)
    assert torch.equal(out[1, 3:], torch.zeros(3, 24))
    torch.testing.assert_close(out[1, :3], conditioner(x[1:, :3], mask[1:, :3])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], conditioner(x[:1], None)[0], atol=1e-5, rtol=1e-5)


def test_conditioner_deterministic_and_gains_pass_through(conditioner):
    x = features(b=1, s=3, seed=6)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert torch.equal(conditioner(x, mask), conditioner(x, mask))
    x2 = x.clone()
    x2[:, :, 0] = 7.0
    torch.testing.assert_close(conditioner(x2, mask, gains=[0, 1, 1, 1]), conditioner(x, mask, gains=[0, 1, 1, 1]),
                               atol=1e-6, rtol=1e-6)


def test_conditioner_empty_and_bad_mask(conditioner):
    out = conditioner(features(b=2, s=0), torch.zeros(2, 0, dtype=torch.bool))
    assert out.shape == (2, 0, 24)
    with pytest.raises(InputError, match="bool tensor"):
        conditioner(features(b=2, s=3), torch.ones(2, 3))


def test_conditioner_bfloat16_and_backward():
    torch.manual_seed(7)
    model = LAPConditioner(CFG)
    x = features(b=2, s=4)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    out = model(x, mask)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    out16 = model.to(torch.bfloat16)(x.bfloat16(), mask)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out.detach(), atol=0.1, rtol=0.1)


def test_operations_without_rmsnorm_fall_back_and_are_used():
    made = []

    class SpyLinear(nn.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    ops = SimpleNamespace(Linear=SpyLinear, LayerNorm=nn.LayerNorm)
    model = LAPConditioner(CFG, operations=ops, dtype=torch.float64)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(made) == n_linear > 0
    assert all(p.dtype == torch.float64 for p in model.parameters())
    meta = LAPConditioner(CFG, device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_chunked_pooling_equals_one_pass(pool):
    x = features(b=3, s=7)
    whole = pool(x, chunk_tokens=10_000)
    for chunk in (1, 4, 20):
        torch.testing.assert_close(pool(x, chunk_tokens=chunk), whole, atol=1e-5, rtol=1e-4)  # GEMM blocking only
    with pytest.raises(InputError, match="chunk_tokens"):
        pool(x, chunk_tokens=0)


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_baseline_pooling_matches_manual_reference(mode):
    cfg = LAPConfig(vlm_hidden_size=8, num_vlm_layers=3, out_dim=8, num_heads=2, refiner_heads=2, pooling=mode)
    p = randomize(LayerwiseAttentionPooling(cfg), seed=2)
    assert len(p.blocks) == 0 and p.fc.weight.shape == (8, 8)
    x = features(b=2, s=3, cfg=cfg)
    normed = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    vec = normed[:, :, -1] if mode == "last" else normed.mean(2)
    torch.testing.assert_close(p(x), vec @ p.fc.weight.T + p.fc.bias, atol=1e-5, rtol=1e-5)
    if mode == "mean":  # a zero gain drops a layer from the mean
        ref = normed[:, :, 1:].mean(2) @ p.fc.weight.T + p.fc.bias
        torch.testing.assert_close(p(x, gains=[0.0, 1.0, 1.0]), ref, atol=1e-5, rtol=1e-5)


def test_unknown_pooling_mode_is_refused():
    from unifusion.config import ConfigError

    with pytest.raises(ConfigError, match="pooling"):
        LAPConfig(vlm_hidden_size=8, num_vlm_layers=3, out_dim=8, num_heads=2, refiner_heads=2, pooling="max")
