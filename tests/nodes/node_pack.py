"""Load the repo as a package (as ComfyUI does) so the pure node helpers and their relative
imports work without ComfyUI; `nodes/__init__.py` imports nothing ComfyUI-specific here."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
PACK = "unifusion_pack"


def _pack() -> ModuleType:
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def pack_module(name: str) -> ModuleType:
    """``pack_module("nodes.inputs")`` -> the pack's module of that name."""
    _pack()
    return importlib.import_module(f"{PACK}.{name}")
