"""The autoencoder's read-back ceiling (`evaluate_vae`) and the edit scores' breakdown by op."""

import torch
import torch.nn.functional as F

from unifusion.demo.evaluate import evaluate_edits, evaluate_vae
from unifusion.demo.grammar import EDIT_OPS, sample_edits
from unifusion.demo.world import SPLIT_SEEDS, render
from unifusion.vae import PixelSpaceVAE


class CoarseVAE:
    """Keeps a 16x16 image: colours and places survive, the outlines of 9-px shapes do not."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 4)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z, scale_factor=4, mode="bilinear", align_corners=False)


def test_a_lossless_autoencoder_reads_back_everything():
    scores = evaluate_vae(PixelSpaceVAE(), 24)
    assert {k: scores[k] for k in ("colour", "kind", "size", "position", "count", "exact")} == {
        "colour": 1.0, "kind": 1.0, "size": 1.0, "position": 1.0, "count": 1.0, "exact": 1.0}
    assert scores["psnr"] > 60


def test_a_coarse_autoencoder_loses_shapes_first():
    scores = evaluate_vae(CoarseVAE(), 24)
    assert scores["kind"] < 0.8 and scores["exact"] < 0.8
    assert scores["colour"] > scores["kind"] and scores["position"] > scores["kind"]
    assert scores["psnr"] < 40


class EditsOnlyPipe:
    """Draws the right target for the ops in ``good`` and returns the source unchanged otherwise."""

    def __init__(self, samples, good):
        self.by_instruction = {s.instruction: s for s in samples}
        self.good = good

    def generate(self, instruction, images, steps, cfg_scale, seed, verifi):
        sample = self.by_instruction[instruction]
        return [render(sample.target if sample.op in self.good else sample.source)], None


def test_edit_scores_say_which_ops_the_model_misses():
    samples = sample_edits(24, SPLIT_SEEDS["test"] + 1)
    scores = evaluate_edits(EditsOnlyPipe(samples, good={"add", "move"}), 24)
    drawn = {s.op for s in samples}
    assert {op for op in EDIT_OPS if op in scores} == drawn
    assert all(scores[op] == (1.0 if op in ("add", "move") else 0.0) for op in drawn)
    assert scores["success"] == sum(s.op in ("add", "move") for s in samples) / 24
