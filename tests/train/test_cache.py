"""Feature cache: values equal a direct encode, stale caches are refused, builds resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import VERIFI_TOKENS, tiny_dit

from unifusion.config import VLMIdentity, make_config
from unifusion.train import cache_build
from unifusion.train.cache import INDEX_NAME, CacheKey, FeatureCache, collate, shard_name
from unifusion.train.cache_build import build_cache
from unifusion.train.datasets import open_image
from unifusion.train.errors import CacheError
from unifusion.vlm.encode import encode
from unifusion.vlm.loader import LoadedVLM
from unifusion.vlm.verifi import forced_rewrite, verifi_rewrite
from dataclasses import replace



def _kept(features) -> torch.Tensor:
    tokens, mask = features.condition_tokens()
    return tokens[0, : int(mask[0].sum())]


def _places(features) -> torch.Tensor:
    places, mask = features.condition_positions(), features.condition_tokens()[1]
    return places[0, : int(mask[0].sum())]


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def test_cached_values_equal_direct_encoding(cache: FeatureCache, records, tiny_vlm, tiny_vae) -> None:
    assert len(cache) == 9 and cache.variants() == ("plain", "verifi", "recon")
    assert cache.latent_shape == (4, 8, 8) and cache.feature_shape == (2, 64)
    assert {s.shard for s in cache.samples} == {0, 1}
    for index in (0, 5, 7):  # T2I in shard 0, T2I and editing in shard 1
        record, sample = records[index], cache.get(index, ("plain", "verifi", "recon"))
        sources = [open_image(s) for s in record.sources]
        target = open_image(record.target)
        plain = _kept(encode(tiny_vlm, record.text, sources))
        torch.testing.assert_close(sample.features["plain"], plain, rtol=1e-4, atol=1e-4)
        recon = encode(tiny_vlm, "", [target], max_tiles=1)
        torch.testing.assert_close(sample.features["recon"], _kept(recon), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sample.places["recon"], _places(recon), equal_nan=True)
        assert int(torch.isfinite(sample.places["recon"]).all(dim=-1).sum()) == 16  # the one tile lies over the frame
        torch.testing.assert_close(sample.places["plain"], _places(encode(tiny_vlm, record.text, sources)),
                                   equal_nan=True)
        rewrite = verifi_rewrite(tiny_vlm, record.text, sources, max_new_tokens=VERIFI_TOKENS)
        torch.testing.assert_close(sample.features["verifi"], _kept(rewrite.features), rtol=1e-4, atol=1e-4)
        assert sample.info.verifi_text == rewrite.text and sample.info.kind == record.kind
        with torch.no_grad():
            torch.testing.assert_close(sample.latent, tiny_vae.encode(_pixels(target))[0])
    assert sample.features["plain"].shape[0] > 16  # editing: source image tokens + instruction


def test_collate_pads_with_mask() -> None:
    feats = [torch.ones(3, 2, 4), torch.full((1, 2, 4), 2.0)]
    batch = collate(feats, [torch.zeros(4, 8, 8), torch.ones(4, 8, 8)], dtype=torch.float64)
    assert batch.features.shape == (2, 3, 2, 4) and batch.features.dtype == torch.float64
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(batch.features[1, 1:], torch.zeros(2, 2, 4)) and batch.features[1, 0].eq(2).all()
    assert batch.latents.shape == (2, 4, 8, 8) and batch.positions is None
    places = [torch.full((3, 2), 0.5), torch.tensor([[0.25, 0.75]])]
    placed = collate(feats, [torch.zeros(4, 8, 8), torch.ones(4, 8, 8)], places=places).positions
    assert placed.shape == (2, 3, 2) and placed[0].eq(0.5).all() and placed[1, 0].tolist() == [0.25, 0.75]
    assert torch.isnan(placed[1, 1:]).all()
    with pytest.raises(CacheError, match="one places tensor"):
        collate(feats, [torch.zeros(4, 8, 8), torch.ones(4, 8, 8)], places=places[:1])


def test_reuse_stale_and_overwrite(cache_dir: Path, records, tiny_vlm, tiny_vae, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_encoding(*args, **kwargs):
        raise AssertionError("an up-to-date cache must not be encoded again")

    kwargs = dict(feature_dtype="float32", verifi=True, verifi_max_new_tokens=VERIFI_TOKENS, batch_size=4,
                  shard_size=5)
    with monkeypatch.context() as m:
        m.setattr(cache_build, "encode", no_encoding)
        assert len(build_cache(records, tiny_vlm, tiny_vae, cache_dir, **kwargs)) == 9
    other_layers = LoadedVLM.from_parts(tiny_vlm.model, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                                        selected_layers=(2, 5, 8))
    with pytest.raises(CacheError, match=r"stale.*vlm\.selected_layers: \(4, 7\) vs \(2, 5, 8\)"):
        build_cache(records, other_layers, tiny_vae, cache_dir, **kwargs)
    from unifusion.vae import TinyAutoencoder

    other_vae = TinyAutoencoder(latent_channels=4, width=8)
    with pytest.raises(CacheError, match="stale.*vae_fingerprint"):
        build_cache(records, tiny_vlm, other_vae, cache_dir, **kwargs)
    with pytest.raises(CacheError, match="another dataset"):
        build_cache(records[:3], tiny_vlm, tiny_vae, cache_dir, **kwargs)
    small = build_cache(records[:2], other_layers, tiny_vae, tmp_path / "c", feature_dtype="bfloat16",
                        recon=False, batch_size=2)
    assert small.get(0).features["plain"].dtype == torch.bfloat16 and small.variants() == ("plain",)
    assert small.key.vlm.selected_layers == (2, 5, 8) and small.feature_shape == (3, 64)
    rebuilt = build_cache(records[:2], tiny_vlm, tiny_vae, tmp_path / "c", recon=False, batch_size=2, overwrite=True)
    assert rebuilt.key.vlm.selected_layers == (4, 7)
    with pytest.raises(CacheError, match="no verifi features"):
        rebuilt.get(0, ("verifi",))


def test_interrupted_build_resumes_from_finished_shards(records, tiny_vlm, tiny_vae, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "c"
    first = build_cache(records[:4], tiny_vlm, tiny_vae, folder, recon=False, shard_size=2, batch_size=2)
    expected = first.get(3).features["plain"].clone()
    (folder / INDEX_NAME).unlink()
    (folder / shard_name(1)).unlink()
    calls = []
    original = cache_build._Encoder.encode

    def counting(self, chunk, first_index):
        calls.append(first_index)
        return original(self, chunk, first_index)

    monkeypatch.setattr(cache_build._Encoder, "encode", counting)
    again = build_cache(records[:4], tiny_vlm, tiny_vae, folder, recon=False, shard_size=2, batch_size=2)
    assert calls == [2]  # shard 0 reused, shard 1 re-encoded
    assert torch.equal(again.get(3).features["plain"], expected)


def test_cache_checks_model_config(cache: FeatureCache, model_config) -> None:
    cache.check_model(model_config)
    other = make_config(VLMIdentity("InternVLForConditionalGeneration", 8, 64, (2, 5)), tiny_dit())
    with pytest.raises(CacheError, match=r"selected_layers: expected \[2, 5\], found \[4, 7\]"):
        cache.check_model(other)
    placing = replace(model_config, dit=replace(model_config.dit, image_positions=True))
    cache.check_model(placing)  # this cache stores frame positions
    old_cache = FeatureCache(cache.folder)
    old_cache.key = replace(cache.key, frame_positions=False)  # as an index written before them reads
    with pytest.raises(CacheError, match="image_positions: the model places image tokens"):
        old_cache.check_model(placing)
    assert old_cache.get(0).places == {}


def test_damaged_or_foreign_index(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(CacheError, match="not a feature cache"):
        FeatureCache(tmp_path)
    raw = json.loads((cache_dir / INDEX_NAME).read_text())
    key = CacheKey.from_dict(raw["key"])
    assert key.differences(key) == [] and key.has_verifi and key.has_recon
    (tmp_path / INDEX_NAME).write_text(json.dumps({**raw, "key": {**raw["key"], "colour": 1}}))
    with pytest.raises(CacheError, match="unknown fields"):
        FeatureCache(tmp_path)


def test_reading_a_cache_does_not_import_the_vlm_code(cache_dir: Path) -> None:
    code = (
        "import sys\nfrom unifusion.train.cache import FeatureCache\n"
        f"c = FeatureCache({str(cache_dir)!r})\nc.get(0, ('plain', 'recon'))\n"
        "assert 'transformers' not in sys.modules and 'unifusion.vlm' not in sys.modules, 'VLM code imported'\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


def test_verifi_batch_function_gets_whole_batches(cache: FeatureCache, records, tiny_vlm, tiny_vae,
                                                  tmp_path: Path) -> None:
    calls = []

    def batched(vlm, texts, image_lists, **kwargs):
        calls.append((len(texts), [len(i) for i in image_lists], kwargs["seeds"]))
        return cache_build.rewrite_each(vlm, texts, image_lists, **kwargs)

    subset = records[4:8]  # two T2I, two editing samples
    built = build_cache(subset, tiny_vlm, tiny_vae, tmp_path, feature_dtype="float32", verifi=True, recon=False,
                        verifi_max_new_tokens=VERIFI_TOKENS, batch_size=3, seed=10, verifi_batch=batched)
    assert calls == [(3, [0, 0, 1], [10, 11, 12]), (1, [1], [13])]
    for i in range(4):
        ours, theirs = built.get(i, ("verifi",)), cache.get(4 + i, ("verifi",))
        assert ours.info.verifi_text == theirs.info.verifi_text
        torch.testing.assert_close(ours.features["verifi"], theirs.features["verifi"], rtol=1e-4, atol=1e-4)


def test_records_with_a_rewrite_get_it_forced(cache: FeatureCache, records, tiny_vlm, tiny_vae,
                                              tmp_path: Path) -> None:
    """A record's own rewrite is forced as the Verifi answer; the others are still written by the VLM
    with their own seeds, and the rewrite is part of the dataset fingerprint."""
    calls = []

    def batched(vlm, texts, image_lists, **kwargs):
        calls.append(kwargs["seeds"])
        return cache_build.rewrite_each(vlm, texts, image_lists, **kwargs)

    answers = {1: "one shape: a large red circle in the center.", 2: "one shape: a small red square in the center.",
               7: "two shapes: a small blue square in the top left."}  # 1 and 2 share one padded forward
    subset = [replace(r, rewrite=answers.get(i)) for i, r in enumerate(records[:8])]
    built = build_cache(subset, tiny_vlm, tiny_vae, tmp_path, feature_dtype="float32", verifi=True, recon=False,
                        verifi_max_new_tokens=VERIFI_TOKENS, batch_size=4, seed=10, verifi_batch=batched)
    assert calls == [[10, 13], [14, 15, 16]]
    for i, record in enumerate(subset):
        ours = built.get(i, ("verifi",))
        if record.rewrite is None:
            theirs = cache.get(i, ("verifi",))
            assert ours.info.verifi_text == theirs.info.verifi_text
            torch.testing.assert_close(ours.features["verifi"], theirs.features["verifi"], rtol=1e-4, atol=1e-4)
            continue
        sources = [open_image(s) for s in record.sources]
        forced = forced_rewrite(tiny_vlm, record.text, record.rewrite, sources, max_new_tokens=VERIFI_TOKENS)
        assert ours.info.verifi_text == forced.text and forced.generated_token_count == VERIFI_TOKENS
        torch.testing.assert_close(ours.features["verifi"], _kept(forced.features), rtol=1e-4, atol=1e-4)
    assert built.dataset_fingerprint != cache_build._dataset_fingerprint(records[:8])
