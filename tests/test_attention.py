"""Attention entry point, key padding bias and RoPE against references computed another way."""

import math

import pytest
import torch

from unifusion.attention import (
    FeedForward,
    SelfAttention,
    apply_rope,
    key_padding_bias,
    rope_frequencies,
    sdpa_attention,
)


def reference_attention(q, k, v, bias=None):
    """Plain softmax(QK^T/sqrt(d) + bias) V over (B, H, N, d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ v


def test_sdpa_matches_reference_both_layouts():
    torch.manual_seed(0)
    b, h, n, d = 2, 3, 5, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    ref = reference_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)
    out = sdpa_attention(q, k, v, h, skip_reshape=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    flat = [t.transpose(1, 2).reshape(b, n, h * d) for t in (q, k, v)]
    torch.testing.assert_close(sdpa_attention(*flat, h), ref, atol=1e-5, rtol=1e-5)


def test_sdpa_cross_attention_lengths():
    q = torch.randn(2, 4, 16)
    kv = torch.randn(2, 7, 16)
    assert sdpa_attention(q, kv, kv, heads=2).shape == (2, 4, 16)


def test_key_padding_bias_masks_keys_exactly():
    torch.manual_seed(1)
    b, h, n, d = 2, 2, 6, 4
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    bias = key_padding_bias(mask, torch.float32)
    assert bias.shape == (b, 1, 1, n)
    assert bias[0].abs().max() == 0 and (bias[1, 0, 0, 3:] < -1e30).all()
    out = sdpa_attention(q, k, v, h, mask=bias, skip_reshape=True)
    # sample 1: same result as attending to its first 3 keys only
    ref = reference_attention(q[1:], k[1:, :, :3], v[1:, :, :3]).transpose(1, 2).reshape(1, n, h * d)
    torch.testing.assert_close(out[1:], ref, atol=1e-5, rtol=1e-5)
    # changing padded keys/values changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3:] = 100.0
    v2[1, :, 3:] = -7.0
    torch.testing.assert_close(sdpa_attention(q, k2, v2, h, mask=bias, skip_reshape=True), out)


def test_fully_masked_row_is_finite_in_half_precision():
    mask = torch.zeros(1, 4, dtype=torch.bool)
    bias = key_padding_bias(mask, torch.bfloat16)
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16) * 10
    out = sdpa_attention(q, q, q, 1, mask=bias, skip_reshape=True)
    assert torch.isfinite(out).all()


def test_key_padding_bias_rejects_bad_mask():
    with pytest.raises(ValueError, match="bool mask"):
        key_padding_bias(torch.ones(2, 3), torch.float32)


def complex_rope_reference(x, pos, axes_dim, theta):
    """RoPE as complex multiplication of adjacent channel pairs, axis by axis."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))  # (B, H, N, d/2)
    angles = []
    for i, dim in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(pos[..., i].double()[..., None] * omega)  # (B, N, dim/2)
    rot = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, -1))[:, None]  # (B, 1, N, d/2)
    return torch.view_as_real(xc * rot).reshape(x.shape).float()


def test_rope_matches_complex_reference():
    torch.manual_seed(2)
    axes = (4, 6, 6)
    ids = torch.randint(0, 50, (2, 7, 3)).float()
    freqs = rope_frequencies(ids, axes, 10000.0)
    assert freqs.shape == (2, 1, 7, 8, 2, 2) and freqs.dtype == torch.float32
    q, k = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    q2, k2 = apply_rope(q, k, freqs)
    torch.testing.assert_close(q2, complex_rope_reference(q, ids, axes, 10000.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k2, complex_rope_reference(k, ids, axes, 10000.0), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(3)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq, pk):
        fq = rope_frequencies(torch.tensor([[[float(pq)]]]), (8,), 100.0)
        fk = rope_frequencies(torch.tensor([[[float(pk)]]]), (8,), 100.0)
        return (apply_rope(q, q, fq)[0] * apply_rope(k, k, fk)[0]).sum()

    torch.testing.assert_close(score(3, 1), score(12, 10), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rope_keeps_bfloat16_and_zero_position_is_identity():
    q = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    freqs = rope_frequencies(torch.zeros(1, 3, 1), (8,), 10000.0)
    q2, _ = apply_rope(q, q, freqs)
    assert q2.dtype == torch.bfloat16
    torch.testing.assert_close(q2, q)


def test_rope_rejects_wrong_axes():
    with pytest.raises(ValueError, match="rope ids"):
        rope_frequencies(torch.zeros(1, 3, 2), (4, 4, 4), 10000.0)


def test_self_attention_uses_injected_function_and_matches_default():
    torch.manual_seed(4)
    layer = SelfAttention(16, 2)
    calls = []

    def spy(q, k, v, heads, mask=None, skip_reshape=False):
        calls.append((tuple(q.shape), heads, skip_reshape))
        return sdpa_attention(q, k, v, heads, mask=mask, skip_reshape=skip_reshape)

    x = torch.randn(2, 5, 16)
    ref = layer(x)
    layer.attention = spy
    torch.testing.assert_close(layer(x), ref)
    assert calls == [((2, 2, 5, 8), 2, True)]


def test_self_attention_and_mlp_bfloat16():
    layer = SelfAttention(16, 2).to(torch.bfloat16)
    mlp = FeedForward(16, 32).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16 and mlp(x).dtype == torch.bfloat16


def _recording_sdpa(monkeypatch) -> list[torch.dtype]:
    """Record the dtype each call of torch's SDPA computes in."""
    seen: list[torch.dtype] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return original(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def test_cpu_half_precision_attention_computes_in_float32(monkeypatch):
    torch.manual_seed(2)
    b, h, n, d = 2, 2, 6, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    bias = key_padding_bias(torch.tensor([[True] * 6, [True] * 4 + [False] * 2]), torch.bfloat16)
    seen = _recording_sdpa(monkeypatch)
    out = sdpa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), h, mask=bias, skip_reshape=True)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    ref = sdpa_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), h,
                         mask=key_padding_bias(torch.tensor([[True] * 6, [True] * 4 + [False] * 2]), torch.float32),
                         skip_reshape=True)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def test_attention_under_cpu_autocast_stays_float32_and_trains(monkeypatch):
    torch.manual_seed(3)
    layer = SelfAttention(16, 2)
    x = torch.randn(2, 5, 16)
    seen = _recording_sdpa(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert seen == [torch.float32]  # autocast would otherwise run SDPA in bfloat16
    out.float().square().mean().backward()
    assert layer.qkv.weight.grad is not None and torch.isfinite(layer.qkv.weight.grad).all()
    seen.clear()
    layer(x)
    assert seen == [torch.float32]
