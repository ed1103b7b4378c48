"""The demo world: 64x64 images of 1-3 flat coloured shapes on a plain grey background.

A scene is fully described by its shapes' attributes (colour, kind, size, grid cell), so
the same scene always renders to the same pixels and the scorer can read it back. Shapes
sit at the centres of a 3x3 grid, one per cell, sized so neighbours never touch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 3
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
# Well separated in RGB from each other and from the background (smallest distance ~100).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
# Side of the shape's bounding box in pixels of a 64x64 image (a grid cell is 21.3 px).
SIZE_PX: dict[str, float] = {"small": 9.0, "large": 17.0}
MAX_SHAPES = 3
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased, yet bit-exact on every run


class SceneError(ValueError):
    """A shape or scene breaks the demo world's rules; the message names the attribute."""


@dataclass(frozen=True)
class Shape:
    """One shape; ``row`` and ``col`` index the 3x3 grid from the top left (0..2)."""

    colour: str
    kind: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        for name, allowed in (("colour", COLOURS), ("kind", KINDS), ("size", SIZES)):
            if getattr(self, name) not in allowed:
                raise SceneError(f"Shape.{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        for name in ("row", "col"):
            if not 0 <= getattr(self, name) < GRID:
                raise SceneError(f"Shape.{name}={getattr(self, name)!r} must be in 0..{GRID - 1}")

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def look(self) -> tuple[str, str, str]:
        """Everything but the position: what a reference image conveys about the shape."""
        return (self.colour, self.kind, self.size)


@dataclass(frozen=True)
class Scene:
    """Shapes in distinct grid cells, kept sorted row-major so equal scenes compare equal."""

    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        shapes = tuple(sorted(self.shapes, key=lambda s: s.cell))
        cells = [s.cell for s in shapes]
        if len(set(cells)) != len(cells):
            raise SceneError(f"two shapes share a grid cell in {shapes}; each cell holds at most one shape")
        object.__setattr__(self, "shapes", shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self):
        return iter(self.shapes)

    def free_cells(self) -> list[tuple[int, int]]:
        used = {s.cell for s in self.shapes}
        return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]

    def with_shape(self, shape: Shape) -> "Scene":
        return Scene(self.shapes + (shape,))

    def without(self, index: int) -> "Scene":
        return Scene(self.shapes[:index] + self.shapes[index + 1:])

    def changed(self, index: int, **changes: object) -> "Scene":
        """The scene with shape ``index`` given new attribute values (e.g. colour="red")."""
        shapes = list(self.shapes)
        shapes[index] = replace(shapes[index], **changes)
        return Scene(tuple(shapes))


def cell_centre(row: int, col: int, image_size: int = IMAGE_SIZE) -> tuple[float, float]:
    """(x, y) pixel centre of a grid cell."""
    step = image_size / GRID
    return ((col + 0.5) * step, (row + 0.5) * step)


def shape_outline(kind: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """Polygon of a shape in a ``side`` x ``side`` box centred at (cx, cy); circles get their box."""
    h = side / 2
    if kind in ("circle", "square"):
        return [(cx - h, cy - h), (cx + h, cy + h)]
    if kind == "triangle":  # apex up, base at the bottom of the box
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    raise SceneError(f"unknown shape kind {kind!r}; expected one of {list(KINDS)}")


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene as an RGB image (deterministic: same scene, same bytes)."""
    big = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    scale = _SUPERSAMPLE * image_size / IMAGE_SIZE
    for shape in scene:
        cx, cy = cell_centre(shape.row, shape.col, big)
        # Pixel-edge convention: a box from x0 to x1 covers pixels x0 .. x1-1 at 4x.
        points = shape_outline(shape.kind, cx, cy, SIZE_PX[shape.size] * scale)
        colour = PALETTE[shape.colour]
        if shape.kind == "circle":
            (x0, y0), (x1, y1) = points
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
        elif shape.kind == "square":
            (x0, y0), (x1, y1) = points
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
        else:
            draw.polygon(points, fill=colour)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def random_shape(rng: random.Random, cell: tuple[int, int], look: tuple[str, str, str] | None = None) -> Shape:
    colour, kind, size = look or (rng.choice(COLOURS), rng.choice(KINDS), rng.choice(SIZES))
    return Shape(colour, kind, size, cell[0], cell[1])


def random_scene(rng: random.Random, min_shapes: int = 1, max_shapes: int = MAX_SHAPES) -> Scene:
    """Independent random shapes in distinct random cells."""
    n = rng.randint(min_shapes, max_shapes)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    return Scene(tuple(random_shape(rng, cell) for cell in cells))


def random_count_scene(rng: random.Random, count: int | None = None) -> Scene:
    """``count`` (1-3) copies of one look in random cells: the scenes behind "two blue squares"."""
    count = count or rng.randint(1, MAX_SHAPES)
    look = (rng.choice(COLOURS), rng.choice(KINDS), rng.choice(SIZES))
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count)
    return Scene(tuple(random_shape(rng, cell, look) for cell in cells))


def mixed_scenes(count: int, seed: int) -> list[Scene]:
    """``count`` seeded scenes, every 4th a count scene: the autoencoder's training mix, so that
    repeated looks are as common as in the captions."""
    rng = random.Random(seed)
    return [random_count_scene(rng) if i % 4 == 0 else random_scene(rng) for i in range(count)]


# Colour/kind pairs that never appear in the "train" split: the "heldout" split tests
# whether a model composes attributes it has only seen apart.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("yellow", "diamond"), ("white", "circle")}
)
SPLITS = ("all", "train", "heldout")
# Seeds that keep evaluation sets apart from training data drawn with small seeds.
SPLIT_SEEDS: dict[str, int] = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def has_heldout_pair(scenes: Iterable[Scene]) -> bool:
    return any((s.colour, s.kind) in HELDOUT_PAIRS for scene in scenes for s in scene)


def split_filter(split: str) -> Callable[[Iterable[Scene]], bool]:
    """Predicate over all scenes of a sample (sources and target) that keeps it in ``split``."""
    if split == "all":
        return lambda scenes: True
    if split == "train":
        return lambda scenes: not has_heldout_pair(scenes)
    if split == "heldout":
        return has_heldout_pair
    raise SceneError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
