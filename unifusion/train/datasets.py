"""Training data: text-to-image and editing samples, validated when loaded.

Sources:

* a folder of images, each with a same-name ``.txt`` caption (``cat.png`` + ``cat.txt``);
* a JSONL file of ``{"image": path, "caption": str}`` rows (text to image);
* a JSONL file of ``{"sources": [path, ...], "instruction": str, "target": path}`` rows (editing);
* in-memory samples: ``(PIL image, caption)`` or ``(source images, instruction, target image)``,
  so a synthetic world can feed the cache without writing files.

Any row may add ``"rewrite"`` (in memory: a last item): a description of the target image that
the cache forces as the VLM's Verifi answer (`unifusion.vlm.verifi.forced_rewrite`) instead of
letting the VLM write one. A rewrite the VLM writes from a short caption invents the details the
caption leaves out, and those rarely match the image; a dense caption of the image does.

Relative paths in a JSONL file are relative to the file's folder. Every problem found
while loading (bad JSON, missing keys, wrong types, empty text, missing or unreadable
images) is collected and raised as one `DatasetError` that names the file, the row
(1-based line number) and the fix.

Long captions: the dataset cannot know the VLM, so length is checked when the cache is
built (`fit_captions`, called with the VLM's tokenizer). The default policy truncates the
text at a token boundary to the limit and logs a warning naming the row, matching what
`unifusion.vlm.encode` does to an over-long chat at inference; ``on_long="error"`` raises
instead. The truncated text is what gets encoded and stored in the cache index.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

logger = logging.getLogger(__name__)

ImageRef = Union[Path, Image.Image]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class T2IRecord:
    """One text-to-image sample; ``origin`` says where it came from (for messages)."""

    image: ImageRef
    caption: str
    origin: str
    rewrite: str | None = None  # the Verifi answer to force, if the data has one
    kind = "t2i"

    @property
    def text(self) -> str:
        return self.caption

    @property
    def sources(self) -> tuple[ImageRef, ...]:
        return ()

    @property
    def target(self) -> ImageRef:
        return self.image

    def with_text(self, text: str) -> "T2IRecord":
        return replace(self, caption=text)


@dataclass(frozen=True)
class EditRecord:
    """One editing sample: source images + instruction -> target image."""

    sources: tuple[ImageRef, ...]
    instruction: str
    target: ImageRef
    origin: str
    rewrite: str | None = None  # the Verifi answer to force, if the data has one
    kind = "edit"

    @property
    def text(self) -> str:
        return self.instruction

    def with_text(self, text: str) -> "EditRecord":
        return replace(self, instruction=text)


Record = Union[T2IRecord, EditRecord]


class _Problems:
    """Collects problems so a user sees all of them at once, not one per run."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = "\n  ".join(self.items[:MAX_LISTED_PROBLEMS])
        more = f"\n  (+{len(self.items) - MAX_LISTED_PROBLEMS} more)" if len(self.items) > MAX_LISTED_PROBLEMS else ""
        raise DatasetError(f"{self.what}: {len(self.items)} problem(s):\n  {shown}{more}")


def _check_image_file(path: Path, where: str, problems: _Problems) -> None:
    if not path.is_file():
        problems.add(f"{where}: image {path} does not exist; fix the path or remove the row")
        return
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        problems.add(f"{where}: image {path} is unreadable ({exc}); re-save it as PNG/JPEG or remove the row")


def open_image(ref: ImageRef, origin: str = "") -> Image.Image:
    """An RGB PIL image from a path or an in-memory image; errors name the sample."""
    if isinstance(ref, Image.Image):
        return ref if ref.mode == "RGB" else ref.convert("RGB")
    try:
        with Image.open(ref) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{origin or ref}: image {ref} is unreadable ({exc}); re-save it or remove the sample") \
            from exc


def _text(row: dict, key: str, where: str, problems: _Problems) -> str | None:
    if key not in row:
        problems.add(f"{where}: missing key {key!r}; every row needs it")
        return None
    value = row[key]
    if not isinstance(value, str):
        problems.add(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        return None
    if not value.strip():
        problems.add(f"{where}: {key!r} is empty; write some text or remove the row")
        return None
    return value.strip()


def _optional_rewrite(row: dict, where: str, problems: _Problems) -> str | None:
    """The row's ``rewrite`` if it has one (then it must be non-empty text)."""
    return _text(row, "rewrite", where, problems) if "rewrite" in row else None


def _path(row: dict, key: str, base: Path, where: str, problems: _Problems) -> Path | None:
    if key not in row:
        problems.add(f"{where}: missing key {key!r}; every row needs an image path there")
        return None
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        problems.add(f"{where}: {key!r} must be a non-empty path string, got {value!r}")
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    _check_image_file(path, where, problems)
    return path


def _jsonl_rows(path: Path, problems: _Problems) -> Iterable[tuple[int, dict]]:
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}; check the path")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8 JSON lines") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object")
            continue
        if not isinstance(row, dict):
            problems.add(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        yield number, row


def load_t2i_jsonl(path: str | Path) -> list[T2IRecord]:
    """Rows of ``{"image": path, "caption": str}``; all problems reported together."""
    path = Path(path)
    problems = _Problems(f"text-to-image dataset {path}")
    records = []
    for number, row in _jsonl_rows(path, problems):
        where = f"{path}:{number}"
        caption = _text(row, "caption", where, problems)
        image = _path(row, "image", path.parent, where, problems)
        rewrite = _optional_rewrite(row, where, problems)
        if caption is not None and image is not None:
            records.append(T2IRecord(image, caption, where, rewrite))
    problems.raise_if_any()
    _require_some(records, path)
    return records


def load_edit_jsonl(path: str | Path) -> list[EditRecord]:
    """Rows of ``{"sources": [path, ...], "instruction": str, "target": path}``."""
    path = Path(path)
    problems = _Problems(f"editing dataset {path}")
    records = []
    for number, row in _jsonl_rows(path, problems):
        where = f"{path}:{number}"
        instruction = _text(row, "instruction", where, problems)
        target = _path(row, "target", path.parent, where, problems)
        rewrite = _optional_rewrite(row, where, problems)
        raw = row.get("sources")
        sources: list[Path] = []
        if raw is None:
            problems.add(f"{where}: missing key 'sources'; give a list of one or more source image paths")
        elif not isinstance(raw, list) or not raw:
            problems.add(f"{where}: 'sources' must be a non-empty list of image paths, got {raw!r}")
        else:
            for index in range(len(raw)):
                found = _path({"sources": raw[index]}, "sources", path.parent, f"{where} (source {index})", problems)
                if found is not None:
                    sources.append(found)
        if instruction is not None and target is not None and raw and len(sources) == len(raw):
            records.append(EditRecord(tuple(sources), instruction, target, where, rewrite))
    problems.raise_if_any()
    _require_some(records, path)
    return records


def load_t2i_folder(folder: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[T2IRecord]:
    """Every image in ``folder`` (not recursive) with its same-stem ``.txt`` caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found: {folder}; check the path")
    problems = _Problems(f"image folder {folder}")
    records = []
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in extensions)
    for image in images:
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            problems.add(f"{image}: no caption file {caption_file.name}; write the caption there or remove the image")
            continue
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:
            problems.add(f"{caption_file}: not UTF-8 text ({exc}); save it as UTF-8")
            continue
        if not caption:
            problems.add(f"{caption_file}: the caption is empty; write one or remove {image.name}")
            continue
        _check_image_file(image, str(image), problems)
        records.append(T2IRecord(image, caption, str(image)))
    problems.raise_if_any()
    if not images:
        raise DatasetError(f"{folder} holds no images ({', '.join(extensions)}); put image + .txt caption pairs there")
    return records


def _sample_rewrite(sample: Sequence[Any], size: int, where: str, problems: _Problems) -> str | None:
    """The optional last item of an in-memory sample of ``size`` items."""
    return _text({"rewrite": sample[size]}, "rewrite", where, problems) if len(sample) > size else None


def t2i_from_samples(samples: Iterable[Sequence[Any]], name: str = "samples") -> list[T2IRecord]:
    """In-memory ``(PIL image, caption[, rewrite])`` tuples, validated like file rows (origin ``name[i]``)."""
    problems = _Problems(f"in-memory dataset {name!r}")
    records = []
    for index, sample in enumerate(samples):
        where = f"{name}[{index}]"
        if not isinstance(sample, (tuple, list)) or len(sample) not in (2, 3):
            problems.add(f"{where}: expected an (image, caption[, rewrite]) tuple, got {type(sample).__name__}")
            continue
        image, caption = sample[:2]
        text = _text({"caption": caption}, "caption", where, problems)
        rewrite = _sample_rewrite(sample, 2, where, problems)
        if not isinstance(image, Image.Image):
            problems.add(f"{where}: the image must be a PIL image, got {type(image).__name__}")
        elif text is not None:
            records.append(T2IRecord(image, text, where, rewrite))
    problems.raise_if_any()
    _require_some(records, name)
    return records


def edit_from_samples(samples: Iterable[Sequence[Any]], name: str = "samples") -> list[EditRecord]:
    """In-memory ``(source images, instruction, target image[, rewrite])`` tuples."""
    problems = _Problems(f"in-memory dataset {name!r}")
    records = []
    for index, sample in enumerate(samples):
        where = f"{name}[{index}]"
        if not isinstance(sample, (tuple, list)) or len(sample) not in (3, 4):
            problems.add(f"{where}: expected (source images, instruction, target[, rewrite]), "
                         f"got {type(sample).__name__}")
            continue
        sources, instruction, target = sample[:3]
        text = _text({"instruction": instruction}, "instruction", where, problems)
        rewrite = _sample_rewrite(sample, 3, where, problems)
        sources = [sources] if isinstance(sources, Image.Image) else list(sources)
        if not sources or not all(isinstance(s, Image.Image) for s in sources):
            problems.add(f"{where}: sources must be one or more PIL images")
        elif not isinstance(target, Image.Image):
            problems.add(f"{where}: the target must be a PIL image, got {type(target).__name__}")
        elif text is not None:
            records.append(EditRecord(tuple(sources), text, target, where, rewrite))
    problems.raise_if_any()
    _require_some(records, name)
    return records


def load_dataset(path: str | Path) -> list[Record]:
    """A folder (images + .txt) or a JSONL file whose first row decides the kind
    (``caption`` -> text to image, ``instruction`` -> editing)."""
    path = Path(path)
    if path.is_dir():
        return load_t2i_folder(path)
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}; give a folder of images + .txt captions or a .jsonl file")
    probe = _Problems(str(path))
    first = next(iter(_jsonl_rows(path, probe)), None)
    if first is None:
        probe.raise_if_any()
        raise DatasetError(f"{path} has no rows; add JSON lines")
    row = first[1]
    if "instruction" in row or "sources" in row:
        return load_edit_jsonl(path)
    if "caption" in row or "image" in row:
        return load_t2i_jsonl(path)
    raise DatasetError(
        f"{path}:{first[0]}: cannot tell the dataset kind from keys {sorted(row)}; text-to-image rows need "
        "'image' and 'caption', editing rows need 'sources', 'instruction' and 'target'"
    )


def _require_some(records: list[Any], where: Any) -> None:
    if not records:
        raise DatasetError(f"{where} holds no samples; add some rows")


def fit_captions(records: Sequence[Record], tokenizer: Any, max_tokens: int, on_long: str = "truncate",
                 ) -> list[Record]:
    """Texts longer than ``max_tokens`` tokens are cut at a token boundary with a warning
    (``on_long="truncate"``) or rejected (``on_long="error"``)."""
    if on_long not in ("truncate", "error"):
        raise DatasetError(f"on_long must be 'truncate' or 'error', got {on_long!r}")
    out: list[Record] = []
    too_long: list[str] = []
    for record in records:
        encoded = tokenizer(record.text, add_special_tokens=False, return_offsets_mapping=bool(
            getattr(tokenizer, "is_fast", False)))
        ids = encoded["input_ids"]
        if len(ids) <= max_tokens:
            out.append(record)
            continue
        too_long.append(f"{record.origin}: {len(ids)} tokens")
        if on_long == "error":
            continue
        if "offset_mapping" in encoded:
            cut = record.text[: encoded["offset_mapping"][max_tokens - 1][1]]
        else:
            cut = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
        logger.warning("%s: text is %d tokens, over the limit of %d; truncated to %r", record.origin, len(ids),
                       max_tokens, cut[-40:])
        out.append(record.with_text(cut))
    if on_long == "error" and too_long:
        problems = _Problems(f"texts over the VLM limit of {max_tokens} tokens")
        for item in too_long:
            problems.add(f"{item}; shorten the text or build the cache with on_long='truncate'")
        problems.raise_if_any()
    return out
