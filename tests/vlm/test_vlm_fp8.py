"""fp8 weight storage of the VLM: half the bytes of bf16, features close to the full-precision ones."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from unifusion.vlm.encode import encode
from unifusion.vlm.fp8 import FP8_DTYPE, Fp8Linear, compute_dtype, store_linear_weights_fp8
from unifusion.vlm.loader import load_vlm
from unifusion.vlm.verifi import verifi_rewrite

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_fp8_linear_matches_reference_within_quantisation_error():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    ref = linear(x)
    holder = nn.Sequential(linear)
    assert store_linear_weights_fp8(holder) == 1 and isinstance(holder[0], Fp8Linear)
    assert holder[0].weight.dtype == FP8_DTYPE and holder[0].weight_scale.shape == (32, 1)
    # per-row scaled e4m3: each weight within 2^-4 relative, so outputs within a few percent
    assert (holder(x) - ref).abs().max() < 0.05 * ref.abs().max()
    assert store_linear_weights_fp8(holder) == 0  # already converted


def test_fp8_vlm_features_close_and_weights_smaller(tiny_dirs):
    for family, folder in tiny_dirs.items():
        reference = load_vlm(folder, dtype=torch.bfloat16)
        fp8 = load_vlm(folder, dtype=torch.bfloat16)
        converted = store_linear_weights_fp8(fp8.model)
        assert converted > 0 and fp8.dtype == compute_dtype(fp8.model) == torch.bfloat16
        assert fp8.model.get_submodule("lm_head").weight.dtype == torch.bfloat16  # Verifi's token choice stays exact
        linear_bytes = sum(m.weight.numel() for m in fp8.model.modules() if isinstance(m, Fp8Linear))
        assert _weight_bytes(reference.model) - _weight_bytes(fp8.model) >= 0.95 * linear_bytes, family
        with torch.no_grad():
            a = encode(reference, "a red circle on the left", [IMAGE], max_tiles=2).features
            b = encode(fp8, "a red circle on the left", [IMAGE], max_tiles=2).features
        assert a.shape == b.shape and torch.isfinite(b).all()
        cos = torch.nn.functional.cosine_similarity(a.float().flatten(0, 2), b.float().flatten(0, 2), dim=-1)
        assert cos.mean() > 0.97, (family, float(cos.mean()))
        out = verifi_rewrite(fp8, "a red circle", [IMAGE], max_new_tokens=4, max_tiles=1)
        assert out.features.features.shape[2] == len(fp8.selected_layers)
