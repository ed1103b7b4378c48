"""The memory plan's activation formula against peaks measured with the allocation tracker, and
ComfyUI's estimate (the nodes' memory_usage_factor / extra_conds_shapes) against the formula."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "comfyui"))

from benchmarks import memory_plan  # noqa: E402
from harness import find_python, require_comfyui  # noqa: E402
from unifusion.config import DiTConfig, LAPConfig, paper_preset, tiny_preset  # noqa: E402

LATENT_TOKENS = 128 * 128 // 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width, heads, side, cond", [(256, 4, 16, 32), (256, 2, 24, 8)])
def test_dit_step_formula_predicts_measured_peak(dtype, width, heads, side, cond):
    head = width // heads
    dit = DiTConfig(in_channels=4, patch_size=2, hidden_size=width, depth=2, num_heads=heads, time_embed_dim=64,
                    rope_axes=(head // 4, 3 * head // 8, 3 * head // 8))
    measured = memory_plan.measure_dit_step(dit, 2, side, cond, dtype)
    formula = memory_plan.dit_step_bytes(dit, 2, (side // 2) ** 2, cond, dtype.itemsize, device="cpu").peak
    assert abs(formula / measured - 1) < 0.2, (formula, measured)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lap_formula_predicts_measured_peak(dtype):
    lap = LAPConfig(vlm_hidden_size=128, num_vlm_layers=6, out_dim=96, num_heads=4, refiner_heads=4)
    measured = memory_plan.measure_lap(lap, 48, dtype)
    formula = memory_plan.lap_bytes(lap, 1, 48, dtype.itemsize, device="cpu", with_input=False).peak
    assert abs(formula / measured - 1) < 0.2, (formula, measured)


def test_peak_grows_with_tokens_not_with_depth():
    cfg = paper_preset().dit
    one = memory_plan.dit_step_bytes(cfg, 2, LATENT_TOKENS, 256, 2).peak
    deeper = memory_plan.dit_step_bytes(DiTConfig(**{**cfg.__dict__, "depth": 64}), 2, LATENT_TOKENS, 256, 2).peak
    longer = memory_plan.dit_step_bytes(cfg, 2, LATENT_TOKENS, 256 + 4352, 2).peak
    assert deeper == one and longer == pytest.approx(2 * one)


@pytest.mark.parametrize("make", [tiny_preset, paper_preset])
def test_parameter_counts_match_closed_form(make):
    cfg = make()
    counts = memory_plan.unifusion_parameter_counts(cfg)
    d, e, hd = cfg.dit.hidden_size, cfg.dit.time_embed_dim, cfg.dit.head_dim
    m = int(d * cfg.dit.mlp_ratio)
    p2c = cfg.dit.patch_size**2 * cfg.dit.in_channels
    block = (3 * d * d + 3 * d) + 2 * hd + (d * d + d) + (d * m + m) + (m * d + d) + (e * 6 * d + 6 * d)
    dit = (p2c * d + d) + (256 * e + e) + (e * e + e) + cfg.dit.depth * block + (e * 2 * d + 2 * d) + (d * p2c + p2c)
    assert counts["dit"] == dit
    h, lay, lm = cfg.lap.vlm_hidden_size, cfg.lap.num_vlm_layers, int(cfg.lap.vlm_hidden_size * cfg.lap.mlp_ratio)
    lap_block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * lm + lm) + (lm * h + h)  # 2 norms (w, b)
    pool = lay * h + cfg.lap.num_blocks * (lap_block + 2 * (h // cfg.lap.num_heads)) + 2 * h + (lay * h * h + h)
    refiner = cfg.lap.refiner_blocks * (lap_block + 2 * (h // cfg.lap.refiner_heads)) + 2 * h \
        + (h * cfg.lap.out_dim + cfg.lap.out_dim)
    assert counts["lap + refiner"] == pool + refiner


@pytest.mark.parametrize("references", [0, 1, 3])
def test_nodes_estimate_within_20_percent_of_formula(references):
    cfg = paper_preset()
    s = memory_plan.condition_tokens(references)
    estimate, _ = memory_plan.comfy_estimate_bytes(cfg, 1, s, torch.bfloat16, None)
    formula = memory_plan.dit_step_bytes(cfg.dit, 2, LATENT_TOKENS, s, 2).peak
    assert abs(estimate / formula - 1) < 0.2, (estimate, formula)


def test_estimate_tracks_the_formula_at_every_batch_size():
    cfg = paper_preset()
    ratios = {}
    for batch in (1, 4):
        estimate, _ = memory_plan.comfy_estimate_bytes(cfg, batch, 4096, torch.bfloat16, None)
        formula = memory_plan.dit_step_bytes(cfg.dit, 2 * batch, LATENT_TOKENS, 4096, 2).peak
        ratios[batch] = estimate / formula
    # condition tokens are counted once per latent, so a batch of 4 is estimated like a batch of 1
    assert ratios[4] == pytest.approx(ratios[1], rel=1e-9)
    assert abs(ratios[1] - 1) < 0.2


PROBE = textwrap.dedent('''
    import json, sys, torch
    repo, comfy_dir = sys.argv[1:3]
    sys.path.insert(0, repo)
    from benchmarks import memory_plan
    cfg = memory_plan.paper_preset()
    out = {}
    for batch in (1, 4):
        for refs in (0, 3):
            s = memory_plan.condition_tokens(refs)
            comfy, source = memory_plan.comfy_estimate_bytes(cfg, batch, s, torch.bfloat16, memory_plan.Path(comfy_dir))
            replica, _ = memory_plan.comfy_estimate_bytes(cfg, batch, s, torch.bfloat16, None)
            out[f"{batch},{refs}"] = [comfy, replica, source]
    print(json.dumps(out))
''')


def test_comfyui_estimate_equals_replica_and_formula():
    comfy_dir = require_comfyui(REPO, "set COMFYUI_DIR=/path/to/ComfyUI to compare with ComfyUI's own memory estimate")
    result = subprocess.run([find_python(comfy_dir), "-c", PROBE, str(REPO), str(comfy_dir)], capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    cfg = paper_preset()
    for key, (comfy, replica, source) in report.items():
        batch, refs = (int(v) for v in key.split(","))
        assert source == "ComfyUI estimate_memory"
        assert comfy == pytest.approx(replica, rel=1e-9)
        s = memory_plan.condition_tokens(refs)
        formula = memory_plan.dit_step_bytes(cfg.dit, 2 * batch, LATENT_TOKENS, s, 2).peak
        assert abs(comfy / formula - 1) < 0.2, (key, comfy / formula)
