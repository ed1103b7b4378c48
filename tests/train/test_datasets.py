"""Dataset loading and validation: every problem names the file, the row and the fix."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from unifusion.errors import UniFusionError
from unifusion.train.datasets import (
    EditRecord,
    T2IRecord,
    edit_from_samples,
    fit_captions,
    load_dataset,
    load_edit_jsonl,
    load_t2i_folder,
    load_t2i_jsonl,
    open_image,
    t2i_from_samples,
)
from unifusion.train.errors import DatasetError


def _png(path: Path, colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_t2i_jsonl_loads_relative_paths(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "img/a.png", "caption": "  a red square  ", "extra": 1}, ""])
    (record,) = load_t2i_jsonl(data)
    assert isinstance(record, T2IRecord)
    assert record.image == tmp_path / "img" / "a.png" and record.caption == "a red square"
    assert record.origin == f"{data}:1"
    assert open_image(record.image).getpixel((0, 0)) == (200, 10, 10)


def test_t2i_jsonl_reports_every_bad_row(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    data = _jsonl(tmp_path / "d.jsonl", [
        {"image": "ok.png", "caption": "fine"},
        "{not json",
        {"image": "ok.png"},
        {"image": "ok.png", "caption": 3},
        {"image": "ok.png", "caption": "   "},
        {"image": "missing.png", "caption": "x"},
        {"image": "broken.png", "caption": "x"},
        [1, 2],
    ])
    with pytest.raises(DatasetError) as info:
        load_t2i_jsonl(data)
    msg = str(info.value)
    assert isinstance(info.value, UniFusionError)
    assert "7 problem(s)" in msg
    for line, words in ((2, "not valid JSON"), (3, "missing key 'caption'"), (4, "must be a string"),
                        (5, "is empty"), (6, "does not exist"), (7, "unreadable"), (8, "expected a JSON object")):
        assert f"{data}:{line}: " in msg and words in msg, (line, words)


def test_edit_jsonl(tmp_path: Path) -> None:
    _png(tmp_path / "s1.png")
    _png(tmp_path / "s2.png")
    _png(tmp_path / "t.png")
    good = {"sources": ["s1.png", "s2.png"], "instruction": "swap them", "target": "t.png"}
    (record,) = load_edit_jsonl(_jsonl(tmp_path / "e.jsonl", [good]))
    assert isinstance(record, EditRecord) and record.sources == (tmp_path / "s1.png", tmp_path / "s2.png")
    assert load_dataset(tmp_path / "e.jsonl")[0].kind == "edit"
    bad = _jsonl(tmp_path / "bad.jsonl", [
        {"sources": "s1.png", "instruction": "x", "target": "t.png"},
        {"sources": ["s1.png", "nope.png"], "instruction": "x", "target": "t.png"},
        {"sources": ["s1.png"], "instruction": "x"},
    ])
    with pytest.raises(DatasetError) as info:
        load_edit_jsonl(bad)
    msg = str(info.value)
    assert f"{bad}:1: 'sources' must be a non-empty list" in msg
    assert f"{bad}:2 (source 1): image" in msg and "nope.png does not exist" in msg
    assert f"{bad}:3: missing key 'target'" in msg


def test_folder_dataset(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n", encoding="utf-8")
    _png(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"b\.jpg: no caption file b\.txt"):
        load_t2i_folder(tmp_path)
    (tmp_path / "b.txt").write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"b\.txt: the caption is empty"):
        load_t2i_folder(tmp_path)
    (tmp_path / "b.txt").write_text("two circles", encoding="utf-8")
    records = load_dataset(tmp_path)
    assert [r.caption for r in records] == ["a red square", "two circles"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        load_t2i_folder(tmp_path / "empty")


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset not found"):
        load_dataset(tmp_path / "nothing.jsonl")
    odd = _jsonl(tmp_path / "odd.jsonl", [{"prompt": "x"}])
    with pytest.raises(DatasetError, match=r"odd\.jsonl:1: cannot tell the dataset kind"):
        load_dataset(odd)


def test_in_memory_samples() -> None:
    image = Image.new("RGB", (8, 8))
    records = t2i_from_samples([(image, "a cat"), (image.convert("L"), "a dog")], name="world")
    assert [r.origin for r in records] == ["world[0]", "world[1]"]
    assert open_image(records[1].image).mode == "RGB"
    with pytest.raises(DatasetError) as info:
        t2i_from_samples([(image, ""), ("path.png", "x"), (image,)], name="world")
    msg = str(info.value)
    assert "world[0]: 'caption' is empty" in msg and "world[1]: the image must be a PIL image" in msg
    assert "world[2]: expected an (image, caption[, rewrite]) tuple" in msg
    edits = edit_from_samples([(image, "make it red", image), ([image, image], "combine", image)])
    assert len(edits[0].sources) == 1 and len(edits[1].sources) == 2
    with pytest.raises(DatasetError, match=r"samples\[0\]: sources must be one or more PIL images"):
        edit_from_samples([([], "x", image)])


def test_rewrites_are_optional_and_checked(tmp_path: Path) -> None:
    """A row may carry the Verifi answer to force; when it does, it must be text."""
    _png(tmp_path / "a.png")
    rows = [{"image": "a.png", "caption": "a circle", "rewrite": "one shape: a large red circle in the center."},
            {"image": "a.png", "caption": "a square"}]
    with_rewrite, without = load_t2i_jsonl(_jsonl(tmp_path / "t.jsonl", rows))
    assert with_rewrite.rewrite == "one shape: a large red circle in the center." and without.rewrite is None
    edit = {"sources": ["a.png"], "instruction": "make it blue", "target": "a.png", "rewrite": "a blue circle"}
    assert load_edit_jsonl(_jsonl(tmp_path / "e.jsonl", [edit]))[0].rewrite == "a blue circle"
    bad = _jsonl(tmp_path / "bad.jsonl", [{"image": "a.png", "caption": "x", "rewrite": ""},
                                          {"image": "a.png", "caption": "x", "rewrite": 3}])
    with pytest.raises(DatasetError) as info:
        load_t2i_jsonl(bad)
    message = str(info.value)
    assert f"{bad}:1: 'rewrite' is empty" in message and f"{bad}:2: 'rewrite' must be a string" in message
    image = Image.new("RGB", (8, 8))
    (t2i,) = t2i_from_samples([(image, "a cat", "one cat, sitting")])
    (moved,) = edit_from_samples([(image, "move it", image, "the cat on the left")])
    assert (t2i.rewrite, moved.rewrite) == ("one cat, sitting", "the cat on the left")
    with pytest.raises(DatasetError, match=r"samples\[0\]: 'rewrite' is empty"):
        t2i_from_samples([(image, "a cat", " ")])


def test_fit_captions_truncates_at_token_boundary(tiny_vlm, caplog: pytest.LogCaptureFixture) -> None:
    image = Image.new("RGB", (8, 8))
    records = t2i_from_samples([(image, "a red circle"), (image, "a big blue square on the left of a tree")])
    with caplog.at_level(logging.WARNING, logger="unifusion.train.datasets"):
        fitted = fit_captions(records, tiny_vlm.tokenizer, max_tokens=4)
    assert fitted[0] is records[0]
    assert fitted[1].caption == "a big blue square"
    assert "samples[1]: text is 10 tokens, over the limit of 4" in caplog.text
    with pytest.raises(DatasetError, match=r"samples\[1\]: 10 tokens; shorten the text"):
        fit_captions(records, tiny_vlm.tokenizer, max_tokens=4, on_long="error")
