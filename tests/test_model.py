"""UniFusionModel: key names, null condition, tiny forward/backward, paper-size parameter count."""

import logging

import pytest
import torch

from unifusion.config import paper_preset, tiny_preset
from unifusion.dit import UniFusionDiT
from unifusion.lap import LAPConditioner
from unifusion.model import UniFusionModel

log = logging.getLogger(__name__)


def test_paper_preset_has_about_8b_parameters():
    cfg = paper_preset()
    model = UniFusionModel(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())
    lap = sum(p.numel() for p in model.lap.parameters())
    log.info("paper preset: %d parameters (LAP+refiner %d, DiT %d)", total, lap, total - lap)
    assert abs(total - 8e9) / 8e9 < 0.10, total
    # closed form for the DiT blocks: qkv + proj + 2 qk-norms + MLP + adaLN modulation
    d, e, hd = cfg.dit.hidden_size, cfg.dit.time_embed_dim, cfg.dit.head_dim
    m = int(d * cfg.dit.mlp_ratio)
    per_block = (3 * d * d + 3 * d) + (d * d + d) + 2 * hd + (2 * d * m + m + d) + (e * 6 * d + 6 * d)
    assert sum(p.numel() for p in model.dit.blocks.parameters()) == cfg.dit.depth * per_block


def test_state_dict_keys_are_lap_and_dit():
    model = UniFusionModel(tiny_preset())
    keys = list(model.state_dict())
    assert keys and all(k.startswith(("lap.", "dit.")) for k in keys)
    assert "lap.pool.layer_embed" in keys and "lap.refiner.proj.weight" in keys
    assert "dit.blocks.0.modulation.weight" in keys and "dit.final_layer.linear.weight" in keys
    assert isinstance(model.lap, LAPConditioner) and isinstance(model.dit, UniFusionDiT)


def test_tiny_forward_backward_on_cpu():
    torch.manual_seed(0)
    cfg = tiny_preset()
    model = UniFusionModel(cfg)
    b, s = 2, 5
    feats = torch.randn(b, s, cfg.lap.num_vlm_layers, cfg.lap.vlm_hidden_size)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    ctx = model.encode_condition(feats, mask)
    assert ctx.shape == (b, s, cfg.dit.hidden_size)
    x = torch.randn(b, cfg.dit.in_channels, 8, 8)
    v = model(x, torch.rand(b), ctx, mask)
    assert v.shape == x.shape
    # adaLN-Zero: step 1 trains the final layer, step 2 the gates, step 3 reaches the condition path
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss = (model(x, torch.rand(b), model.encode_condition(feats, mask), mask) - x).square().mean()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.lap.pool.fc.weight.grad.abs().sum().item() > 0
    assert model.dit.blocks[0].modulation.weight.grad.abs().sum().item() > 0


@pytest.mark.needs_cpp_compiler
def test_whole_forward_compiles_as_one_graph_with_padding():
    """LAP + DiT under torch.compile(fullgraph=True): no branch on mask values splits the graph (a batch
    with and without padding, and another length, run through the same dynamic graph), and the
    compiled forward gives eager's values up to kernel rounding. ComfyUI's TorchCompileModel and
    TrainConfig.compile rely on it."""
    torch.manual_seed(0)
    cfg = tiny_preset()
    model = UniFusionModel(cfg).eval()

    def forward(x, t, feats, mask):
        return model(x, t, model.encode_condition(feats, mask), mask)

    compiled = torch.compile(forward, fullgraph=True, dynamic=True)
    x, t = torch.randn(2, cfg.dit.in_channels, 8, 8), torch.rand(2)
    for s, lengths in ((5, (5, 3)), (5, (5, 5)), (7, (2, 7))):
        feats = torch.randn(2, s, cfg.lap.num_vlm_layers, cfg.lap.vlm_hidden_size)
        mask = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, feats, mask), forward(x, t, feats, mask), rtol=1e-4, atol=1e-5)


def test_null_condition_is_zeros_and_differs_from_condition():
    torch.manual_seed(1)
    cfg = tiny_preset()
    model = UniFusionModel(cfg)
    with torch.no_grad():
        for p in model.dit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    feats = torch.randn(1, 4, cfg.lap.num_vlm_layers, cfg.lap.vlm_hidden_size)
    ctx = model.encode_condition(feats)
    null = UniFusionModel.null_condition(ctx)
    assert torch.equal(null, torch.zeros_like(ctx)) and null.dtype == ctx.dtype
    x, t = torch.randn(1, cfg.dit.in_channels, 4, 4), torch.rand(1)
    assert not torch.allclose(model(x, t, ctx), model(x, t, null), atol=1e-5)


def test_bfloat16_model():
    cfg = tiny_preset()
    model = UniFusionModel(cfg, dtype=torch.bfloat16)
    feats = torch.randn(1, 3, cfg.lap.num_vlm_layers, cfg.lap.vlm_hidden_size, dtype=torch.bfloat16)
    ctx = model.encode_condition(feats)
    v = model(torch.randn(1, cfg.dit.in_channels, 4, 4, dtype=torch.bfloat16), torch.rand(1), ctx)
    assert ctx.dtype == v.dtype == torch.bfloat16
