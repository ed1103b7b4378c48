"""The training recipe as options and small pure functions.

Randomness is counter-based: every micro-batch draws from its own generator, seeded from
(seed, step, micro-batch, process). Data order is a fresh permutation per epoch, seeded
from (seed, epoch). A resumed run therefore needs only the step counter to continue with
exactly the batches, timesteps, noise and dropout it would have seen without the stop,
on any device (noise is drawn on the CPU and then moved).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import torch
from torch import Tensor

from ..flow import sample_training_timesteps
from .errors import TrainConfigError

STAGES = ("t2i", "edit", "mixed")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "bf16", "fp16")
# Options that may change between a run and its resume without breaking exactness.
RESUMABLE_CHANGES = frozenset({"steps", "save_every", "keep_last", "log_every"})


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters on the DiT's Linear layers (names relative to the DiT, fnmatch patterns)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise TrainConfigError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise TrainConfigError("LoRA targets are empty; give at least one module name pattern")


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run (paper recipe defaults where the paper gives them)."""

    steps: int = 1000
    batch_size: int = 32  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 3e-4
    # LR of the condition path (LAP + refiner) relative to ``lr``. Below 1 it keeps LAP close to
    # its init while the DiT learns to read it (see DemoRecipe.condition_lr_scale).
    condition_lr_scale: float = 1.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "constant"  # after warmup: constant or cosine down to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    max_grad_norm: Optional[float] = 1.0
    ema_decay: float = 0.999  # 0 turns EMA off
    ema_warmup: bool = True  # decay ramps up as (1 + n) / (10 + n) early on
    mixed_precision: str = "no"
    seed: int = 0
    cond_dropout: float = 0.1  # probability a sample's condition is replaced by the null condition
    recon_prob: float = 0.03  # probability a micro-batch is a reconstruction batch
    verifi_prob: float = 0.0  # probability a sample uses its Verifi features (1 = always)
    timestep_shift: Optional[float] = None  # None: resolution_shift of the latent token count
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # 0: plain MSE on the latents. p > 0: MSE after whitening their channels to Cov^-p, estimated
    # from the cache (`latent_metric`), so the low-variance directions that carry fine shape count.
    loss_whitening: float = 0.0
    stage: str = "t2i"  # t2i samples, edit samples, or both
    # Stage "mixed": each edit sample stands this many times in the pool the batches are drawn from,
    # so edits get a larger share of the steps without dropping any text-to-image sample.
    edit_repeat: int = 1
    init_from: Optional[str] = None  # release checkpoint to start from (e.g. the T2I model for editing)
    gradient_checkpointing: bool = False
    # Run the forward (LAP + DiT) through torch.compile (inductor, dynamic shapes); its backward is
    # compiled with it. About a third less time per step on CPU for the demo's model, after minutes of
    # compiling (benchmarks/train_compile.py); needs a C++ compiler on CPU, and trains other bits than
    # eager (other kernels round differently).
    compile: bool = False
    # AdamW's fused kernel (one pass over every parameter) instead of its per-tensor loop: on the demo's
    # model 5 ms less per step on CPU; the same update up to rounding.
    fused_optimizer: bool = False
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    lora: Optional[LoRAConfig] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoRAConfig(**self.lora))
        positive = ("steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every", "edit_repeat")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cond_dropout", "recon_prob", "verifi_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TrainConfigError(f"TrainConfig.{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainConfigError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.condition_lr_scale < 0:
            raise TrainConfigError(f"condition_lr_scale must be >= 0 (0 freezes LAP), got {self.condition_lr_scale}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise TrainConfigError(f"lr must be > 0 and warmup_steps >= 0, got {self.lr} and {self.warmup_steps}")
        for name, allowed in (("stage", STAGES), ("schedule", SCHEDULES), ("mixed_precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise TrainConfigError(f"TrainConfig.{name} must be one of {list(allowed)}, "
                                       f"got {getattr(self, name)!r}")
        if not 0.0 <= self.loss_whitening <= 1.0:
            raise TrainConfigError(f"loss_whitening is a power in [0, 1] (0 = plain MSE), got {self.loss_whitening}")
        if self.timestep_shift is not None and self.timestep_shift <= 0:
            raise TrainConfigError(f"timestep_shift must be > 0, got {self.timestep_shift}")

    @property
    def kinds(self) -> tuple[str, ...]:
        return {"t2i": ("t2i",), "edit": ("edit",), "mixed": ("t2i", "edit")}[self.stage]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise TrainConfigError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**raw)

    def resume_conflicts(self, other: "TrainConfig") -> list[str]:
        """Options that differ and would make a resume inexact ('name: saved X, now Y')."""
        out = []
        for f in fields(self):
            if f.name in RESUMABLE_CHANGES:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: saved {a!r}, now {b!r}")
        return out


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers; distinct tuples give unrelated streams."""
    digest = hashlib.sha256("/".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def micro_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, step, micro, rank))


@functools.lru_cache(maxsize=4)
def epoch_order(pool_size: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of epoch ``epoch`` (cached: every micro-batch of an epoch reads it)."""
    return torch.randperm(pool_size, generator=torch.Generator().manual_seed(derived_seed(seed, -1, epoch)))


def sample_indices(pool_size: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start+count`` of the endless stream of per-epoch permutations of
    ``range(pool_size)`` (epoch ``e`` shuffled with seed (seed, e))."""
    out: list[int] = []
    position = start
    while len(out) < count:
        epoch, offset = divmod(position, pool_size)
        take = min(pool_size - offset, count - len(out))
        out.extend(epoch_order(pool_size, seed, epoch)[offset: offset + take].tolist())
        position += take
    return out


@dataclass
class MicroPlan:
    """What one micro-batch does: which features each sample uses and which conditions drop."""

    recon: bool  # reconstruction batch: condition = the VLM's encoding of the target image
    variants: list[str]  # per sample: "plain", "verifi" or "recon"
    drop: Tensor  # (B,) bool: condition replaced by the null condition
    timesteps: Tensor = field(default_factory=lambda: torch.empty(0))  # (B,) float32
    noise_seed: int = 0


def plan_micro_batch(gen: torch.Generator, batch: int, cfg: TrainConfig, has_verifi: bool, has_recon: bool,
                     shift: float) -> MicroPlan:
    """Draw the recipe's random choices for one micro-batch from ``gen`` (order fixed)."""
    recon = bool(torch.rand((), generator=gen) < cfg.recon_prob) and has_recon
    use_verifi = torch.rand(batch, generator=gen) < cfg.verifi_prob
    drop = torch.rand(batch, generator=gen) < cfg.cond_dropout
    t = sample_training_timesteps(batch, generator=gen, shift=shift, mean=cfg.logit_mean, std=cfg.logit_std)
    noise_seed = int(torch.randint(0, 2**62, (), generator=gen))
    if recon:
        variants = ["recon"] * batch
    else:
        variants = ["verifi" if v and has_verifi else "plain" for v in use_verifi.tolist()]
    return MicroPlan(recon, variants, drop, t.float(), noise_seed)
