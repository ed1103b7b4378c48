"""Model folders through ComfyUI's folder_paths, with the bundled demo model found in place.

- VLM folders: ``models/unifusion_vlm/<name>/`` (plus any ``unifusion_vlm:`` entry of
  extra_model_paths.yaml); the bundled demo VLM is listed under its folder name.
- Checkpoints: ``diffusion_models`` (models/diffusion_models, models/unet); the bundled
  demo checkpoint is listed under its file name.
- Autoencoders: the native VAELoader reads ``vae``; the bundled assets folder is added to
  it so the demo autoencoder loads without copying.
A user file with a bundled name wins over the bundled one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import folder_paths

from ..unifusion.bundled import ASSETS_DIR, DEMO_CHECKPOINT, DEMO_VAE, DEMO_VAE_PATH, DEMO_VLM
from .folders import list_vlm_folders, resolve_file, resolve_vlm_folder, with_bundled

VLM_FOLDER = "unifusion_vlm"
CHECKPOINT_FOLDER = "diffusion_models"
VAE_FOLDER = "vae"


def register() -> None:
    """Called once when the pack is imported."""
    folder_paths.add_model_folder_path(VLM_FOLDER, os.path.join(folder_paths.models_dir, VLM_FOLDER),
                                       is_default=True)
    folder_paths.add_model_folder_path(VAE_FOLDER, str((ASSETS_DIR / DEMO_VAE_PATH).parent))


def vlm_names() -> list[str]:
    return with_bundled(list_vlm_folders(folder_paths.get_folder_paths(VLM_FOLDER)), DEMO_VLM, ASSETS_DIR / DEMO_VLM)


def vlm_path(name: str) -> Path:
    return resolve_vlm_folder(name, folder_paths.get_folder_paths(VLM_FOLDER), DEMO_VLM, ASSETS_DIR / DEMO_VLM)


def checkpoint_names() -> list[str]:
    return with_bundled(list(folder_paths.get_filename_list(CHECKPOINT_FOLDER)), DEMO_CHECKPOINT,
                        ASSETS_DIR / DEMO_CHECKPOINT)


def checkpoint_path(name: str) -> Path:
    return resolve_file(name, folder_paths.get_full_path(CHECKPOINT_FOLDER, name), DEMO_CHECKPOINT,
                        ASSETS_DIR / DEMO_CHECKPOINT, CHECKPOINT_FOLDER)


def training_vae_path(extra: dict, checkpoint_name: str) -> Optional[Path]:
    """The autoencoder a checkpoint names in its notes (``vae``), or the demo's for the demo."""
    name = extra.get("vae") or (DEMO_VAE if checkpoint_name == DEMO_CHECKPOINT else None)
    if not name:
        return None
    found = folder_paths.get_full_path(VAE_FOLDER, str(name))
    return Path(found) if found else None
