"""The image-token read-out: it reads scenes from tokens that carry them, not from tokens that do not."""

from __future__ import annotations

import pytest
import torch

from unifusion.demo.image_probe import LOOKS, cell_classes, image_token_readout, main, readout_scores
from unifusion.demo.vlm_training import demo_vocab
from unifusion.demo.world import Scene, Shape
from unifusion.vlm.loader import load_vlm
from unifusion.vlm.tiny import build_tiny_vlm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("probe_vlm"), "internvl", seed=0, vocab=demo_vocab(),
                          num_layers=2, hidden_size=32, image_size=64)


def test_cells_are_classed_row_by_row():
    scene = Scene((Shape("red", "circle", "small", 0, 2), Shape("white", "diamond", "large", 2, 0)))
    classes = cell_classes(scene)
    assert classes[2] == 1 + LOOKS.index(("red", "circle", "small"))
    assert classes[6] == 1 + LOOKS.index(("white", "diamond", "large"))
    assert classes.count(0) == 7


def test_scores_count_an_empty_guess_on_a_shape_as_wrong():
    truth = torch.tensor([[0, 5, 0], [3, 0, 0]])
    assert readout_scores(truth, truth) == {"occupancy": 1.0, "colour": 1.0, "kind": 1.0, "size": 1.0, "exact": 1.0}
    empty = readout_scores(torch.zeros_like(truth), truth)
    assert empty["occupancy"] == pytest.approx(4 / 6) and empty["colour"] == 0.0 and empty["exact"] == 0.0


def test_reads_scenes_from_informative_tokens_only(folder):
    vlm = load_vlm(folder)
    seen = image_token_readout(vlm, train=300, test=60)
    with torch.no_grad():  # a projector that outputs a constant: the tokens carry nothing
        for p in vlm.model.model.multi_modal_projector.parameters():
            p.zero_()
    blind = image_token_readout(vlm, train=300, test=60)
    assert seen["colour"] > 0.8 and seen["occupancy"] > blind["occupancy"] + 0.1
    assert blind["colour"] < 0.4 and blind["exact"] < seen["exact"]


def test_cli_names_a_missing_vlm(tmp_path, capsys):
    assert main(["--vlm", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err
