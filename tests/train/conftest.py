"""Session fixtures: a tiny VLM, a tiny autoencoder, demo-world samples and one feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_helpers import VERIFI_TOKENS, tiny_dit

from unifusion.config import UniFusionConfig
from unifusion.demo.grammar import sample_edits, sample_t2i
from unifusion.demo.world import render
from unifusion.train.datasets import edit_from_samples, t2i_from_samples
from unifusion.vlm.loader import load_vlm
from unifusion.vlm.tiny import build_tiny_vlm



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster on one thread (no sync overhead, no contention with other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory):
    folder = build_tiny_vlm(tmp_path_factory.mktemp("train_vlm") / "internvl", "internvl", seed=0, image_size=64)
    return load_vlm(folder)


@pytest.fixture(scope="session")
def tiny_vae():
    from unifusion.vae import TinyAutoencoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyAutoencoder(latent_channels=4, width=8).eval()


@pytest.fixture(scope="session")
def records():
    """6 text-to-image and 3 editing samples from the demo world, in memory."""
    t2i = t2i_from_samples([(render(s.scene), s.caption) for s in sample_t2i(6, seed=0)], name="t2i")
    edits = edit_from_samples([([render(s.source)], s.instruction, render(s.target)) for s in sample_edits(3, seed=0)],
                              name="edit")
    return t2i + edits


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, tiny_vlm, tiny_vae, records) -> Path:
    """Built once: float32 features, Verifi and reconstruction variants, 2 shards."""
    from unifusion.train.cache_build import build_cache

    folder = tmp_path_factory.mktemp("cache")
    build_cache(records, tiny_vlm, tiny_vae, folder, feature_dtype="float32", verifi=True,
                verifi_max_new_tokens=VERIFI_TOKENS, batch_size=4, shard_size=5)
    return folder


@pytest.fixture(scope="session")
def cache(cache_dir: Path):
    from unifusion.train.cache import FeatureCache

    return FeatureCache(cache_dir, preload=True)


@pytest.fixture(scope="session")
def model_config(cache) -> UniFusionConfig:
    from unifusion.train.run import model_config_for_cache

    return model_config_for_cache(cache, tiny_dit(), lap_heads=2, refiner_blocks=1)
