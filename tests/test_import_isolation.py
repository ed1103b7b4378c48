"""The library must never import ComfyUI: prove it in a clean interpreter."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("comfy", "comfy_api", "folder_paths", "nodes", "server", "execution")


def test_library_imports_without_comfyui():
    modules = sorted(
        "unifusion." + ".".join(p.relative_to(ROOT / "unifusion").with_suffix("").parts)
        for p in (ROOT / "unifusion").rglob("*.py")
        if p.name != "__init__.py" and "__main__" not in p.name
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
