"""Finding VLM folders and model files on disk; pure (no ComfyUI), given the search roots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from ..unifusion.errors import InputError

CONFIG_FILE = "config.json"


def _inside_itself(root: Path, current: str) -> bool:
    """True when ``current`` is (through a symlink) one of its own ancestors below ``root``."""
    parts = Path(current).relative_to(root).parts
    real = os.path.realpath(current)
    return any(os.path.realpath(root.joinpath(*parts[:i])) == real for i in range(len(parts)))


def list_vlm_folders(roots: Iterable[str | Path]) -> list[str]:
    """Folders (relative to their root, '/'-separated) that hold a ``config.json``; symlinks are
    followed and a model's own sub-folders are not searched once its config is found. A symlink
    back to a parent folder is not entered, so a loop cannot hang the node list."""
    found: list[str] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for current, dirs, files in os.walk(root, followlinks=True):
            if _inside_itself(root, current):
                dirs.clear()
                continue
            if CONFIG_FILE in files and Path(current) != root:
                found.append(Path(current).relative_to(root).as_posix())
                dirs.clear()
            dirs.sort()
    return sorted(dict.fromkeys(found))


def _plain_name(name: str, what: str, kind: str) -> None:
    """Widget values are names from a list, never paths: refuse anything that could leave the folder."""
    if not name or Path(name).is_absolute() or ".." in Path(name.replace("\\", "/")).parts:
        raise InputError(f"{what}: {name!r} is not a {kind} name from the list; pick one from the list")


def with_bundled(names: list[str], bundled_name: str, bundled_path: Path) -> list[str]:
    """The listed names plus the bundled one when it exists and no user file shadows it."""
    if bundled_path.exists() and bundled_name not in names:
        return names + [bundled_name]
    return names


def resolve_vlm_folder(name: str, roots: Iterable[str | Path], bundled_name: str, bundled_path: Path) -> Path:
    """The folder a combo value names: first under the roots, then the bundled demo VLM."""
    _plain_name(name, "vlm", "folder")
    roots = [Path(r) for r in roots]
    for root in roots:
        candidate = root / name
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    if name == bundled_name and (bundled_path / CONFIG_FILE).is_file():
        return bundled_path
    where = ", ".join(str(r) for r in roots) or "no folder"
    raise InputError(
        f"VLM folder {name!r} was not found in {where}; put the model folder (config.json, weights, tokenizer) "
        "there and press 'r' to refresh the lists"
    )


def resolve_file(name: str, found: Optional[str], bundled_name: str, bundled_path: Path, folder: str) -> Path:
    """A model file: the one ComfyUI found by name, else the bundled demo file, else a clear error."""
    _plain_name(name, folder, "file")
    if found is not None:
        return Path(found)
    if name == bundled_name and bundled_path.is_file():
        return bundled_path
    raise InputError(
        f"{folder}: {name!r} was not found (deleted, moved or a broken link?); put the file in models/{folder}/ "
        "and press 'r' to refresh the lists"
    )
