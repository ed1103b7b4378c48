"""Widget parsing for the nodes: layers, layer gains, prompt checks, the encode summary."""

from __future__ import annotations

import pytest

from node_pack import pack_module

inputs = pack_module("nodes.inputs")
InputError = pack_module("unifusion.errors").InputError


def test_layers_paper_default_is_every_third_from_four():
    assert inputs.parse_layers("", 32) == tuple(range(4, 32, 3))
    assert inputs.parse_layers(" Paper ", 32) == inputs.parse_layers("", 32)
    assert inputs.parse_layers("all", 5) == (0, 1, 2, 3, 4, 5)


def test_layers_list_is_sorted_and_checked():
    assert inputs.parse_layers("10, 4;7", 12) == (4, 7, 10)
    with pytest.raises(InputError, match=r"outside 0\.\.12"):
        inputs.parse_layers("4, 13", 12)
    with pytest.raises(InputError, match="twice"):
        inputs.parse_layers("4, 4", 12)
    with pytest.raises(InputError, match="not a layer number"):
        inputs.parse_layers("4, x", 12)


def test_layer_positions_accepts_a_superset_and_names_the_fix():
    assert inputs.layer_positions((4, 7), (1, 2, 3, 4, 5, 6, 7, 8)) == [3, 6]
    assert inputs.layer_positions((4, 7), (4, 7)) == [0, 1]
    with pytest.raises(InputError, match=r"Set 'layers' on Load UniFusion VLM to '4, 7'") as err:
        inputs.layer_positions((4, 7), (4, 5), "demo.safetensors")
    assert "demo.safetensors" in str(err.value) and "missing [7]" in str(err.value)


def test_gains_empty_means_untouched():
    assert inputs.parse_gains("", (4, 7, 10)) is None
    assert inputs.parse_gains("   ", (4, 7, 10)) is None


def test_gains_full_list_and_pairs():
    assert inputs.parse_gains("1, 0.5 2", (4, 7, 10)) == [1.0, 0.5, 2.0]
    assert inputs.parse_gains("7=0.5, 10:0", (4, 7, 10)) == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("text, match", [
    ("1, 1", "2 values given but the checkpoint pools 3"),
    ("1, -1, 1", ">= 0"),
    ("1, nan, 1", "finite"),
    ("1, x, 1", "not a number"),
    ("0, 0, 0", "drops every layer"),
    ("5=2", "layer 5 is not pooled"),
    ("7=1, 2", "mix of plain values"),
])
def test_gains_errors_name_the_input(text, match):
    with pytest.raises(InputError, match=match) as err:
        inputs.parse_gains(text, (4, 7, 10))
    assert "layer_gains" in str(err.value)


def test_empty_prompt_needs_an_image():
    assert inputs.check_prompt("", 1, "Node") == ""
    assert inputs.check_prompt("a cat", 0, "Node") == "a cat"
    with pytest.raises(InputError, match="Node: the text is empty"):
        inputs.check_prompt("  \n", 0, "Node")
    with pytest.raises(InputError):
        inputs.check_prompt(None, 0, "Node")


def test_encode_summary():
    assert inputs.encode_summary(12, 5, [], 0) == "12 tokens, 5 condition; no images"
    line = inputs.encode_summary(300, 280, [6, 2], 270)
    assert line == "300 tokens, 280 condition; 2 images (270 image tokens, tiles <= 6, 2)"
    assert "1 image (" in inputs.encode_summary(30, 20, [1], 18)
