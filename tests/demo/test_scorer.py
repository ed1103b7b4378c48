"""Scorer: reading scenes back from rendered, degraded and wrong images, and the scores."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from unifusion.demo import grammar as G
from unifusion.demo import scorer as S
from unifusion.demo.world import BACKGROUND, Scene, Shape, random_scene, render


def _scenes(n, seed):
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(n)]


def _degrade(image: Image.Image, blur: float, noise: float, seed: int) -> np.ndarray:
    """What a lossy autoencoder does to an image: soft edges plus pixel noise (float in [0, 1])."""
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    arr = arr + np.random.default_rng(seed).normal(0.0, noise, arr.shape)
    return np.clip(arr, 0, 255) / 255.0


def test_clean_renders_read_back_exactly():
    # Measured: 500/500 scenes (1,000 shapes) read back exactly.
    scenes = _scenes(500, 0)
    wrong = [s for s in scenes if S.read_scene(render(s)) != s]
    assert not wrong, wrong[:3]


def test_blurred_noisy_renders_read_back():
    # Blur sigma 1 px + noise sigma 10/255 is softer than a decent autoencoder; measured 100% of
    # shapes here (and ~97.5% at blur 1.3 + noise 12, where small squares/diamonds start to
    # look round).
    scenes = _scenes(200, 1)
    total = correct = 0
    for i, s in enumerate(scenes):
        found = set(S.read_scene(_degrade(render(s), 1.0, 10.0, i)).shapes)
        total += len(s)
        correct += len(found & set(s.shapes))
    assert correct / total >= 0.95


def test_wrong_images_score_low():
    scenes = _scenes(200, 2)
    others = _scenes(200, 3)
    exact = [S.score_scene(s, render(o))["exact"] for s, o in zip(scenes, others) if s != o]
    assert np.mean(exact) < 0.05
    right = [S.score_scene(s, render(s))["exact"] for s in scenes]
    assert np.mean(right) == 1.0
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    assert S.read_scene(blank) == Scene()
    scores = S.score_scene(scenes[0], blank)
    assert scores == {"colour": 0.0, "kind": 0.0, "size": 0.0, "position": 0.0, "count": 0.0, "exact": 0.0}
    noise = np.random.default_rng(0).random((64, 64, 3))
    assert np.mean([S.score_scene(s, noise)["exact"] for s in scenes[:20]]) == 0.0


def test_attribute_scores_by_hand():
    a = Shape("red", "circle", "large", 0, 0)
    b = Shape("blue", "square", "small", 1, 1)
    intended = Scene((a, b))
    # b came out green and in another cell; a is perfect; one extra shape drawn.
    out = Scene((a, Shape("green", "square", "small", 1, 2), Shape("white", "diamond", "large", 2, 2)))
    scores = S.score_scene(intended, out)
    assert scores == {"colour": 0.5, "kind": 1.0, "size": 1.0, "position": 0.5, "count": 0.0, "exact": 0.0}
    # A count prompt ('two blue squares') ignores positions and sizes.
    two = Scene((Shape("blue", "square", "small", 0, 0), Shape("blue", "square", "small", 2, 2)))
    drawn = Scene((Shape("blue", "square", "large", 1, 0), Shape("blue", "square", "small", 0, 2)))
    assert S.score_scene(two, drawn, ("colour", "kind", "count"))["exact"] == 1.0
    assert S.score_scene(two, drawn)["exact"] == 0.0
    with pytest.raises(ValueError, match="unknown attributes"):
        S.score_scene(two, drawn, ("shade",))


def test_matching_is_one_to_one_and_optimal():
    # Greedy matching would pair the first intended shape with the perfect match of the second.
    x = Shape("red", "circle", "large", 0, 0)
    y = Shape("red", "circle", "large", 0, 1)
    found = [Shape("red", "circle", "large", 0, 1), Shape("blue", "square", "small", 0, 0)]
    assert S.match_shapes([x, y], found) == [found[1], found[0]]
    assert S.match_shapes([x, y], [found[0]]) in ([None, found[0]], [found[0], None])


def test_edit_scores():
    edits = G.sample_edits(60, 5)
    for e in edits:
        assert S.edit_success(e.target, render(e.target))
        assert S.identity_preserved(e.source, e.target, render(e.target)) == 1.0
        if e.op != "add":
            assert not S.edit_success(e.target, render(e.source))
    a = Shape("red", "circle", "large", 0, 0)
    b = Shape("blue", "square", "small", 1, 1)
    c = Shape("green", "triangle", "large", 2, 2)
    source, target = Scene((a, b, c)), Scene((a, b, Shape("yellow", "triangle", "large", 2, 2)))
    # The edit applied but b was lost: not a success, half the untouched shapes kept.
    out = Scene((a, Shape("yellow", "triangle", "large", 2, 2)))
    assert not S.edit_success(target, out)
    assert S.identity_preserved(source, target, out) == 0.5
    assert S.identity_preserved(source, target, render(out)) == 0.5
    # An edit that touches the only shape has nothing to preserve.
    assert S.identity_preserved(Scene((a,)), Scene((b,)), Scene()) == 1.0


def test_composition_success():
    for c in G.sample_compositions(40, 6, refs=2):
        assert S.composition_success(c.target, render(c.target))
        swapped = Scene(tuple(
            Shape(*other.look, *shape.cell) for shape, other in zip(c.target, reversed(c.target.shapes))))
        assert S.composition_success(c.target, render(swapped)) == (swapped == c.target)


def test_accepts_pil_arrays_tensors_and_other_sizes():
    scene = Scene((Shape("purple", "triangle", "large", 0, 2), Shape("yellow", "diamond", "small", 2, 0)))
    image = render(scene)
    arr = np.array(image)
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    for x in (image, arr, arr / 255.0, tensor, tensor.permute(1, 2, 0), render(scene, image_size=128)):
        assert S.read_scene(x) == scene
    with pytest.raises(ValueError, match="RGB image"):
        S.read_scene(np.zeros((64, 64)))


def test_mean_scores():
    rows = [{"colour": 1.0, "exact": 1.0}, {"colour": 0.5, "exact": 0.0, "count": 1.0}]
    assert S.mean_scores(rows) == {"colour": 0.75, "exact": 0.5, "count": 1.0}


def test_score_table_rows_and_extra_columns():
    rows = {"a": {"colour": 1.0, "kind": 0.25, "exact": 0.0, "seconds": 12.4}, "b": {"colour": 0.5}}
    table = S.score_table("run", rows, {"seconds": lambda row: f"{row.get('seconds', 0):.0f}"}).splitlines()
    assert table[0] == "| run | colour | kind | size | position | count | exact | seconds |"
    assert table[1] == "|" + "---|" * 8
    assert table[2] == "| a | 100% | 25% | 0% | 0% | 0% | 0% | 12 |" and table[3].startswith("| b | 50% | 0% |")
