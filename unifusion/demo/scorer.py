"""Read shapes back out of a demo-world image and score it against the intended scene.

Pixels are labelled with the nearest palette colour (or background), connected regions of
one colour become candidate shapes, and each region's kind is the ideal outline (circle,
square, triangle, diamond) drawn in its bounding box that overlaps it best. Size comes
from the box side, the grid cell from the box centre. This turns the demo world into a
benchmark: per-attribute accuracy for text-to-image, exact match and identity
preservation for edits, exact match for multi-reference compositions.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from .world import BACKGROUND, COLOURS, GRID, IMAGE_SIZE, KINDS, PALETTE, SIZE_PX, Scene, Shape

ATTRIBUTES = ("colour", "kind", "size", "position")
# Pixels farther than this (RGB distance) from every palette colour are left unlabelled.
COLOUR_TOLERANCE = 80.0
# Smallest region taken for a shape: a small triangle covers ~40 px, blur fringes a few.
MIN_AREA = 14
_SIZE_SPLIT = (SIZE_PX["small"] + SIZE_PX["large"]) / 2
_PALETTE = np.array([PALETTE[c] for c in COLOURS] + [BACKGROUND], dtype=np.float32)  # (C+1, 3)


@dataclass(frozen=True)
class Detection:
    """One region read from an image; ``match`` is the IoU with the chosen ideal outline."""

    shape: Shape
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    match: float


def to_array(image: Any) -> np.ndarray:
    """(64, 64, 3) float32 in 0..255 from a PIL image, a uint8/float array (H, W, 3) or a
    torch tensor (3, H, W) / (H, W, 3) with values in [0, 1]."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    else:
        if hasattr(image, "detach"):
            image = image.detach().float().cpu().numpy()
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
            arr = arr.transpose(1, 2, 0)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {arr.shape}")
        arr = arr.astype(np.float32) * (255.0 if arr.dtype.kind == "f" else 1.0)
    if arr.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        pil = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
        arr = np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float32)
    return arr


def label_pixels(arr: np.ndarray) -> np.ndarray:
    """(H, W) palette index per pixel; background and unclear pixels get -1."""
    dist = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, C+1)
    labels = dist.argmin(-1)
    labels[(labels == len(COLOURS)) | (dist.min(-1) > COLOUR_TOLERANCE)] = -1
    return labels


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected regions of a boolean mask, each as an (N, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}  # area / box area
_SUB = 4  # sub-samples per pixel side when drawing ideal outlines
# Blur levels (pixels) at which ideal outlines are compared with what an image shows.
BLUR_SIGMAS = (0.0, 0.5, 0.8, 1.1, 1.4)
_MARGIN = 3  # pixels of antialiased or blurred edge taken around a labelled region


def coverage(arr: np.ndarray, colour: str) -> np.ndarray:
    """(H, W) fraction of each pixel covered by ``colour`` over the background, in [0, 1]:
    the pixel's projection on the background-to-colour line (antialiased edges give ~0.5)."""
    bg = np.array(BACKGROUND, dtype=np.float32)
    axis = np.array(PALETTE[colour], dtype=np.float32) - bg
    return np.clip((arr - bg) @ axis / float(axis @ axis), 0.0, 1.0)


def outline_coverage(kind: str, cx: float, cy: float, side: float, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) area fraction of each pixel inside the ideal ``kind`` in a ``side`` box at (cx, cy)."""
    h, w = shape
    ys = (np.arange(h * _SUB, dtype=np.float32) + 0.5) / _SUB
    xs = (np.arange(w * _SUB, dtype=np.float32) + 0.5) / _SUB
    u = (xs[None, :] - cx) / (side / 2)  # -1..1 across the box
    v = (ys[:, None] - cy) / (side / 2)
    if kind == "circle":
        inside = u * u + v * v <= 1.0
    elif kind == "square":
        inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    elif kind == "triangle":
        inside = (np.abs(u) <= (v + 1) / 2) & (v <= 1.0)
    elif kind == "diamond":
        inside = np.abs(u) + np.abs(v) <= 1.0
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {list(KINDS)}")
    return inside.reshape(h, _SUB, w, _SUB).mean(axis=(1, 3))


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur along one axis with zero padding (mass may leave the window)."""
    d = np.arange(n, dtype=np.float32)
    full = np.exp(-0.5 * (np.arange(-n, n + 1, dtype=np.float32) / sigma) ** 2).sum()
    return np.exp(-0.5 * ((d[:, None] - d[None, :]) / sigma) ** 2) / full


def classify(alpha: np.ndarray) -> tuple[str, float, float, float, float]:
    """(kind, soft IoU with the ideal outline, box side, centre x, centre y) of one shape's
    coverage map. Each kind's box is fitted from the coverage's area and centroid; the ideal
    is also compared after blurring, since decoded images are soft at the edges."""
    area = float(alpha.sum())
    h, w = alpha.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mx, my = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    best = ("circle", -1.0, 0.0, mx, my)
    for kind in KINDS:
        side = (area / _FILL[kind]) ** 0.5
        cy = my - side / 6 if kind == "triangle" else my  # a triangle's centroid sits 1/6 below its box centre
        ideal = outline_coverage(kind, mx, cy, side, alpha.shape)
        for sigma in BLUR_SIGMAS:
            soft = ideal if sigma == 0 else _blur_matrix(h, sigma) @ ideal @ _blur_matrix(w, sigma).T
            iou = float(np.minimum(alpha, soft).sum() / np.maximum(alpha, soft).sum())
            if iou > best[1]:
                best = (kind, iou, side, mx, cy)
    return best


def _grow(region: np.ndarray, labels: np.ndarray, index: int) -> np.ndarray:
    """Mask of the region grown by _MARGIN pixels into unlabelled (edge/background) pixels,
    so soft edges count at their coverage while other shapes stay out."""
    mask = np.zeros(labels.shape, dtype=bool)
    mask[region[:, 0], region[:, 1]] = True
    free = (labels == -1) | (labels == index)
    for _ in range(_MARGIN):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown & free
    return mask


def read_shapes(image: Any) -> list[Detection]:
    """Every region of one palette colour with at least MIN_AREA pixels, largest first."""
    arr = to_array(image)
    labels = label_pixels(arr)
    step = IMAGE_SIZE / GRID
    found = []
    for index, colour in enumerate(COLOURS):
        alpha_full = coverage(arr, colour)
        for region in components(labels == index):
            if len(region) < MIN_AREA:
                continue
            y0, x0 = np.maximum(region.min(0) - _MARGIN, 0)
            y1, x1 = np.minimum(region.max(0) + _MARGIN + 1, IMAGE_SIZE)
            alpha = (alpha_full * _grow(region, labels, index))[y0:y1, x0:x1]
            kind, match, side, cx, cy = classify(alpha)
            size = "small" if side < _SIZE_SPLIT else "large"
            col = min(GRID - 1, max(0, int((cx + x0) / step)))
            row = min(GRID - 1, max(0, int((cy + y0) / step)))
            bbox = (int(region[:, 1].min()), int(region[:, 0].min()), int(region[:, 1].max()), int(region[:, 0].max()))
            found.append(Detection(Shape(colour, kind, size, row, col), len(region), bbox, match))
    return sorted(found, key=lambda d: -d.area)


def read_scene(image: Any) -> Scene:
    """The scene an image shows: the largest region in each grid cell."""
    by_cell: dict[tuple[int, int], Shape] = {}
    for det in read_shapes(image):
        by_cell.setdefault(det.shape.cell, det.shape)
    return Scene(tuple(by_cell.values()))


def as_scene(output: Any) -> Scene:
    """A Scene as it is, anything else read as an image."""
    return output if isinstance(output, Scene) else read_scene(output)


def _agree(a: Shape, b: Shape | None, attributes: Iterable[str]) -> list[bool]:
    if b is None:
        return [False for _ in attributes]
    return [a.cell == b.cell if attr == "position" else getattr(a, attr) == getattr(b, attr) for attr in attributes]


def match_shapes(intended: Sequence[Shape], found: Sequence[Shape],
                 attributes: Sequence[str] = ATTRIBUTES) -> list[Shape | None]:
    """For each intended shape its partner among ``found`` (or None), chosen one-to-one to
    maximise the number of agreeing attributes."""
    pool: list[Shape | None] = list(found) + [None] * len(intended)
    best, best_score = [None] * len(intended), -1
    for perm in itertools.permutations(range(len(pool)), len(intended)):
        score = sum(sum(_agree(s, pool[j], attributes)) for s, j in zip(intended, perm))
        if score > best_score:
            best, best_score = [pool[j] for j in perm], score
    return best


def score_scene(intended: Scene, output: Any,
                attributes: Sequence[str] = ATTRIBUTES + ("count",)) -> dict[str, float]:
    """Per-attribute accuracy over the intended shapes (only ``attributes``, e.g. a prompt's
    mentions), ``count`` (1 if the number of shapes is right) and ``exact`` (all of them)."""
    unknown = sorted(set(attributes) - set(ATTRIBUTES) - {"count"})
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; choose from {list(ATTRIBUTES) + ['count']}")
    found = as_scene(output)
    shape_attrs = [a for a in ATTRIBUTES if a in attributes]
    partners = match_shapes(intended.shapes, found.shapes, shape_attrs)
    scores: dict[str, float] = {}
    n = max(1, len(intended))
    for k, attr in enumerate(shape_attrs):
        scores[attr] = sum(_agree(s, p, shape_attrs)[k] for s, p in zip(intended, partners)) / n
    if "count" in attributes:
        scores["count"] = float(len(found) == len(intended))
    scores["exact"] = float(all(v == 1.0 for v in scores.values()))
    return scores


def edit_success(target: Scene, output: Any) -> bool:
    """The output shows exactly the target scene."""
    return as_scene(output) == target


def identity_preserved(source: Scene, target: Scene, output: Any) -> float:
    """Fraction of the shapes the edit should leave alone that are still there, unchanged
    (1.0 when the edit touches every shape)."""
    untouched = set(source.shapes) & set(target.shapes)
    if not untouched:
        return 1.0
    kept = set(as_scene(output).shapes)
    return len(untouched & kept) / len(untouched)


def composition_success(target: Scene, output: Any) -> bool:
    """Every reference's shape is at its place with its look, and nothing else is drawn."""
    return as_scene(output) == target


SCORE_COLUMNS = ("colour", "kind", "size", "position", "count", "exact")


def score_table(label: str, rows: dict[str, dict[str, float]],
                extra: dict[str, Callable[[dict[str, float]], str]] | None = None) -> str:
    """A markdown table of score rows: ``label`` heads the row names, then one percentage column
    per `SCORE_COLUMNS` entry, then ``extra`` columns (header -> cell of a row)."""
    extra = extra or {}
    headers = (label,) + SCORE_COLUMNS + tuple(extra)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, row in rows.items():
        cells = [f"{100 * row.get(c, 0.0):.0f}%" for c in SCORE_COLUMNS] + [cell(row) for cell in extra.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_scores(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Average each key over the rows that have it."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            sums.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in sums.items()}
