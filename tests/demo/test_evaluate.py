"""The autoencoder's read-back ceiling (`evaluate_vae`)."""

import torch
import torch.nn.functional as F

from unifusion.demo.evaluate import evaluate_vae
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
