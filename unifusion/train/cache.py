"""The feature cache: what training reads instead of running the VLM and the VAE.

Layout of a cache folder::

    index.json               format, the cache key, latent shape, one entry per sample
    shard-00000.safetensors  tensors "<i>.plain", "<i>.verifi", "<i>.recon", "<i>.latent"

Per sample ``i``: ``plain`` is the encoding of the prompt (T2I: the caption; editing: the
source images + instruction) already reduced to the tokens that condition the DiT
(`VLMFeatures.condition_tokens`: ``(S', L, H)``); ``verifi`` the same for the Verifi
rewrite under a fixed training system prompt (its text is in the index); ``recon`` the
encoding of the target image alone (an image-only prompt, for reconstruction batches);
``latent`` the VAE latent of the target ``(C, h, w)``, always float32. With
``frame_positions`` in the key, ``<i>.<variant>.places`` ``(S', 2)`` float32 holds where each
kept token lies on its image's frame grid (`VLMFeatures.condition_positions`, NaN for text).

Condition features are stored in ``bfloat16`` by default: LAP RMS-normalises every layer
vector before anything else, so bf16's ~3 significant digits lose nothing that matters,
while its float32 exponent keeps the VLM's outlier channels (which can overflow
float16). ``float32`` is there for exact comparisons; ``float16`` for caches that must
load on old hardware. Reading never needs the VLM: the key identifies it instead.

The key (VLM identity, selected layers, VLM and VAE fingerprints, prompts, tiling,
resolution, dtype) is compared whenever a cache is reused, so a cache built for another
VLM, another layer selection or another VAE is reported as stale instead of silently
training on the wrong features.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..config import UniFusionConfig, VLMIdentity
from .errors import CacheError

FORMAT_NAME = "unifusion-feature-cache"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
VARIANTS = ("plain", "verifi", "recon")
FEATURE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CacheKey:
    """Everything that decides the cached numbers; two caches with equal keys are interchangeable."""

    vlm: VLMIdentity
    vlm_fingerprint: str
    vae_fingerprint: str
    latent_channels: int
    resolution: tuple[int, int]  # (height, width) of the target images
    feature_dtype: str = "bfloat16"
    system_prompt: Optional[str] = None  # of the plain encoding (None: the template's default)
    max_tiles: int = 6  # per source image (editing)
    verifi_system_prompt: Optional[str] = None  # None: no Verifi features cached
    verifi_max_new_tokens: int = 128
    recon_tiles: Optional[int] = None  # None: no reconstruction features cached
    frame_positions: bool = False  # the frame positions of image tokens are stored (caches before them lack it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolution", tuple(int(v) for v in self.resolution))
        if self.feature_dtype not in FEATURE_DTYPES:
            raise CacheError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {self.feature_dtype!r}")

    @property
    def has_verifi(self) -> bool:
        return self.verifi_system_prompt is not None

    @property
    def has_recon(self) -> bool:
        return self.recon_tiles is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CacheKey":
        known = {f.name for f in fields(cls)}
        if set(raw) - known:
            raise CacheError(f"cache key has unknown fields {sorted(set(raw) - known)}; it was written by a newer "
                             "version")
        data = dict(raw)
        data["vlm"] = VLMIdentity(**data["vlm"])
        return cls(**data)

    def differences(self, other: "CacheKey") -> list[str]:
        """'field: this X, other Y' for every field that differs."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, VLMIdentity) and isinstance(b, VLMIdentity):
                out.extend(f"vlm.{g.name}: {_short(getattr(a, g.name))} vs {_short(getattr(b, g.name))}"
                           for g in fields(a) if getattr(a, g.name) != getattr(b, g.name))
            elif a != b:
                out.append(f"{f.name}: {_short(a)} vs {_short(b)}")
        return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class SampleInfo:
    """The index entry of one cached sample."""

    shard: int
    kind: str  # "t2i" or "edit"
    text: str  # the caption or instruction that was encoded (after any truncation)
    origin: str  # dataset file:row or in-memory name[i]
    tokens: dict[str, int] = field(default_factory=dict)  # kept tokens per variant
    verifi_text: Optional[str] = None


@dataclass
class CachedSample:
    """One sample's condition features per variant and its target latent."""

    features: dict[str, Tensor]  # variant -> (S', L, H)
    latent: Tensor  # (C, h, w) float32
    info: SampleInfo
    places: dict[str, Tensor] = field(default_factory=dict)  # variant -> (S', 2), when the cache has them


@dataclass
class Batch:
    """A padded training batch; ``mask`` marks real condition tokens."""

    latents: Tensor  # (B, C, h, w)
    features: Tensor  # (B, S, L, H), zeros after each row's real tokens
    mask: Tensor  # (B, S) bool
    positions: Optional[Tensor] = None  # (B, S, 2) float32 frame positions, NaN where a token has none

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "Batch":
        return Batch(self.latents.to(device=device, dtype=dtype), self.features.to(device=device, dtype=dtype),
                     self.mask.to(device), None if self.positions is None else self.positions.to(device))


def collate(features: Sequence[Tensor], latents: Sequence[Tensor], dtype: Optional[torch.dtype] = None,
            places: Optional[Sequence[Tensor]] = None) -> Batch:
    """Stack latents and right-pad variable-length ``(S_i, L, H)`` features with a mask (and their
    ``(S_i, 2)`` frame positions with NaN, when given)."""
    if not features or len(features) != len(latents) or (places is not None and len(places) != len(features)):
        raise CacheError(f"collate needs one feature tensor (and one places tensor, when given) per latent, got "
                         f"{len(features)}, {len(latents)} and {None if places is None else len(places)}")
    dtype = dtype or features[0].dtype
    longest = max(max(int(f.shape[0]) for f in features), 1)
    l, h = features[0].shape[1:]
    out = torch.zeros(len(features), longest, l, h, dtype=dtype)
    mask = torch.zeros(len(features), longest, dtype=torch.bool)
    positions = None if places is None else torch.full((len(features), longest, 2), float("nan"))
    for row, f in enumerate(features):
        out[row, : f.shape[0]] = f.to(dtype)
        mask[row, : f.shape[0]] = True
        if positions is not None:
            positions[row, : f.shape[0]] = places[row].float()
    return Batch(torch.stack([x.float() for x in latents]), out, mask, positions)


def tensor_name(index: int, variant: str) -> str:
    return f"{index}.{variant}"


def places_name(index: int, variant: str) -> str:
    """The tensor of a variant's frame positions."""
    return f"{index}.{variant}.places"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


PRELOAD_LIMIT_BYTES = 2 << 30


class FeatureCache:
    """Read-only access to a cache folder. Shards are read into memory at once with
    ``preload=True``, memory-mapped and read per sample with ``False``; ``None`` preloads
    caches under 2 GiB (the demo's) and maps larger ones."""

    def __init__(self, folder: str | Path, preload: Optional[bool] = False) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX_NAME
        if not index_path.is_file():
            raise CacheError(f"{self.folder} is not a feature cache (no {INDEX_NAME}); build one with "
                             "`unifusion train cache` or build_cache()")
        try:
            raw = json.loads(index_path.read_text(encoding="utf-8"))
            if raw.get("format") != FORMAT_NAME:
                raise CacheError(f"{index_path} is not a UniFusion feature-cache index")
            if int(raw.get("version", 0)) > FORMAT_VERSION:
                raise CacheError(f"{index_path} was written by a newer version (format {raw['version']}); update")
            self.key = CacheKey.from_dict(raw["key"])
            self.latent_shape = tuple(int(v) for v in raw["latent_shape"])
            self.samples = [SampleInfo(**s) for s in raw["samples"]]
            self.dataset_fingerprint = str(raw.get("dataset_fingerprint", ""))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CacheError):
                raise
            raise CacheError(f"{index_path} is damaged ({exc}); rebuild the cache") from exc
        self._handles: dict[int, Any] = {}
        self._loaded: dict[int, dict[str, Tensor]] = {}
        if preload is None:
            size = sum(p.stat().st_size for p in self.folder.glob("shard-*.safetensors"))
            preload = size < PRELOAD_LIMIT_BYTES
        if preload:
            for shard in sorted({s.shard for s in self.samples}):
                self._loaded[shard] = {k: self._open(shard).get_tensor(k) for k in self._open(shard).keys()}
                self._handles.pop(shard, None)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(L, H): selected layers and VLM width."""
        return len(self.key.vlm.selected_layers), self.key.vlm.hidden_size

    def variants(self) -> tuple[str, ...]:
        return tuple(v for v in VARIANTS if v == "plain" or (v == "verifi" and self.key.has_verifi)
                     or (v == "recon" and self.key.has_recon))

    def indices(self, kinds: Sequence[str] = ("t2i", "edit")) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s.kind in kinds]

    def _open(self, shard: int) -> Any:
        if shard not in self._handles:
            path = self.folder / shard_name(shard)
            try:
                self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise CacheError(f"{path} is missing or damaged ({exc}); rebuild the cache") from exc
        return self._handles[shard]

    def _tensor(self, shard: int, name: str) -> Tensor:
        if shard in self._loaded:
            tensor = self._loaded[shard].get(name)
        else:
            handle = self._open(shard)
            tensor = handle.get_tensor(name) if name in handle.keys() else None
        if tensor is None:
            raise CacheError(f"{self.folder / shard_name(shard)} lacks tensor {name!r}; the cache is damaged, "
                             "rebuild it")
        return tensor

    def get(self, index: int, variants: Sequence[str] = ("plain",)) -> CachedSample:
        info = self.samples[index]
        missing = [v for v in variants if v not in self.variants()]
        if missing:
            raise CacheError(f"{self.folder} has no {'/'.join(missing)} features; rebuild the cache with them "
                             "(verifi=True / recon=True) or turn those options off")
        feats = {v: self._tensor(info.shard, tensor_name(index, v)) for v in variants}
        places = ({v: self._tensor(info.shard, places_name(index, v)) for v in variants}
                  if self.key.frame_positions else {})
        return CachedSample(feats, self._tensor(info.shard, tensor_name(index, "latent")), info, places)

    def check_model(self, config: UniFusionConfig, where: str = "the model config") -> None:
        """Raise CacheError when ``config`` cannot train on this cache (other VLM, layers or latent)."""
        problems = config.vlm.mismatches(self.key.vlm)
        if tuple(config.vlm.selected_layers) != tuple(self.key.vlm.selected_layers):
            problems.append(f"selected_layers: expected {list(config.vlm.selected_layers)}, "
                            f"found {list(self.key.vlm.selected_layers)}")
        if config.dit.in_channels != self.key.latent_channels:
            problems.append(f"latent channels: expected {config.dit.in_channels}, found {self.key.latent_channels}")
        if config.dit.image_positions and not self.key.frame_positions:
            problems.append("image_positions: the model places image tokens on the latent grid, the cache has no "
                            "frame positions (built by an older version)")
        if problems:
            raise CacheError(
                f"the cache {self.folder} was built for a {self.key.vlm.architecture} with layers "
                f"{list(self.key.vlm.selected_layers)} and a {self.key.latent_channels}-channel VAE, which does not "
                f"fit {where} ({'; '.join(problems)}). Rebuild the cache with the right VLM/VAE, or train a model "
                "config made from the cache (model_config_for_cache)."
            )

    def check_key(self, expected: CacheKey) -> None:
        """Raise CacheError naming the differences when this cache is stale for ``expected``."""
        diffs = self.key.differences(expected)
        if diffs:
            raise CacheError(
                f"the cache {self.folder} is stale: it was built with other settings or models "
                f"({'; '.join(diffs)}; cached vs now). Rebuild it (overwrite=True / --overwrite) or use another folder."
            )
