"""Demo world: rendering, grammar (captions, rewrites, edits, compositions) and samplers."""

import math
import random
import re

import numpy as np
import pytest

from unifusion.demo import grammar as G
from unifusion.demo.world import (
    BACKGROUND,
    COLOURS,
    HELDOUT_PAIRS,
    KINDS,
    PALETTE,
    SIZE_PX,
    Scene,
    SceneError,
    Shape,
    cell_centre,
    random_scene,
    render,
)


def _coverage(image, colour):
    """Fraction of each pixel painted in ``colour`` (linear in RGB between background and colour)."""
    arr = np.asarray(image, dtype=np.float64)
    bg, c = np.array(BACKGROUND, float), np.array(PALETTE[colour], float)
    return np.clip((arr - bg) @ (c - bg) / ((c - bg) @ (c - bg)), 0, 1)


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("kind", KINDS)
def test_render_area_matches_geometry(kind, size):
    side = SIZE_PX[size]
    expected = {"circle": math.pi * side * side / 4, "square": side * side,
                "triangle": side * side / 2, "diamond": side * side / 2}[kind]
    image = render(Scene((Shape("blue", kind, size, 1, 1),)))
    # The 4x supersampled drawing covers whole sub-pixels, so allow a few percent.
    assert _coverage(image, "blue").sum() == pytest.approx(expected, rel=0.06)


def test_render_is_deterministic_and_places_shapes_on_the_grid():
    scene = Scene((Shape("red", "square", "large", 0, 0), Shape("white", "circle", "small", 2, 1)))
    a, b = np.asarray(render(scene)), np.asarray(render(scene))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    x, y = (int(v) for v in cell_centre(0, 0))
    assert tuple(a[y, x]) == PALETTE["red"]
    x, y = (int(v) for v in cell_centre(2, 1))
    assert tuple(a[y, x]) == PALETTE["white"]
    x, y = (int(v) for v in cell_centre(1, 1))
    assert tuple(a[y, x]) == BACKGROUND
    # Corners of a square are painted, those of a circle of the same box are not.
    assert tuple(a[4, 4]) == PALETTE["red"]


def test_scene_validation_and_canonical_order():
    with pytest.raises(SceneError, match="colour"):
        Shape("pink", "circle", "small", 0, 0)
    with pytest.raises(SceneError, match="row"):
        Shape("red", "circle", "small", 3, 0)
    with pytest.raises(SceneError, match="share a grid cell"):
        Scene((Shape("red", "circle", "small", 0, 0), Shape("blue", "square", "large", 0, 0)))
    a = Shape("red", "circle", "small", 2, 2)
    b = Shape("blue", "square", "large", 0, 1)
    assert Scene((a, b)) == Scene([b, a])
    assert Scene((a, b)).shapes == (b, a)


def test_detailed_round_trip_and_wording():
    scene = Scene((Shape("red", "circle", "large", 0, 0), Shape("blue", "square", "small", 1, 1)))
    text = G.detailed(scene)
    assert text == "two shapes: a large red circle in the top left, a small blue square in the center."
    rng = random.Random(0)
    for _ in range(300):
        s = random_scene(rng)
        assert G.parse_detailed(G.detailed(s)) == s
    assert G.parse_detailed("no shapes.") == Scene()


@pytest.mark.parametrize("text", [
    "a large red circle in the top left.",
    "one shape: a large pink circle in the top left.",
    "two shapes: a large red circle in the top left.",
    "one shape: a large red circle in the upper left.",
    "one shape: a large red circle in the top left",
])
def test_parse_detailed_rejects_malformed_text(text):
    with pytest.raises(G.GrammarError):
        G.parse_detailed(text)


def _all_texts():
    for s in G.sample_t2i(300, 1):
        yield s.caption
        yield s.detailed
        yield s.rewrite
    for e in G.sample_edits(300, 2):
        yield e.instruction
        yield e.detailed
    for c in G.sample_compositions(100, 3) + G.sample_compositions(100, 4, refs=3):
        yield c.instruction
        yield c.detailed


def test_every_generated_word_is_in_vocab():
    vocab = set(G.VOCAB)
    used = set()
    for text in _all_texts():
        tokens = G.words(text)
        assert set(tokens) <= vocab, (text, set(tokens) - vocab)
        assert " ".join(tokens).replace(" ,", ",").replace(" .", ".").replace(" :", ":") == text
        used.update(tokens)
    # The vocabulary is small and mostly used (counts above three exist only for read-back scenes).
    assert len(vocab) < 100
    assert len(vocab - used) <= 8, sorted(vocab - used)


def test_samplers_are_seeded_and_prefix_stable():
    a = G.sample_t2i(40, 7)
    assert a == G.sample_t2i(40, 7)
    assert a[:10] == G.sample_t2i(10, 7)
    assert a != G.sample_t2i(40, 8)
    assert G.sample_edits(20, 7) == G.sample_edits(20, 7)
    assert G.sample_compositions(20, 7) == G.sample_compositions(20, 7)


def test_t2i_captions_state_what_mentions_says():
    samples = G.sample_t2i(400, 5)
    count_captions = 0
    for s in samples:
        assert G.parse_detailed(s.detailed) == s.scene
        for shape in s.scene:
            assert shape.colour in s.caption and shape.kind in s.caption
        sizes = {w for ws in G.SIZE_WORDS.values() for w in ws}
        assert ("size" in s.mentions) == bool(sizes & set(G.words(s.caption)))
        if "position" not in s.mentions:
            count_captions += 1
            for shape in s.scene:
                assert not any(name in s.caption for name in G.CELL_NAMES[shape.cell])
    assert 0.1 < count_captions / len(samples) < 0.6
    # Count wording: 'two ...s' appears for scenes with repeated looks.
    assert any(re.match(r"(two|three) \w+ \w+", s.caption) for s in samples)


def _resolve(reference: str, scene: Scene) -> list[Shape]:
    """Shapes a reference like 'the small red circle in the top left' can mean (test-side parser)."""
    m = re.fullmatch(r"the (?:(\w+) )?(\w+) (\w+)(?: (?:in|at|on) the (.+))?", reference)
    assert m, reference
    size_word, colour, kind, cell_name = m.groups()
    out = []
    for s in scene:
        if (s.colour, s.kind) != (colour, kind):
            continue
        if size_word and size_word not in G.SIZE_WORDS[s.size]:
            continue
        if cell_name and cell_name not in G.CELL_NAMES[s.cell]:
            continue
        out.append(s)
    return out


def test_references_pick_out_exactly_one_shape():
    rng = random.Random(3)
    for _ in range(500):
        scene = random_scene(rng)
        for i, shape in enumerate(scene.shapes):
            assert _resolve(G.reference(scene, i, rng), scene) == [shape]


def test_edits_change_exactly_what_the_instruction_says():
    samples = G.sample_edits(500, 11)
    assert {e.op for e in samples} == set(G.EDIT_OPS)
    for e in samples:
        src, tgt = set(e.source.shapes), set(e.target.shapes)
        assert e.detailed == G.detailed(e.target)
        if e.op == "add":
            assert len(tgt - src) == 1 and src < tgt
            (new,) = tgt - src
            assert new.colour in e.instruction and new.kind in e.instruction
        elif e.op == "remove":
            assert len(src - tgt) == 1 and tgt < src
        else:
            (old,), (new,) = src - tgt, tgt - src
            changed = {f for f in ("colour", "kind", "size", "row", "col") if getattr(old, f) != getattr(new, f)}
            expected = {"recolour": [{"colour"}], "resize": [{"size"}],
                        "move": [{"row"}, {"col"}, {"row", "col"}]}[e.op]
            assert changed in expected, (e, changed)
            if e.op == "recolour":
                assert e.instruction.endswith(new.colour)
            if e.op == "move":
                assert any(e.instruction.endswith(n) for n in G.CELL_NAMES[new.cell])
        if e.op != "add":
            (edited,) = src - tgt
            assert _resolve(_edit_reference(e.op, e.instruction), e.source) == [edited], e


_EDIT_PATTERNS = {
    "recolour": r"(?:make|turn|paint|change the color of|change) (the .+?) (?:to )?\w+",
    "move": r"(?:move (the .+) to the [a-z ]+|(?:place|put) (the .+?) (?:in|at|on) the [a-z ]+)",
    "remove": r"(?:remove|delete|erase) (the .+)",
    "resize": r"(?:(?:enlarge|shrink) (the .+)|make (the .+) (?:bigger|larger|smaller))",
}


def _edit_reference(op: str, instruction: str) -> str:
    m = re.fullmatch(_EDIT_PATTERNS[op], instruction)
    assert m, instruction
    return next(g for g in m.groups() if g)


def test_compositions_place_each_reference_where_asked():
    for refs in (2, 3):
        for c in G.sample_compositions(200, 13, refs=refs):
            assert len(c.sources) == refs and all(len(s) == 1 for s in c.sources)
            assert sorted(s.shapes[0].look for s in c.sources) == sorted(t.look for t in c.target)
            for k, src in enumerate(c.sources):
                names = (f"image {k + 1}", f"{G.ORDINALS[k]} image")
                assert any(n in c.instruction for n in names), c.instruction
            assert G.parse_detailed(c.detailed) == c.target
    with pytest.raises(G.GrammarError):
        G.sample_compositions(1, 0, refs=4)


def test_composition_rewrite_lists_the_shapes_in_the_order_the_instruction_names_them():
    """`CompositionSample.rewrite` describes the target, clause by clause: the k-th shape it lists
    is the look of the image the instruction's k-th clause names, at that clause's place."""
    reordered = 0
    for refs in (2, 3):
        for c in G.sample_compositions(200, 21, refs=refs):
            assert G.parse_detailed(c.rewrite) == c.target
            named = [int(m.group(1)) - 1 if m.group(1) else G.ORDINALS.index(m.group(2))
                     for m in re.finditer(r"image (\d)|the (\w+) image", c.instruction)]
            listed = [m.group(0) for m in re.finditer(r"an? \w+ \w+ \w+", c.rewrite)]
            looks = [f"a {s.size} {s.colour} {s.kind}"
                     for s in (c.sources[k].shapes[0] for k in named)]
            assert listed == looks, (c.instruction, c.rewrite)
            reordered += c.rewrite != c.detailed
    assert reordered > 100


def test_splits_keep_heldout_pairs_apart():
    def pairs(scenes):
        return {(s.colour, s.kind) for scene in scenes for s in scene}

    for s in G.sample_t2i(200, 0, split="train"):
        assert not pairs([s.scene]) & HELDOUT_PAIRS
    for s in G.sample_t2i(100, 0, split="heldout"):
        assert pairs([s.scene]) & HELDOUT_PAIRS
    for e in G.sample_edits(200, 0, split="train"):
        assert not pairs([e.source, e.target]) & HELDOUT_PAIRS
    for c in G.sample_compositions(100, 0, split="heldout"):
        assert pairs([*c.sources, c.target]) & HELDOUT_PAIRS
    with pytest.raises(SceneError, match="split"):
        G.sample_t2i(1, 0, split="nope")
    with pytest.raises(G.GrammarError, match="unknown edit ops"):
        G.sample_edits(1, 0, ops=("rotate",))


def test_mixed_scenes_are_seeded_and_every_fourth_repeats_one_look():
    from unifusion.demo.world import mixed_scenes

    scenes = mixed_scenes(40, seed=5)
    assert scenes == mixed_scenes(40, seed=5) and scenes != mixed_scenes(40, seed=6)
    assert all(len({s.look for s in scene}) == 1 for scene in scenes[::4])
    assert any(len({s.look for s in scene}) > 1 for k, scene in enumerate(scenes) if k % 4)


def test_rewrite_lists_the_shapes_in_the_order_the_caption_names_them():
    """`T2ISample.rewrite` describes the same scene as `detailed`, in the caption's order."""
    colour_kind = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(KINDS) + r")s?\b")
    reordered = 0
    for s in G.sample_t2i(300, 3):
        assert G.parse_detailed(s.rewrite) == G.parse_detailed(s.detailed) == s.scene
        if "position" in s.mentions:
            named = [m.groups() for m in colour_kind.finditer(s.caption)]
            listed = [m.groups() for m in colour_kind.finditer(s.rewrite)]
            assert listed == named, (s.caption, s.rewrite)
            reordered += s.rewrite != s.detailed
    assert reordered > 30
