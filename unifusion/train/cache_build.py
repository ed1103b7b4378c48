"""Build a feature cache once with the frozen VLM and the VAE (see `cache` for the format).

Shards are written atomically, each carrying the key hash and its samples in its metadata,
so an interrupted build resumes from the first missing shard. A finished cache whose key
and dataset match is returned as it is; one built with other settings is reported as stale
(or replaced with ``overwrite=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..vlm.encode import encode
from ..vlm.verifi import DEFAULT_SYSTEM_PROMPT, forced_rewrite_batch, verifi_rewrite
from .cache import (
    FEATURE_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    CacheKey,
    FeatureCache,
    SampleInfo,
    places_name,
    shard_name,
    tensor_name,
)
from .datasets import Record, fit_captions, open_image
from .errors import CacheError, DatasetError
from .fingerprint import vae_fingerprint, vlm_fingerprint

logger = logging.getLogger(__name__)

TEMPLATE_RESERVE = 256  # tokens kept free for the chat template and system prompt
Progress = Callable[[int, int], None]


def _resize_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover (height, width), then centre-crop: no distortion, no borders."""
    height, width = size
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    scaled = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                          Image.Resampling.BICUBIC)
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def _pixels(images: Sequence[Image.Image]) -> Tensor:
    """PIL RGB images -> (B, 3, H, W) float32 in [0, 1]."""
    arrays = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def _resolution(records: Sequence[Record], resolution: Any, downscale: int) -> tuple[int, int]:
    if resolution is None:
        first = open_image(records[0].target, records[0].origin)
        size = (first.height, first.width)
    elif isinstance(resolution, int):
        size = (resolution, resolution)
    else:
        size = (int(resolution[0]), int(resolution[1]))
    if size[0] % downscale or size[1] % downscale:
        raise DatasetError(f"target size {size[1]}x{size[0]} is not a multiple of the VAE downscale {downscale}; "
                           "pass a resolution that is")
    return size


def _dataset_fingerprint(records: Sequence[Record]) -> str:
    rows = [[r.kind, r.origin, r.text] + ([r.rewrite] if r.rewrite is not None else []) for r in records]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _key_hash(key: CacheKey) -> str:
    return hashlib.sha256(json.dumps(key.to_dict(), sort_keys=True).encode()).hexdigest()


def _target(record: Record, size: tuple[int, int], fixed: bool) -> Image.Image:
    image = open_image(record.target, record.origin)
    if not fixed and (image.height, image.width) != size:
        raise DatasetError(
            f"{record.origin}: target is {image.width}x{image.height} but the first sample is {size[1]}x{size[0]}; "
            "pass a resolution to resize every target to one size"
        )
    return _resize_cover(image, size)


VerifiBatch = Callable[..., Sequence[Any]]
"""``fn(vlm, texts, image_lists, system_prompt=, max_new_tokens=, max_tiles=, seeds=) -> [VerifiResult]``:
Verifi rewrites of a batch of prompts, each with its reference images."""


def rewrite_each(vlm: Any, texts: Sequence[str], image_lists: Sequence[Sequence[Any]], system_prompt: Optional[str],
                 max_new_tokens: int, max_tiles: int, seeds: Sequence[int]) -> list[Any]:
    """The default `VerifiBatch`: one greedy `verifi_rewrite` per prompt."""
    return [verifi_rewrite(vlm, text, list(images), system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                           seed=seed, max_tiles=max_tiles)
            for text, images, seed in zip(texts, image_lists, seeds)]


class _Encoder:
    """Runs the VLM and VAE over one chunk of records."""

    def __init__(self, vlm: Any, vae: Any, key: CacheKey, batch_size: int, fixed_size: bool, seed: int,
                 verifi_batch: Optional[VerifiBatch]) -> None:
        self.vlm, self.vae, self.key = vlm, vae, key
        self.batch_size, self.fixed_size, self.seed = batch_size, fixed_size, seed
        self.verifi_batch = verifi_batch or rewrite_each
        self.dtype = FEATURE_DTYPES[key.feature_dtype]

    def _verifi(self, records: Sequence[Record], first_index: int) -> list[Any]:
        """Verifi results in record order: a record's own ``rewrite`` forced as the answer, the
        others written by the VLM (``verifi_batch``)."""
        images = [[open_image(s, r.origin) for s in r.sources] for r in records]
        written = [i for i, r in enumerate(records) if r.rewrite is None]
        results: list[Any] = [None] * len(records)
        if written:
            batch = list(self.verifi_batch(
                self.vlm, [records[i].text for i in written], [images[i] for i in written],
                system_prompt=self.key.verifi_system_prompt, max_new_tokens=self.key.verifi_max_new_tokens,
                max_tiles=self.key.max_tiles, seeds=[self.seed + first_index + i for i in written]))
            if len(batch) != len(written):
                raise CacheError(f"the Verifi batch function returned {len(batch)} results for {len(written)} prompts")
            for i, result in zip(written, batch):
                results[i] = result
        forced = [i for i, r in enumerate(records) if r.rewrite is not None]
        if forced:  # one padded forward for the chunk's forced answers
            batch = forced_rewrite_batch(self.vlm, [records[i].text for i in forced],
                                         [records[i].rewrite for i in forced], [images[i] for i in forced],
                                         system_prompt=self.key.verifi_system_prompt, max_tiles=self.key.max_tiles,
                                         max_new_tokens=self.key.verifi_max_new_tokens)
            for i, result in zip(forced, batch):
                results[i] = result
        return results

    def _rows(self, features: Any) -> list[tuple[Tensor, Tensor]]:
        """Per prompt: its kept tokens (S', L, H) in the cache dtype and their frame positions (S', 2)."""
        tokens, mask = features.condition_tokens()  # (B, S', L, H), (B, S')
        places = features.condition_positions()  # (B, S', 2)
        counts = [int(mask[b].sum()) for b in range(tokens.shape[0])]
        return [(tokens[b, :n].to("cpu", self.dtype).contiguous(), places[b, :n].to("cpu", torch.float32).contiguous())
                for b, n in enumerate(counts)]

    def _plain(self, records: Sequence[Record]) -> list[tuple[Tensor, Tensor]]:
        sources = [[open_image(s, r.origin) for s in r.sources] for r in records]
        texts = [r.text for r in records]
        images: Any = sources[0] if len(records) == 1 else (sources if any(sources) else ())
        features = encode(self.vlm, texts if len(texts) > 1 else texts[0], images, max_tiles=self.key.max_tiles,
                          system_prompt=self.key.system_prompt)
        return self._rows(features)

    def _recon(self, targets: Sequence[Image.Image]) -> list[tuple[Tensor, Tensor]]:
        """Image-only prompts: the VLM's view of each target (tiles + thumbnail), no text."""
        many = len(targets) > 1
        features = encode(self.vlm, [""] * len(targets) if many else "", [[t] for t in targets] if many else targets,
                          max_tiles=self.key.recon_tiles, system_prompt=self.key.system_prompt)
        return self._rows(features)

    def encode(self, records: Sequence[Record], first_index: int) -> tuple[dict[str, Tensor], list[SampleInfo]]:
        tensors: dict[str, Tensor] = {}
        infos: list[SampleInfo] = []
        for start in range(0, len(records), self.batch_size):
            chunk = records[start: start + self.batch_size]
            targets = [_target(r, self.key.resolution, self.fixed_size) for r in chunk]
            with torch.no_grad():
                param = next(self.vae.parameters())
                latents = self.vae.encode(_pixels(targets).to(param.device, param.dtype)).float().cpu()
            plain = self._plain(chunk)
            recon = self._recon(targets) if self.key.has_recon else None
            rewrites = self._verifi(chunk, first_index + start) if self.key.has_verifi else None
            for offset, record in enumerate(chunk):
                index = first_index + start + offset
                tensors[tensor_name(index, "latent")] = latents[offset].contiguous()
                rows = {"plain": plain[offset]}
                if recon is not None:
                    rows["recon"] = recon[offset]
                verifi_text = None
                if rewrites is not None:
                    rows["verifi"] = self._rows(rewrites[offset].features)[0]
                    verifi_text = rewrites[offset].text
                for variant, (tokens, places) in rows.items():
                    tensors[tensor_name(index, variant)] = tokens
                    tensors[places_name(index, variant)] = places
                counts = {variant: int(tokens.shape[0]) for variant, (tokens, _) in rows.items()}
                infos.append(SampleInfo(shard=-1, kind=record.kind, text=record.text, origin=record.origin,
                                        tokens=counts, verifi_text=verifi_text))
        return tensors, infos


def _existing_shard(folder: Path, shard: int, key_hash: str, count: int) -> Optional[list[SampleInfo]]:
    """The samples of a finished shard written for the same key, else None."""
    path = folder / shard_name(shard)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return None
    if meta.get("key_hash") != key_hash:
        return None
    infos = [SampleInfo(**s) for s in json.loads(meta.get("samples", "[]"))]
    return infos if len(infos) == count else None


def _clear(folder: Path) -> None:
    for path in list(folder.glob("shard-*.safetensors")) + [folder / INDEX_NAME]:
        path.unlink(missing_ok=True)


def make_cache_key(vlm: Any, vae: Any, resolution: tuple[int, int], feature_dtype: str = "bfloat16",
                   system_prompt: Optional[str] = None, max_tiles: int = 6, verifi: bool = False,
                   verifi_system_prompt: Optional[str] = None, verifi_max_new_tokens: int = 128,
                   recon: bool = True, recon_tiles: int = 1) -> CacheKey:
    """The key a cache built with these models and settings gets (fingerprints computed here)."""
    return CacheKey(
        vlm=vlm.identity, vlm_fingerprint=vlm_fingerprint(vlm), vae_fingerprint=vae_fingerprint(vae),
        latent_channels=int(getattr(vae, "latent_channels")), resolution=resolution, feature_dtype=feature_dtype,
        system_prompt=system_prompt, max_tiles=max_tiles,
        verifi_system_prompt=(verifi_system_prompt or DEFAULT_SYSTEM_PROMPT) if verifi else None,
        verifi_max_new_tokens=verifi_max_new_tokens, recon_tiles=recon_tiles if recon else None,
        frame_positions=True,
    )


def build_cache(
    records: Sequence[Record],
    vlm: Any,
    vae: Any,
    folder: str | Path,
    *,
    resolution: int | tuple[int, int] | None = None,
    feature_dtype: str = "bfloat16",
    system_prompt: Optional[str] = None,
    max_tiles: int = 6,
    verifi: bool = False,
    verifi_system_prompt: Optional[str] = None,
    verifi_max_new_tokens: int = 128,
    recon: bool = True,
    recon_tiles: int = 1,
    max_text_tokens: Optional[int] = None,
    on_long: str = "truncate",
    batch_size: int = 8,
    shard_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    progress: Optional[Progress] = None,
    verifi_batch: Optional[VerifiBatch] = None,
) -> FeatureCache:
    """Encode ``records`` with the frozen ``vlm`` (a LoadedVLM) and ``vae`` into ``folder``.

    Targets are resized (cover + centre crop) to ``resolution``; without one every target
    must have the first target's size. Texts over ``max_text_tokens`` (default: the VLM's
    window minus a template reserve) are truncated or rejected (``on_long``). Verifi
    rewrites are greedy, under ``verifi_system_prompt`` (default: the library's Verifi
    prompt), ``batch_size`` prompts per `VerifiBatch` call (``verifi_batch``, default
    `rewrite_each`; a batched ``generate`` is much faster); sample ``i`` gets seed ``seed + i``.
    A record with its own ``rewrite`` gets that text forced as the answer instead (one forward,
    cut at ``verifi_max_new_tokens``). ``progress(done, total)`` runs after each shard. A shard
    is held in memory until written:
    ``shard_size`` x the per-sample size (about 40 KB for the demo, ~25 MB for paper-scale
    bf16 features with images) must fit in RAM.
    """
    if not records:
        raise DatasetError("the dataset is empty; nothing to cache")
    if batch_size < 1 or shard_size < 1:
        raise CacheError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    folder = Path(folder)
    size = _resolution(records, resolution, int(getattr(vae, "downscale", 8)))
    key = make_cache_key(vlm, vae, size, feature_dtype, system_prompt, max_tiles, verifi, verifi_system_prompt,
                         verifi_max_new_tokens, recon, recon_tiles)
    limit = max_text_tokens or max(1, vlm.max_length - TEMPLATE_RESERVE)
    records = fit_captions(records, vlm.tokenizer, limit, on_long)
    data_hash = _dataset_fingerprint(records)
    if (folder / INDEX_NAME).is_file():
        existing = FeatureCache(folder)
        stale = existing.key.differences(key)
        if not stale and existing.dataset_fingerprint == data_hash:
            logger.info("feature cache %s is up to date (%d samples)", folder, len(existing))
            return existing
        if not overwrite:
            if stale:
                existing.check_key(key)
            raise CacheError(f"{folder} holds a cache of another dataset ({len(existing)} samples); pass "
                             "overwrite=True (--overwrite) to rebuild it, or use another folder")
        _clear(folder)
    elif overwrite:
        _clear(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key_hash = _key_hash(key)
    encoder = _Encoder(vlm, vae, key, batch_size, resolution is not None, seed, verifi_batch)
    infos: list[SampleInfo] = []
    latent_shape: Optional[list[int]] = None
    total = (len(records) + shard_size - 1) // shard_size
    for shard in range(total):
        start = shard * shard_size
        chunk = records[start: start + shard_size]
        done = _existing_shard(folder, shard, key_hash, len(chunk))
        if done is None:
            tensors, done = encoder.encode(chunk, start)
            done = [SampleInfo(**{**asdict(i), "shard": shard}) for i in done]
            meta = {"key_hash": key_hash, "samples": json.dumps([asdict(i) for i in done])}
            tmp = folder / (shard_name(shard) + ".tmp")
            save_file(tensors, str(tmp), metadata=meta)
            tmp.replace(folder / shard_name(shard))
        else:
            logger.info("reusing finished shard %s", shard_name(shard))
        infos.extend(done)
        if progress is not None:
            progress(shard + 1, total)
    with safe_open(str(folder / shard_name(0)), framework="pt", device="cpu") as f:
        latent_shape = list(f.get_slice(tensor_name(0, "latent")).get_shape())
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "key": key.to_dict(), "latent_shape": latent_shape,
             "dataset_fingerprint": data_hash, "samples": [asdict(i) for i in infos]}
    tmp = folder / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    tmp.replace(folder / INDEX_NAME)
    logger.info("cached %d samples in %s", len(infos), folder)
    return FeatureCache(folder)
