"""The FLOP model behind lap_share.py's predicted shares, checked against torch's FLOP counter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.lap_share import CONFIGS, lap_flops, run_flops  # noqa: E402
from unifusion.config import DiTConfig, VLMIdentity, default_layer_selection, make_config  # noqa: E402
from unifusion.model import UniFusionModel  # noqa: E402


def matmul_attention(q, k, v, heads, mask=None, skip_reshape=False):
    """Attention as plain matmuls, which the FLOP counter sees (it does not count CPU SDPA kernels)."""
    b, h, n, d = q.shape
    scores = q @ k.transpose(-1, -2) / d**0.5  # (B, h, N, N)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h * d)


@pytest.mark.parametrize("cond", [8, 40])
def test_lap_and_dit_flops_match_counted(cond):
    cfg = make_config(VLMIdentity("InternVLForConditionalGeneration", 12, 64, default_layer_selection(12)),
                      DiTConfig(in_channels=4, patch_size=2, hidden_size=96, depth=3, num_heads=2, time_embed_dim=32,
                                rope_axes=(12, 18, 18)), lap_heads=4, refiner_blocks=2)
    model = UniFusionModel(cfg, attention=matmul_attention).eval()
    features = torch.randn(1, cond, cfg.lap.num_vlm_layers, cfg.lap.vlm_hidden_size)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as lap_counter:
            tokens = model.encode_condition(features)
        with FlopCounterMode(display=False) as dit_counter:
            model(torch.randn(2, 4, 16, 16), torch.rand(2), tokens.expand(2, -1, -1))
    assert lap_flops(cfg.lap, cond) == pytest.approx(lap_counter.get_total_flops(), rel=0.05)
    assert run_flops(cfg.dit, 64, cond, steps=1) == pytest.approx(dit_counter.get_total_flops(), rel=0.05)


def test_scaled_config_keeps_the_paper_proportions():
    cfg, latent, cond = CONFIGS["scaled"]
    assert cfg.lap.num_vlm_layers == 10 and cfg.lap.num_blocks == 2 and cfg.lap.refiner_blocks == 2
    assert cfg.lap.vlm_hidden_size == cfg.dit.hidden_size
    assert cond == latent[1] * latent[2] // cfg.dit.patch_size**2  # condition as long as the image: 3 references
