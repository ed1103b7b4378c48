"""Steps of the demo decoder finetune in float32 against bf16 autocast.

The demo's decoder stage trains with ``DemoRecipe.decoder_bf16``: `unifusion.vae.finetune_decoder`'s
``bf16`` runs the forward passes under bfloat16 autocast, the last convolution (the one that writes
the pixels) in float32. Rows, each the same decoder finetune of the same seeded demo-sized autoencoder
(16 latent channels, width 64) on the same rendered scenes and draws (batch 16, 32-px crops, the
recipe's loss weights):

- ``float32``: no autocast (the baseline);
- ``bf16 autocast``: the recipe's setting.

Each figure is the median CPU seconds per step over ``--repeats`` calls of ``--steps`` steps after a
warm-up, the methods interleaved; the final loss of each method's last call is printed beside it. Goal:
bf16 / float32 <= 0.5 where the CPU has bfloat16 support (``torch.backends.mkldnn`` reports it);
elsewhere the row is informative.

    python benchmarks/decoder_precision.py [--steps 20] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import interleaved, log_lines, median, setup, table, verdict  # noqa: E402
from unifusion.demo.evaluate import scene_pixels  # noqa: E402
from unifusion.demo.recipe import DemoRecipe  # noqa: E402
from unifusion.demo.world import mixed_scenes  # noqa: E402
from unifusion.vae import TinyAutoencoder, finetune_decoder  # noqa: E402

logger = logging.getLogger("benchmarks.decoder_precision")


def demo_autoencoder(seed: int = 0) -> TinyAutoencoder:
    """The demo's autoencoder shape (`DemoRecipe.vae_latent_channels`, ComfyUI's TAESD width), seeded."""
    torch.manual_seed(seed)
    return TinyAutoencoder(DemoRecipe().vae_latent_channels)


def finetune_steps(model: TinyAutoencoder, images: torch.Tensor, steps: int, bf16: bool,
                   losses: list[float]) -> Callable[[], None]:
    """A closure running ``steps`` decoder-finetune steps of a fresh copy of ``model`` with the recipe's
    settings, the same draws every call; the last step's loss goes to ``losses``."""
    recipe = DemoRecipe()

    def run() -> None:
        record: list[float] = []
        finetune_decoder(copy.deepcopy(model), images, steps, seed=1, batch_size=recipe.vae_batch_size,
                         lr=recipe.decoder_lr, crop=recipe.vae_crop, foreground_weight=recipe.vae_foreground_weight,
                         edge_weight=recipe.vae_edge_weight, bf16=bf16, callback=lambda step, loss: record.append(loss))
        losses.append(record[-1])

    return run


def measure(steps: int, repeats: int, scenes: int = 64) -> dict[str, tuple[float, float]]:
    """Median seconds per step and the last loss of each method."""
    images, model = scene_pixels(mixed_scenes(scenes, 0)), demo_autoencoder()
    losses: dict[str, list[float]] = {"float32": [], "bf16 autocast": []}
    runs = {name: finetune_steps(model, images, steps, name != "float32", losses[name]) for name in losses}
    times = interleaved(runs, repeats)
    return {name: (median(values) / steps, losses[name][-1]) for name, values in times.items()}


def main(argv: Optional[list[str]] = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="finetune steps per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    setup(args.threads)
    results = measure(args.steps, args.repeats)
    base = results["float32"][0]
    supported = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    logger.info("Demo decoder finetune, CPU seconds per step of this process, %d thread(s), median of %d calls of "
                "%d steps; CPU bfloat16 support: %s", torch.get_num_threads(), args.repeats, args.steps, supported)
    rows = [(name, s, loss, s / base, verdict(s / base, 0.5) if name != "float32" and supported else "")
            for name, (s, loss) in results.items()]
    log_lines(table(("method", "s / step", "last loss", "/ float32", "goal <= 0.5"), rows, floatfmt="{:.4f}"))
    return results


if __name__ == "__main__":
    main()
