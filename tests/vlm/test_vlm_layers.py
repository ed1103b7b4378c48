"""Layer capture equals output_hidden_states of a reference forward, during encode and generate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unifusion.vlm.layers import LayerCapture, LayerCaptureError, find_decoder_layers, layer_progress


@pytest.fixture(scope="module")
def vlms(tiny_vlms):
    return tiny_vlms


def test_capture_matches_hidden_states(vlms, family):
    vlm = vlms[family]
    selected = (0, 1, 2, 4, 7)  # 0: the input embeddings (image features merged in, for a VLM)
    ids = torch.randint(20, len(vlm.tokenizer), (2, 11))
    mask = torch.ones_like(ids)
    hooks_before = [dict(layer._forward_hooks) for layer in vlm.decoder_layers]
    with LayerCapture(vlm.decoder_layers, selected) as capture:
        out = vlm.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    stacked = capture.stacked()
    assert stacked.shape == (2, 11, len(selected), 64)
    reference = torch.stack([out.hidden_states[k] for k in selected], dim=2)
    torch.testing.assert_close(stacked, reference, atol=1e-5, rtol=0)
    # our hooks are gone after the block (transformers' output recorder may add its own once)
    for before, layer in zip(hooks_before, vlm.decoder_layers):
        assert set(before) <= set(layer._forward_hooks)
        hooks = list(layer._forward_hooks.values()) + list(layer._forward_pre_hooks.values())
        assert not any(hook.__qualname__.startswith("LayerCapture") for hook in hooks)


def test_capture_concatenates_generate_steps(vlms):
    """During generate each forward sees only new tokens; the capture concatenates them and
    matches a fresh forward over the whole sequence (the last token needs its own step)."""
    vlm = vlms["internvl"]
    ids = torch.randint(20, len(vlm.tokenizer), (1, 6))
    with LayerCapture(vlm.decoder_layers, (0, 2, 5)) as capture:
        out = vlm.model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert capture.num_forwards == 4  # prompt + 3 cached steps; the 4th new token is never fed back
    states = capture.stacked()
    full = out[:, :-1]
    assert states.shape[:2] == full.shape
    with torch.no_grad():
        ref = vlm.base_model(input_ids=full, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(states, torch.stack([ref[0], ref[2], ref[5]], dim=2), atol=1e-5, rtol=0)


def test_last_layer_is_before_final_norm(vlms):
    vlm = vlms["qwen2_5_vl"]
    ids = torch.randint(20, len(vlm.tokenizer), (1, 5))
    with LayerCapture(vlm.decoder_layers, (8,)) as capture:
        out = vlm.base_model(input_ids=ids, use_cache=False)
    raw = capture.stacked()[:, :, 0]
    norm = vlm.base_model.language_model.norm
    torch.testing.assert_close(norm(raw), out.last_hidden_state, atol=1e-5, rtol=0)
    assert not torch.allclose(raw, out.last_hidden_state, atol=1e-3)


def test_bad_selection_and_empty(vlms):
    layers = vlms["qwen3_vl"].decoder_layers
    with pytest.raises(LayerCaptureError, match=r"1\.\.8 .*layer 0 = the input embeddings"):
        LayerCapture(layers, (3, 9))
    with pytest.raises(LayerCaptureError, match="do not exist"):
        LayerCapture(layers, (-1,))
    with pytest.raises(LayerCaptureError, match="no layers selected"):
        LayerCapture(layers, ())
    with LayerCapture(layers, (3,)) as capture, pytest.raises(LayerCaptureError, match="nothing captured"):
        capture.stacked()


def test_find_layers_generic_and_missing():
    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 3})()
            self.vision_blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
            self.text = Text()

    model = Odd()
    assert find_decoder_layers(model) is model.text.blocks
    model.config.num_hidden_layers = 5
    with pytest.raises(LayerCaptureError, match="cannot find the language-model decoder layers"):
        find_decoder_layers(model)


def test_progress_reports_each_layer(vlms):
    vlm = vlms["internvl"]
    seen = []
    with layer_progress(vlm.decoder_layers, lambda done, total: seen.append((done, total))):
        vlm.base_model(input_ids=torch.tensor([[20, 21]]), use_cache=False)
    assert seen == [(i, 8) for i in range(1, 9)]

    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), layer_progress(vlm.decoder_layers, stop):
        vlm.base_model(input_ids=torch.tensor([[20, 21]]), use_cache=False)
    for layer in vlm.decoder_layers:
        assert not any("layer_progress" in hook.__qualname__ for hook in layer._forward_hooks.values())
