"""Text for the demo world: captions, detailed rewrites, edit and composition instructions.

Captions vary in wording and may leave out sizes or positions, like real prompts. The
*detailed rewrite* is one canonical sentence naming every attribute of every shape: it is
what the demo VLM learns to produce in a Verifi pass, and `parse_detailed` reads it back.
All words come from `VOCAB`, so a word-level tokenizer built from it covers every text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from .world import (
    COLOURS,
    KINDS,
    MAX_SHAPES,
    Scene,
    Shape,
    random_count_scene,
    random_scene,
    random_shape,
    split_filter,
)

NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
# Names of each grid cell; the first is canonical (used by the detailed rewrite).
CELL_NAMES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("top left", "upper left", "top left corner"),
    (0, 1): ("top center", "top", "top middle"),
    (0, 2): ("top right", "upper right", "top right corner"),
    (1, 0): ("middle left", "left"),
    (1, 1): ("center", "middle"),
    (1, 2): ("middle right", "right"),
    (2, 0): ("bottom left", "lower left", "bottom left corner"),
    (2, 1): ("bottom center", "bottom", "bottom middle"),
    (2, 2): ("bottom right", "lower right", "bottom right corner"),
}
_PREPOSITION = {"top": "at", "bottom": "at", "left": "on", "right": "on"}
ORDINALS = ("first", "second", "third")
_EXTRA_WORDS = (
    "a an the and of in at on to from image picture shape shapes : , . "
    "make turn change paint color move place put add draw remove delete erase "
    "bigger larger smaller enlarge shrink 1 2 3"
)


class GrammarError(ValueError):
    """Text that does not follow the demo grammar (the message quotes it)."""


def _all_words() -> tuple[str, ...]:
    words: set[str] = set(_EXTRA_WORDS.split())
    words.update(COLOURS, KINDS, (k + "s" for k in KINDS), NUMBERS, ORDINALS)
    for names in (*SIZE_WORDS.values(), *CELL_NAMES.values()):
        for name in names:
            words.update(name.split())
    words.update(_PREPOSITION.values())
    return tuple(sorted(words))


VOCAB: tuple[str, ...] = _all_words()


def words(text: str) -> list[str]:
    """Split text into VOCAB tokens: lower-case words, digits and , . : as separate tokens."""
    return re.findall(r"[a-z0-9]+|[,.:]", text.lower())


def position_phrase(cell: tuple[int, int], name: str | None = None) -> str:
    """'in the top left', 'at the top', 'on the left' ... (canonical name unless given)."""
    name = name or CELL_NAMES[cell][0]
    return f"{_PREPOSITION.get(name, 'in')} the {name}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_phrase(shape: Shape, rng: random.Random | None = None, size: bool = True, position: bool = True) -> str:
    """'a large red circle in the top left'; canonical wording when ``rng`` is None."""
    pick = (lambda options: options[0]) if rng is None else rng.choice
    parts = [pick(SIZE_WORDS[shape.size])] if size else []
    parts += [shape.colour, shape.kind]
    text = f"{_article(parts[0])} {' '.join(parts)}"
    if position:
        text += " " + position_phrase(shape.cell, pick(CELL_NAMES[shape.cell]))
    return text


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def detailed(scene: Scene) -> str:
    """Canonical full description, shapes in row-major order:
    'two shapes: a large red circle in the top left, a small blue square in the center.'"""
    return listing(scene.shapes)


def listing(shapes: Sequence[Shape]) -> str:
    """The detailed description's wording with the shapes in the order given (`parse_detailed`
    reads any order back into the same scene)."""
    n = len(shapes)
    if n == 0:
        return "no shapes."
    head = f"{NUMBERS[n]} {'shape' if n == 1 else 'shapes'}"
    return head + ": " + ", ".join(shape_phrase(s) for s in shapes) + "."


_SHAPE_RE = re.compile(
    r"an? (?P<size>\w+) (?P<colour>\w+) (?P<kind>\w+) in the (?P<cell>[a-z ]+)"
)
_CANONICAL_CELL = {names[0]: cell for cell, names in CELL_NAMES.items()}


def parse_detailed(text: str) -> Scene:
    """Inverse of `detailed`: read the canonical rewrite back into a Scene."""
    text = " ".join(text.strip().lower().split())
    if text == "no shapes.":
        return Scene()
    head, sep, body = text.partition(": ")
    if not sep or not body.endswith("."):
        raise GrammarError(f"{text!r} is not a detailed rewrite ('<count> shapes: <shape>, <shape>.')")
    shapes = []
    for part in body[:-1].split(", "):
        m = _SHAPE_RE.fullmatch(part)
        if not m or m["cell"] not in _CANONICAL_CELL:
            raise GrammarError(f"cannot read shape {part!r} in {text!r}")
        row, col = _CANONICAL_CELL[m["cell"]]
        try:
            shapes.append(Shape(m["colour"], m["kind"], m["size"], row, col))
        except ValueError as exc:
            raise GrammarError(f"{part!r} in {text!r}: {exc}") from exc
    expected = f"{NUMBERS[len(shapes)]} {'shape' if len(shapes) == 1 else 'shapes'}"
    if head != expected:
        raise GrammarError(f"{text!r} announces {head!r} but lists {len(shapes)} shapes")
    return Scene(tuple(shapes))


def is_count_scene(scene: Scene) -> bool:
    """All shapes look alike, so 'two blue squares' describes the scene."""
    return len(scene) > 0 and len({s.look for s in scene}) == 1


def count_caption(scene: Scene, rng: random.Random, size: bool = True) -> str:
    """'two blue squares', 'three big green triangles' (positions left open)."""
    if not is_count_scene(scene):
        raise GrammarError(f"count captions need shapes that all look alike; got {scene}")
    first = scene.shapes[0]
    n = len(scene)
    parts = [rng.choice(SIZE_WORDS[first.size])] if size else []
    parts += [first.colour, first.kind + ("s" if n > 1 else "")]
    return f"{NUMBERS[n] if n > 1 or rng.random() < 0.5 else _article(parts[0])} {' '.join(parts)}"


def _plural_phrase(shape: Shape, n: int, rng: random.Random, size: bool) -> str:
    """'two big red circles' (or 'a red circle' for n == 1)."""
    if n == 1:
        return shape_phrase(shape, rng, size=size, position=False)
    parts = ([rng.choice(SIZE_WORDS[shape.size])] if size else []) + [shape.colour, shape.kind + "s"]
    return f"{NUMBERS[n]} {' '.join(parts)}"


def caption(scene: Scene, rng: random.Random, size: bool = True, position: bool = True) -> str:
    """A paraphrased prompt listing the shapes in random order, optionally without sizes or
    positions; without positions, alike shapes are counted ('two red circles')."""
    return named_caption(scene, rng, size, position)[0]


def named_caption(scene: Scene, rng: random.Random, size: bool = True, position: bool = True,
                  ) -> tuple[str, tuple[Shape, ...]]:
    """`caption`, and the scene's shapes in the order it names them (each counted group in
    row-major order): the order a rewrite can copy them in."""
    shapes = list(scene)
    rng.shuffle(shapes)
    if position:
        phrases = [shape_phrase(s, rng, size=size) for s in shapes]
        named = tuple(shapes)
    else:
        groups: dict[tuple[str, ...], list[Shape]] = {}
        for s in shapes:
            groups.setdefault((s.colour, s.kind) + ((s.size,) if size else ()), []).append(s)
        phrases = [_plural_phrase(g[0], len(g), rng, size) for g in groups.values()]
        named = tuple(s for g in groups.values() for s in sorted(g, key=lambda s: s.cell))
    text = _join(phrases)
    prefix = rng.choice(("", "", "an image of ", "a picture of "))
    return prefix + text, named


def reference(scene: Scene, index: int, rng: random.Random | None = None) -> str:
    """The shortest unambiguous name of a shape in its scene: 'the red circle',
    'the small red circle' or 'the red circle in the top left'."""
    shape = scene.shapes[index]
    same = [s for s in scene if (s.colour, s.kind) == (shape.colour, shape.kind)]
    if len(same) == 1:
        return f"the {shape.colour} {shape.kind}"
    if sum(s.size == shape.size for s in same) == 1:
        words_ = SIZE_WORDS[shape.size]
        return f"the {words_[0] if rng is None else rng.choice(words_)} {shape.colour} {shape.kind}"
    name = CELL_NAMES[shape.cell][0] if rng is None else rng.choice(CELL_NAMES[shape.cell])
    return f"the {shape.colour} {shape.kind} {position_phrase(shape.cell, name)}"


def recolour_instruction(ref: str, colour: str, rng: random.Random) -> str:
    template = rng.choice(("make {r} {c}", "turn {r} {c}", "change {r} to {c}", "paint {r} {c}",
                           "change the color of {r} to {c}"))
    return template.format(r=ref, c=colour)


def move_instruction(ref: str, cell: tuple[int, int], rng: random.Random) -> str:
    name = rng.choice(CELL_NAMES[cell])
    # 'place the red circle in the center in the top left' would be unclear: use 'to'.
    if rng.random() < 0.5 or " the " in ref[len("the "):]:
        return f"move {ref} to the {name}"
    return f"{rng.choice(('place', 'put'))} {ref} {position_phrase(cell, name)}"


def add_instruction(shape: Shape, rng: random.Random) -> str:
    return f"{rng.choice(('add', 'draw', 'put'))} {shape_phrase(shape, rng)}"


def remove_instruction(ref: str, rng: random.Random) -> str:
    return f"{rng.choice(('remove', 'delete', 'erase'))} {ref}"


def resize_instruction(ref: str, grow: bool, rng: random.Random) -> str:
    if rng.random() < 0.3:
        return f"{'enlarge' if grow else 'shrink'} {ref}"
    return f"make {ref} {rng.choice(('bigger', 'larger')) if grow else 'smaller'}"


def image_reference(k: int, shape: Shape, rng: random.Random) -> str:
    """How a composition instruction names the shape of reference image ``k`` (0-based)."""
    style = rng.randrange(3)
    if style == 0:
        return f"the shape from image {k + 1}"
    if style == 1:
        return f"the shape from the {ORDINALS[k]} image"
    return f"the {shape.colour} {shape.kind} from image {k + 1}"


def composition_instruction(refs: list[str], cells: list[tuple[int, int]], rng: random.Random
                            ) -> tuple[str, list[int]]:
    """('put the shape from image 1 on the left and the shape from image 2 on the right', the
    references' indices in the order the instruction names them)."""
    clauses = [f"{ref} {position_phrase(cell, rng.choice(CELL_NAMES[cell]))}" for ref, cell in zip(refs, cells)]
    order = list(range(len(clauses)))
    if rng.random() < 0.3:
        rng.shuffle(order)
    return f"{rng.choice(('put', 'place'))} " + _join([clauses[i] for i in order]), order


@dataclass(frozen=True)
class T2ISample:
    """A text-to-image example; ``mentions`` lists the attributes the caption states.
    ``detailed`` lists the scene row-major (what a caption of its image says), ``rewrite`` in the
    order the caption names the shapes (what a rewrite of the caption can copy along)."""

    scene: Scene
    caption: str
    detailed: str
    mentions: tuple[str, ...]
    rewrite: str


@dataclass(frozen=True)
class EditSample:
    """A single-reference edit: ``source`` image + ``instruction`` -> ``target``."""

    source: Scene
    instruction: str
    target: Scene
    op: str
    detailed: str  # detailed rewrite of the target


@dataclass(frozen=True)
class CompositionSample:
    """Several one-shape reference images combined into one target scene. ``detailed`` lists the
    target row-major, ``rewrite`` in the order the instruction names the references (what a
    rewrite can copy along, clause by clause, reading each named image as it goes)."""

    sources: tuple[Scene, ...]
    instruction: str
    target: Scene
    detailed: str
    rewrite: str


EDIT_OPS = ("recolour", "move", "add", "remove", "resize")
_LAYOUTS: dict[int, tuple[tuple[tuple[int, int], ...], ...]] = {
    2: (((1, 0), (1, 2)), ((0, 1), (2, 1)), ((0, 0), (2, 2)), ((0, 2), (2, 0))),
    3: (((1, 0), (1, 1), (1, 2)), ((0, 1), (1, 1), (2, 1)), ((0, 0), (1, 1), (2, 2)), ((0, 2), (1, 1), (2, 0))),
}
_MAX_TRIES = 10_000


def _draw(n: int, seed: int, split: str, make) -> list:
    """Draw ``n`` samples from one seeded stream, rejecting those outside ``split``.
    The first k samples do not depend on ``n``."""
    rng = random.Random(seed)
    keep = split_filter(split)
    out: list = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > _MAX_TRIES + 50 * n:
            raise GrammarError(f"could not draw {n} samples for split {split!r}; the split is too narrow")
        sample, scenes = make(rng)
        if sample is not None and keep(scenes):
            out.append(sample)
    return out


def _t2i(rng: random.Random) -> tuple[T2ISample, list[Scene]]:
    with_size = rng.random() < 0.85
    if rng.random() < 0.3:
        scene = random_count_scene(rng)
        if rng.random() < 0.7:
            text = count_caption(scene, rng, size=with_size)
            mentions = ("colour", "kind", "count") + (("size",) if with_size else ())
            return T2ISample(scene, text, detailed(scene), mentions, detailed(scene)), [scene]
    else:
        scene = random_scene(rng)
    with_position = rng.random() < 0.85
    text, named = named_caption(scene, rng, size=with_size, position=with_position)
    mentions = ("colour", "kind", "count") + (("size",) if with_size else ()) + (("position",) if with_position else ())
    return T2ISample(scene, text, detailed(scene), mentions, listing(named)), [scene]


def sample_t2i(n: int, seed: int, split: str = "all") -> list[T2ISample]:
    """Captioned scenes: ~30% count scenes ('two blue squares'), the rest free lists of shapes."""
    return _draw(n, seed, split, _t2i)


def _edit(rng: random.Random, ops: tuple[str, ...]) -> tuple[EditSample | None, list[Scene]]:
    source = random_scene(rng)
    usable = [op for op in ops if (op != "add" or len(source) < MAX_SHAPES) and (op != "remove" or len(source) > 1)]
    if not usable:
        return None, []
    op = rng.choice(usable)
    i = rng.randrange(len(source))
    shape = source.shapes[i]
    ref = reference(source, i, rng)
    if op == "recolour":
        colour = rng.choice([c for c in COLOURS if c != shape.colour])
        target, text = source.changed(i, colour=colour), recolour_instruction(ref, colour, rng)
    elif op == "move":
        row, col = rng.choice(source.free_cells())
        target, text = source.changed(i, row=row, col=col), move_instruction(ref, (row, col), rng)
    elif op == "add":
        new = random_shape(rng, rng.choice(source.free_cells()))
        target, text = source.with_shape(new), add_instruction(new, rng)
    elif op == "remove":
        target, text = source.without(i), remove_instruction(ref, rng)
    else:
        grow = shape.size == "small"
        target = source.changed(i, size="large" if grow else "small")
        text = resize_instruction(ref, grow, rng)
    return EditSample(source, text, target, op, detailed(target)), [source, target]


def sample_edits(n: int, seed: int, split: str = "all", ops: tuple[str, ...] = EDIT_OPS) -> list[EditSample]:
    """Single-reference edits, the op drawn uniformly from those that apply to the source."""
    unknown = sorted(set(ops) - set(EDIT_OPS))
    if unknown or not ops:
        raise GrammarError(f"unknown edit ops {unknown or list(ops)}; choose from {list(EDIT_OPS)}")
    return _draw(n, seed, split, lambda rng: _edit(rng, tuple(ops)))


def _composition(rng: random.Random, refs: int) -> tuple[CompositionSample, list[Scene]]:
    cells = list(rng.choice(_LAYOUTS[refs]))
    rng.shuffle(cells)
    free = [(r, c) for r in range(3) for c in range(3)]
    sources = tuple(Scene((random_shape(rng, rng.choice(free)),)) for _ in range(refs))
    placed = [Shape(*src.shapes[0].look, *cell) for src, cell in zip(sources, cells)]
    target = Scene(tuple(placed))
    names = [image_reference(k, src.shapes[0], rng) for k, src in enumerate(sources)]
    text, order = composition_instruction(names, cells, rng)
    rewrite = listing([placed[i] for i in order])
    return CompositionSample(sources, text, target, detailed(target), rewrite), [*sources, target]


def sample_compositions(n: int, seed: int, refs: int = 2, split: str = "all") -> list[CompositionSample]:
    """``refs`` one-shape reference images placed side by side, corner to corner or in a line."""
    if refs not in _LAYOUTS:
        raise GrammarError(f"compositions take {sorted(_LAYOUTS)} reference images, got refs={refs}")
    return _draw(n, seed, split, lambda rng: _composition(rng, refs))
