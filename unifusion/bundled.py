"""Where the bundled demo model lives inside the package.

The demo VLM folder, UniFusion checkpoint and autoencoder are trained by
`unifusion train-demo` and shipped under ``unifusion/demo/assets/``; the CLI and the
ComfyUI nodes default to them so everything works on a fresh install.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UniFusionError

ASSETS_DIR = Path(__file__).resolve().parent / "demo" / "assets"
DEMO_VLM = "unifusion-demo-vlm"
DEMO_CHECKPOINT = "unifusion-demo.safetensors"
DEMO_VAE = "unifusion-demo-vae.safetensors"
# The autoencoder sits in a folder of its own: ComfyUI lists that folder in VAELoader, which
# must not offer the DiT checkpoint or the VLM's weights as VAEs.
DEMO_VAE_PATH = f"vae/{DEMO_VAE}"


@dataclass(frozen=True)
class DemoFiles:
    vlm: Path
    checkpoint: Path
    vae: Path


def demo_files(assets_dir: Path = ASSETS_DIR) -> DemoFiles:
    """Paths of the bundled demo model; a clear error when they have not been trained yet."""
    files = DemoFiles(assets_dir / DEMO_VLM, assets_dir / DEMO_CHECKPOINT, assets_dir / DEMO_VAE_PATH)
    missing = [p.name for p in (files.vlm, files.checkpoint, files.vae) if not p.exists()]
    if missing:
        raise UniFusionError(
            f"the bundled demo model is missing from {assets_dir} ({', '.join(missing)}). Train it with "
            "`unifusion train-demo`, or pass --vlm, --checkpoint and --vae explicitly."
        )
    return files
