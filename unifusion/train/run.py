"""One-call training entry: open the cache, pick the model config, resume if asked, train."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..checkpoint import read_checkpoint_header
from ..config import DiTConfig, UniFusionConfig, make_config
from .cache import FeatureCache
from .errors import TrainConfigError, TrainStateError
from .recipe import TrainConfig
from .state import latest_state, read_meta
from .trainer import Callback, Trainer, TrainResult

logger = logging.getLogger(__name__)

Resume = Union[str, Path, None]


def model_config_for_cache(cache: FeatureCache, dit: DiTConfig, lap_heads: int = 8, refiner_blocks: int = 2,
                           extra: Optional[dict[str, Any]] = None) -> UniFusionConfig:
    """A model config whose LAP matches the cached VLM features and whose DiT matches the latents."""
    if dit.in_channels != cache.key.latent_channels:
        raise TrainConfigError(f"DiT in_channels {dit.in_channels} differs from the cached latents' "
                               f"{cache.key.latent_channels} channels; set in_channels={cache.key.latent_channels}")
    return make_config(cache.key.vlm, dit, lap_heads=lap_heads, refiner_blocks=refiner_blocks, extra=extra)


def resume_folder(output_dir: Path, resume: Resume) -> Optional[Path]:
    """The state to resume: None, "auto" (newest in ``output_dir``, if any), or a state/output folder."""
    if resume is None:
        return None
    if str(resume) == "auto":
        return latest_state(output_dir)
    folder = Path(resume)
    if not (folder / "trainer.json").is_file():
        found = latest_state(folder)
        if found is None:
            raise TrainStateError(f"nothing to resume in {folder}: no states/step-*/trainer.json there")
        return found
    return folder


def train(
    cache_dir: str | Path,
    output_dir: str | Path,
    model_config: Optional[UniFusionConfig] = None,
    config: Optional[TrainConfig] = None,
    resume: Resume = "auto",
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    accelerator: Any = None,
    preload: Optional[bool] = None,
) -> TrainResult:
    """Train on a feature cache. ``resume="auto"`` continues from the newest state in
    ``output_dir`` if there is one (a path resumes from that state, None starts fresh).
    Without ``model_config`` the config comes from the resumed state, else from
    ``config.init_from``'s checkpoint. ``preload`` None reads caches under 2 GiB into memory."""
    output_dir = Path(output_dir)
    config = config or TrainConfig()
    cache = FeatureCache(cache_dir, preload=preload)
    folder = resume_folder(output_dir, resume)
    if model_config is None:
        if folder is not None:
            model_config = UniFusionConfig.from_json(json.dumps(read_meta(folder)["model_config"]))
        elif config.init_from is not None:
            model_config = read_checkpoint_header(config.init_from).config
        else:
            raise TrainConfigError("no model config: pass one (e.g. model_config_for_cache(cache, DiTConfig(...))), "
                                   "resume a state, or set init_from")
    trainer = Trainer(model_config, cache, config, output_dir, accelerator=accelerator, callbacks=callbacks,
                      progress=progress)
    if folder is not None:
        trainer.resume(folder)
    output_dir.mkdir(parents=True, exist_ok=True)
    return trainer.train()
