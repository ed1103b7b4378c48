"""Score a trained demo model through the real pipeline, and draw a grid of its outputs.

Every number comes from `UniFusionPipeline.generate` (VLM encode or Verifi rewrite, LAP,
Euler sampling with CFG, VAE decode) read back by the scorer: text-to-image attribute
accuracy over the attributes each prompt states, single-reference edits (exact target
and identity preservation) and zero-shot two-reference compositions.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .grammar import EDIT_OPS, sample_compositions, sample_edits, sample_t2i
from .scorer import composition_success, edit_success, identity_preserved, mean_scores, score_scene
from .world import IMAGE_SIZE, SPLIT_SEEDS, Scene, Shape, random_scene, render

logger = logging.getLogger(__name__)


def evaluate_t2i(pipe: Any, count: int, verifi: bool, seed: int = SPLIT_SEEDS["test"], split: str = "all",
                 steps: int = 20, cfg_scale: float = 4.0) -> dict[str, float]:
    """Mean per-attribute accuracy (only attributes the prompt states), count and exact match."""
    rows = []
    for i, sample in enumerate(sample_t2i(count, seed, split)):
        images, _ = pipe.generate(sample.caption, steps=steps, cfg_scale=cfg_scale, seed=i, verifi=verifi)
        rows.append(score_scene(sample.scene, images[0], sample.mentions))
    return mean_scores(rows)


def evaluate_edits(pipe: Any, count: int, seed: int = SPLIT_SEEDS["test"], steps: int = 20,
                   cfg_scale: float = 4.0, verifi: bool = False) -> dict[str, float]:
    """Single-reference edits: exact target scene, identity of the shapes left alone, and the
    success of each edit op drawn (keyed by op: which kinds of edit the model misses)."""
    success, identity, by_op = [], [], {}
    for i, sample in enumerate(sample_edits(count, seed + 1)):
        images, _ = pipe.generate(sample.instruction, images=[render(sample.source)], steps=steps,
                                  cfg_scale=cfg_scale, seed=i, verifi=verifi)
        success.append(float(edit_success(sample.target, images[0])))
        identity.append(identity_preserved(sample.source, sample.target, images[0]))
        by_op.setdefault(sample.op, []).append(success[-1])
    return {"success": float(np.mean(success)), "identity": float(np.mean(identity)),
            **{op: float(np.mean(by_op[op])) for op in EDIT_OPS if op in by_op}}


def evaluate_compositions(pipe: Any, count: int, seed: int = SPLIT_SEEDS["test"], refs: int = 2, steps: int = 20,
                          cfg_scale: float = 4.0, verifi: bool = False,
                          drop_references: bool = False) -> dict[str, float]:
    """Zero-shot multi-reference composition (the DiT only saw single-reference edits);
    ``drop_references`` gives the instruction alone, the baseline the references must beat."""
    success = []
    for i, sample in enumerate(sample_compositions(count, seed + 2, refs=refs)):
        references = [] if drop_references else [render(s) for s in sample.sources]
        images, _ = pipe.generate(sample.instruction, images=references, steps=steps,
                                  cfg_scale=cfg_scale, seed=i, verifi=verifi)
        success.append(float(composition_success(sample.target, images[0])))
    return {"success": float(np.mean(success))}


def scene_pixels(scenes: Sequence[Scene]) -> torch.Tensor:
    """Rendered scenes as the autoencoder takes them: (N, 3, H, W) float32 in [0, 1]."""
    arrays = np.stack([np.asarray(render(s), dtype=np.float32) / 255.0 for s in scenes])  # (N, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def evaluate_vae(vae: Any, count: int, seed: int = SPLIT_SEEDS["test"]) -> dict[str, float]:
    """How well the scorer reads held-out scenes back from the autoencoder's reconstructions:
    per-attribute accuracy (the ceiling of every generated image's scores), exact scenes and PSNR."""
    import random

    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    pixels = scene_pixels(scenes)  # (N, 3, 64, 64)
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(pixels[i:i + 32])) for i in range(0, count, 32)])
    scores = mean_scores(score_scene(s, r) for r, s in zip(recon, scenes))
    mse = float((recon - pixels).pow(2).mean())
    return {**scores, "psnr": float(10 * np.log10(1.0 / max(mse, 1e-12)))}


def _label(image: Image.Image, text: str, width: int) -> Image.Image:
    """The image with its prompt written underneath (wrapped to the cell width)."""
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width // 6:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    height = round(image.height * width / image.width)
    canvas = Image.new("RGB", (width, height + 11 * len(lines) + 4), (255, 255, 255))
    canvas.paste(image.resize((width, height), Image.Resampling.NEAREST), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, text_line in enumerate(lines):
        draw.text((3, height + 2 + 11 * k), text_line, fill=(0, 0, 0))
    return canvas


def demo_grid(pipe: Any, prompts: Sequence[str], edits: Sequence[tuple[Any, str]] = (), cell: int = 128,
              columns: int = 4, seed: int = 0, steps: int = 20) -> Image.Image:
    """Generated images for ``prompts`` and (source, instruction) ``edits``, each labelled;
    edits show the source next to the result."""
    tiles = []
    for i, prompt in enumerate(prompts):
        images, _ = pipe.generate(prompt, steps=steps, seed=seed + i)
        tiles.append(_label(images[0], prompt, cell))
    for i, (source, instruction) in enumerate(edits):
        images, _ = pipe.generate(instruction, images=[source], steps=steps, seed=seed + i)
        pair = Image.new("RGB", (2 * IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
        pair.paste(source, (0, 0))
        pair.paste(images[0], (IMAGE_SIZE, 0))
        tiles.append(_label(pair, f"edit: {instruction}", cell))
    height = max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (cell + 6) + 6, rows * (height + 6) + 6), (255, 255, 255))
    for k, tile in enumerate(tiles):
        grid.paste(tile, (6 + (k % columns) * (cell + 6), 6 + (k // columns) * (height + 6)))
    return grid


GRID_PROMPTS = (
    "a large red circle in the center",
    "two blue squares",
    "a small yellow triangle in the top left and a large green diamond in the bottom right",
    "three white squares",
    "a purple diamond on the left, a red triangle at the top and a blue circle in the bottom right",
    "a big green circle at the bottom",
    "an image of a little blue diamond in the upper right",
    "a yellow square and a purple circle",
)
_SOURCE = Scene((Shape("red", "circle", "large", 0, 0), Shape("green", "square", "small", 1, 1),
                 Shape("yellow", "triangle", "large", 2, 2)))
GRID_EDITS = (
    (_SOURCE, "make the red circle blue"),
    (_SOURCE, "move the green square to the top right"),
    (_SOURCE, "remove the yellow triangle"),
    (Scene((Shape("white", "diamond", "large", 1, 0),)), "add a small purple circle in the center"),
)


def default_grid(pipe: Any, steps: int = 20) -> Image.Image:
    """The README grid: eight prompts and four edits of the demo world."""
    return demo_grid(pipe, GRID_PROMPTS, [(render(scene), text) for scene, text in GRID_EDITS], steps=steps)
