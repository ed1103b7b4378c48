"""Single-stream DiT: shapes, patchify reference, masks, positions, dtypes, checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unifusion.attention import sdpa_attention
from unifusion.config import DiTConfig
from unifusion.dit import UniFusionDiT, grid_position_embedding, timestep_embedding, underlying_image_features
from unifusion.errors import InputError

CFG = DiTConfig(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, time_embed_dim=16,
                rope_axes=(4, 6, 6))


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere, so zero-initialised gates do not hide mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + offset)
    return module


@pytest.fixture(scope="module")
def model():
    return randomize(UniFusionDiT(CFG)).eval()


def inputs(b=2, s=3, h=6, w=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=gen)
    t = torch.rand(b, generator=gen)
    ctx = torch.randn(b, s, 32, generator=gen)
    return x, t, ctx


def test_fresh_model_predicts_zero_velocity():
    x, t, ctx = inputs()
    out = UniFusionDiT(CFG)(x, t, ctx)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))


def test_patchify_matches_unfold_reference():
    # hidden = C*p*p with identity embed/projection and no blocks: output = per-patch LayerNorm
    cfg = DiTConfig(in_channels=4, patch_size=2, hidden_size=16, depth=0, num_heads=2, time_embed_dim=8,
                    rope_axes=(2, 2, 4))
    m = UniFusionDiT(cfg)
    with torch.no_grad():
        m.x_embedder.weight.copy_(torch.eye(16))
        m.x_embedder.bias.zero_()
        m.final_layer.linear.weight.copy_(torch.eye(16))
    x = torch.randn(2, 4, 6, 8)
    patches = F.unfold(x, kernel_size=2, stride=2)  # (B, C*p*p, L), channel-major, row-major patches
    normed = F.layer_norm(patches.transpose(1, 2), (16,), eps=1e-6).transpose(1, 2)
    ref = F.fold(normed, (6, 8), kernel_size=2, stride=2)
    torch.testing.assert_close(m(x, torch.rand(2), None), ref, atol=1e-5, rtol=1e-5)


def test_odd_sizes_pad_and_crop(model):
    x, t, ctx = inputs(h=5, w=7)
    out = model(x, t, ctx)
    assert out.shape == (2, 4, 5, 7)
    padded = F.pad(x, (0, 1, 0, 1), mode="circular")
    torch.testing.assert_close(out, model(padded, t, ctx)[:, :, :5, :7], atol=1e-5, rtol=1e-5)


def test_padded_condition_tokens_change_nothing(model):
    x, t, ctx = inputs(b=1, s=3)
    ref = model(x, t, ctx)
    padded = torch.randn(1, 6, 32) * 5
    idx = torch.tensor([0, 2, 5])
    mask = torch.zeros(1, 6, dtype=torch.bool)
    padded[0, idx], mask[0, idx] = ctx[0], True
    torch.testing.assert_close(model(x, t, padded, mask), ref, atol=1e-5, rtol=1e-5)
    # mask all True equals no mask
    assert torch.equal(model(x, t, ctx, torch.ones(1, 3, dtype=torch.bool)), ref)


def test_condition_and_timestep_matter(model):
    x, t, ctx = inputs()
    out = model(x, t, ctx)
    assert not torch.allclose(model(x, t, ctx * 2), out, atol=1e-4)
    assert not torch.allclose(model(x, t * 0.5, ctx), out, atol=1e-4)
    assert not torch.allclose(model(x, t, ctx.flip(1)), out, atol=1e-4)  # condition order matters (RoPE)
    # scalar timestep broadcasts
    torch.testing.assert_close(model(x, torch.tensor(0.3), ctx), model(x, torch.full((2,), 0.3), ctx))


def test_empty_condition(model):
    x, t, _ = inputs()
    none = model(x, t, None)
    torch.testing.assert_close(model(x, t, torch.zeros(2, 0, 32)), none)
    torch.testing.assert_close(model(x, t, torch.zeros(2, 0, 32), torch.zeros(2, 0, dtype=torch.bool)), none)
    # a fully padded condition acts like no condition
    torch.testing.assert_close(model(x, t, torch.randn(2, 4, 32), torch.zeros(2, 4, dtype=torch.bool)), none,
                               atol=1e-5, rtol=1e-5)


def test_batch_elements_are_independent_and_deterministic(model):
    x, t, ctx = inputs()
    out = model(x, t, ctx)
    assert torch.equal(out, model(x, t, ctx))
    torch.testing.assert_close(model(x[1:], t[1:], ctx[1:]), out[1:], atol=1e-5, rtol=1e-5)


def test_bfloat16_forward(model):
    x, t, ctx = inputs()
    ref = model(x, t, ctx)
    m16 = randomize(UniFusionDiT(CFG, dtype=torch.bfloat16)).eval()
    out = m16(x.bfloat16(), t, ctx.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref, atol=0.15, rtol=0.1)


def test_gradient_checkpointing_same_grads():
    x, t, ctx = inputs()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    grads = []
    for ckpt in (False, True):
        m = randomize(UniFusionDiT(CFG), seed=3).train()
        m.gradient_checkpointing = ckpt
        m(x, t, ctx, mask).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_injected_attention_is_called_once_per_block():
    calls = []

    def spy(q, k, v, heads, mask=None, skip_reshape=False):
        calls.append(q.shape[2])
        return sdpa_attention(q, k, v, heads, mask=mask, skip_reshape=skip_reshape)

    m = UniFusionDiT(CFG, attention=spy)
    x, t, ctx = inputs(h=4, w=4)
    m(x, t, ctx)
    assert calls == [3 + 4] * CFG.depth  # 3 condition tokens + 2x2 latent patches


def test_timestep_embedding_reference():
    t = torch.tensor([0.0, 250.0])
    emb = timestep_embedding(t, dim=8)
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)])
    ref = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    torch.testing.assert_close(emb, ref)


@pytest.mark.parametrize(
    "args,match",
    [((torch.randn(1, 3, 4, 4), torch.rand(1), None), "latent channels"),
     ((torch.randn(1, 4, 4, 4), torch.rand(1), torch.randn(1, 2, 31)), "context must be"),
     ((torch.randn(1, 4, 4, 4), torch.rand(1), torch.randn(1, 2, 32), torch.ones(1, 2)), "context_mask"),
     ((torch.randn(2, 4, 4, 4), torch.rand(3), None), "timesteps")],
)
def test_bad_inputs_raise(model, args, match):
    with pytest.raises(InputError, match=match):
        model(*args)


def test_grid_position_embedding_tells_every_token_apart():
    emb = grid_position_embedding(6, 8, 32, theta=100.0)
    assert emb.shape == (48, 32)
    distances = torch.cdist(emb, emb) + torch.eye(48) * 1e3
    assert float(distances.min()) > 0.05
    # row-major like the tokens: token (r, c) shares its column half with token (r + 1, c)
    assert torch.equal(emb[3, 16:], emb[3 + 8, 16:]) and not torch.equal(emb[3, :16], emb[3 + 8, :16])


def test_absolute_position_adds_no_parameters_and_changes_the_output(model):
    from dataclasses import replace

    with_grid = UniFusionDiT(replace(CFG, absolute_position=True)).eval()
    assert with_grid.state_dict().keys() == model.state_dict().keys()
    with_grid.load_state_dict(model.state_dict())
    x, t, ctx = inputs()
    with torch.no_grad():
        assert not torch.allclose(with_grid(x, t, ctx), model(x, t, ctx), atol=1e-4)


def test_an_x0_predicting_dit_returns_the_velocity_to_its_guess(model):
    from dataclasses import replace

    from unifusion.dit import X0_MIN_T

    guesser = UniFusionDiT(replace(CFG, predict_x0=True)).eval()
    assert guesser.state_dict().keys() == model.state_dict().keys()  # the same file layout
    guesser.load_state_dict(model.state_dict())
    x, _, ctx = inputs()
    t = torch.tensor([0.7, 0.01])  # the second is floored at X0_MIN_T
    with torch.no_grad():
        head = model(x, t, ctx)  # the same weights read as a velocity model: the head's raw output
        v = guesser(x, t, ctx)
    torch.testing.assert_close(v[0], (x[0] - head[0]) / 0.7)
    torch.testing.assert_close(v[1], (x[1] - head[1]) / X0_MIN_T)
    # the Euler step to t = 0 lands on the guess
    torch.testing.assert_close(x[0] - 0.7 * v[0], head[0], atol=1e-5, rtol=0)


def test_predict_x0_survives_the_checkpoint_config_and_defaults_off_for_older_files():
    import json
    from dataclasses import asdict, replace

    from unifusion.config import UniFusionConfig, VLMIdentity, make_config

    config = make_config(VLMIdentity("InternVLForConditionalGeneration", 12, 64, (4, 7, 10)), replace(CFG, predict_x0=True))
    assert UniFusionConfig.from_json(config.to_json()).dit.predict_x0 is True
    raw = json.loads(config.to_json())
    del raw["dit"]["predict_x0"]  # a checkpoint written before the option existed
    assert UniFusionConfig.from_json(json.dumps(raw)).dit.predict_x0 is False
    assert "predict_x0" in asdict(CFG)


def test_placed_condition_tokens_take_the_latent_row_and_column_they_lie_over():
    from unifusion.dit import place_condition_tokens

    ids = UniFusionDiT._position_ids(1, 3, 8, 8, None, torch.device("cpu"))
    nan = float("nan")
    places = torch.tensor([[[0.125, 0.875], [nan, nan], [0.5, 0.0625]]])  # a 4x4 grid's first row/last column
    placed = place_condition_tokens(ids, places, 8, 8)
    assert placed[0, :3].tolist() == [[0.0, 0.5, 6.5], [1.0, 0.0, 0.0], [2.0, 3.5, 0.0]]
    assert torch.equal(placed[:, 3:], ids[:, 3:])  # the latent tokens keep theirs


def placements(b: int = 2, s: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Context positions (B, S, 2) with no token placed, and with token 1 placed at (0.25, 0.75)."""
    nowhere = torch.full((b, s, 2), float("nan"))
    somewhere = nowhere.clone()
    somewhere[:, 1] = torch.tensor([0.25, 0.75])
    return nowhere, somewhere


def test_image_positions_move_only_placed_tokens_and_are_off_by_default(model):
    from dataclasses import replace

    placer = UniFusionDiT(replace(CFG, image_positions=True)).eval()
    assert placer.state_dict().keys() == model.state_dict().keys()  # the same file layout
    placer.load_state_dict(model.state_dict())
    x, t, ctx = inputs()
    nowhere, somewhere = placements()
    with torch.no_grad():
        plain = model(x, t, ctx)
        torch.testing.assert_close(model(x, t, ctx, None, somewhere), plain)  # off: ignored
        torch.testing.assert_close(placer(x, t, ctx, None, nowhere), plain)  # nothing placed: as before
        moved = placer(x, t, ctx, None, somewhere)
        assert not torch.allclose(moved, plain, atol=1e-4)
        torch.testing.assert_close(placer(x, t, ctx, None, somewhere[:1]), moved)  # one row serves the batch
    with pytest.raises(InputError, match="context_positions must be"):
        placer(x, t, ctx, None, torch.zeros(2, 4, 2))


def test_underlying_image_features_give_each_latent_token_the_image_token_over_it():
    """A 2x2 grid of tokens over a 4x4 latent: each latent token gets the token whose quarter it
    lies in; text tokens (NaN), padding and rows without a placed token give nothing."""
    grid = torch.tensor([[(i + 0.5) / 2, (j + 0.5) / 2] for i in range(2) for j in range(2)])  # (4, 2)
    positions = torch.cat([torch.full((1, 2), float("nan")), grid]).expand(2, -1, -1).clone()  # (2, 5, 2)
    context = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    under = underlying_image_features(context, positions, 4, 4)  # (2, 16, 3)
    expected = torch.tensor([1 + (r // 2) * 2 + c // 2 for r in range(4) for c in range(4)])
    torch.testing.assert_close(under, context[:, expected])
    mask = torch.tensor([[True] * 5, [True, False, True, True, True]])  # row 1's top-left token is padding
    masked = underlying_image_features(context, positions, 4, 4, mask)
    torch.testing.assert_close(masked[0], under[0])
    # Row 1's top-left latent token now lies nearest the top-right and bottom-left tokens, equally.
    torch.testing.assert_close(masked[1, 0], (context[1, 2] + context[1, 3]) / 2)
    others = [i for i in range(16) if i not in (0, 1, 4, 5)]  # outside the padded token's quarter
    torch.testing.assert_close(masked[1, others], under[1, others])
    # Two references at the same place are averaged; none placed gives zeros.
    twice = underlying_image_features(torch.cat([context, context + 10], 1), torch.cat([positions, positions], 1), 4, 4)
    torch.testing.assert_close(twice, under + 5)
    assert not underlying_image_features(context, torch.full((2, 5, 2), float("nan")), 4, 4).any()


def test_image_injection_starts_as_the_same_model_and_then_reads_the_place(model):
    """Zero-initialised, the injection leaves a loaded model's output as it was; with weights it
    changes the output only where tokens are placed, and the file gains one weight."""
    from dataclasses import replace

    injector = UniFusionDiT(replace(CFG, image_injection=True)).eval()
    assert set(injector.state_dict()) - set(model.state_dict()) == {"image_injection.weight"}
    assert not injector.image_injection.weight.any()
    state = {**model.state_dict(), "image_injection.weight": injector.image_injection.weight}
    injector.load_state_dict(state)
    x, t, ctx = inputs()
    nowhere, somewhere = placements()
    with torch.no_grad():
        plain = model(x, t, ctx)
        torch.testing.assert_close(injector(x, t, ctx, None, somewhere), plain)  # zero weights: as before
        injector.image_injection.weight.normal_()
        torch.testing.assert_close(injector(x, t, ctx, None, nowhere), plain)  # nothing placed: as before
        torch.testing.assert_close(injector(x, t, ctx), plain)
        assert not torch.allclose(injector(x, t, ctx, None, somewhere), plain, atol=1e-4)
