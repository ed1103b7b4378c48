"""The pack's ComfyUI entry point imports cleanly where ComfyUI is absent."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_imports_without_comfyui():
    # Load the repo root as a package the way ComfyUI does (spec_from_file_location on __init__.py).
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('unifusion_pack', {str(ROOT / '__init__.py')!r},\n"
        f"    submodule_search_locations=[{str(ROOT)!r}])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['unifusion_pack'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert module.WEB_DIRECTORY == './web'\n"
        "assert not hasattr(module, 'comfy_entrypoint')\n"
        "assert not hasattr(module, 'NODE_CLASS_MAPPINGS')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths')\n"
        "    or m.startswith('unifusion_pack.'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
