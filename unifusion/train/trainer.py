"""Train UniFusionModel (LAP + refiner + DiT together) on a feature cache with accelerate.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` samples per process.
Each micro-batch follows the paper's recipe (see `recipe`): rectified-flow loss with
logit-normal, resolution-shifted timesteps (measured in whitened latent channels when
``loss_whitening`` is set, see `latent_metric`); condition dropout to the null (all-zero)
condition with the mask kept, for classifier-free guidance; a small share of
reconstruction batches conditioned on the VLM's encoding of the target image; Verifi
features with a probability. The same code runs single-process on CPU and under
``accelerate launch`` (DDP, FSDP); states are our own safetensors + JSON folders
(`state`) and resume exactly.

Ctrl-C: the first one finishes the current step, saves a state and returns with
``interrupted=True``; a second one aborts at once without saving. A KeyboardInterrupt
raised by a callback (after a finished step) also saves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..checkpoint import load_state_dict
from ..config import UniFusionConfig
from ..flow import flow_matching_loss, resolution_shift
from ..model import UniFusionModel
from .cache import FeatureCache, collate
from .ema import EMA
from .latent_metric import metric_sample, whitening_matrix
from .errors import CacheError, TrainConfigError, TrainStateError
from .lora import add_lora
from .recipe import TrainConfig, derived_seed, learning_rate, micro_generator, plan_micro_batch, sample_indices
from .state import load_state, read_meta, save_state

logger = logging.getLogger(__name__)

LOSS_LOG = "loss.jsonl"


def training_pool(cache: FeatureCache, config: TrainConfig) -> list[int]:
    """Cache indices the batches are drawn from: the stage's samples, each edit sample
    ``config.edit_repeat`` times in the mixed stage."""
    pool = cache.indices(config.kinds)
    if config.stage != "mixed" or config.edit_repeat == 1:
        return pool
    return [i for i in pool for _ in range(config.edit_repeat if cache.samples[i].kind == "edit" else 1)]


class TrainingModel(nn.Module):
    """LAP + dropout + DiT as one forward, so DDP/FSDP see every parameter used in one call.
    Its submodules are the UniFusionModel's own ``lap`` and ``dit``: state-dict keys agree."""

    def __init__(self, model: UniFusionModel) -> None:
        super().__init__()
        self.lap, self.dit = model.lap, model.dit

    def forward(self, x: Tensor, timesteps: Tensor, features: Tensor, mask: Tensor, drop: Tensor,
                positions: Optional[Tensor] = None) -> Tensor:
        context = self.lap(features, mask)  # (B, S, D)
        context = torch.where(drop[:, None, None], UniFusionModel.null_condition(context), context)  # CFG dropout
        return self.dit(x, timesteps, context, mask, positions)  # (B, C, H, W)


def compiled_forward(module: nn.Module, device: torch.device) -> Callable[..., Tensor]:
    """``module`` through ``torch.compile`` with dynamic shapes from the first call: batches are padded to
    their longest condition, so the sequence length changes every step, and one graph serves them all.
    Its CPU kernels read the thread count when they run (``cpp.dynamic_threads``), not when they were
    built: the demo's t2i changes it mid-stage.

    Each call first clears torch.compile's caches in this process (`torch.compiler.reset`): a new trainer's
    forward is another object (under mixed precision accelerate wraps it in a new autocast closure, which
    dynamo guards on), so without it every run in a process recompiles the same code, and past
    dynamo's ``recompile_limit`` (8) a later run silently falls back to eager (the demo's third edit cycle
    did). With it a run compiles as it would alone, whatever ran before it in the process."""
    check_compiler(device)
    torch.compiler.reset()
    return torch.compile(module, dynamic=True, options={"cpp.dynamic_threads": True})


def on_path(*names: str) -> bool:
    """Whether any of the programs ``names`` is on PATH."""
    return any(shutil.which(name) for name in names)


def has_cpp_compiler() -> bool:
    """Whether a C++ compiler is on PATH, which torch.compile's CPU kernels need (inductor builds them)."""
    return on_path("g++", "clang++", "c++")


def check_compiler(device: torch.device) -> None:
    """torch.compile builds its kernels at the first step: say what is missing before training. On the
    CPU (also a CPU run on a machine with a GPU) inductor writes C++, which needs a C++ compiler; on a
    CUDA device it writes Triton kernels, which need the triton package and a C compiler for the
    launcher Triton builds per kernel."""
    if device.type == "cpu" and not has_cpp_compiler():
        raise TrainConfigError("TrainConfig.compile needs a C++ compiler on PATH for torch.compile's CPU kernels "
                               "(none of g++, clang++, c++ found): install one (e.g. apt install g++) or turn "
                               "compile off")
    if device.type != "cuda":
        return
    if importlib.util.find_spec("triton") is None:
        raise TrainConfigError("TrainConfig.compile on a CUDA device needs the triton package for torch.compile's "
                               "GPU kernels: pip install triton (the CUDA builds of torch on Linux bring it) or "
                               "turn compile off")
    if not on_path("gcc", "clang", "cc"):
        raise TrainConfigError("TrainConfig.compile on a CUDA device needs a C compiler on PATH (none of gcc, "
                               "clang, cc found) for the launcher Triton builds per kernel: install one (e.g. "
                               "apt install gcc) or turn compile off")


def parameter_groups(module: TrainingModel, config: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters in two optimizer groups: the condition path (``lap.*``, LR scaled by
    ``config.condition_lr_scale``) and the rest; empty groups are left out."""
    groups = {"lap": [], "dit": []}
    for name, param in module.named_parameters():
        if param.requires_grad:
            groups["lap" if name.startswith("lap.") else "dit"].append(param)
    scale = {"lap": config.condition_lr_scale, "dit": 1.0}
    return [{"params": params, "lr_scale": scale[key]} for key, params in groups.items() if params]


@dataclass
class StepInfo:
    """Passed to callbacks after every optimizer step."""

    step: int  # optimizer steps done so far
    loss: float
    lr: float
    grad_norm: float
    recon_batches: int  # reconstruction micro-batches in this step (this process)


Callback = Callable[[StepInfo], None]


@dataclass
class TrainResult:
    step: int
    state_dir: Optional[Path]
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)  # one per step run in this call


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths where two nested config dicts differ: 'dit.depth: 4 vs 6'."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(config_differences(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} vs {vb!r}")
    return out


def _make_accelerator(cfg: TrainConfig) -> Any:
    """An Accelerator with the config's mixed precision. accelerate keeps one process-wide state
    and refuses a second precision; a single process (the demo's stages, a test run) may change
    it between runs, so that state is dropped first there. Distributed runs keep the error."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        state = AcceleratorState()
        if state.mixed_precision != cfg.mixed_precision and state.num_processes == 1:
            AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision)


class Trainer:
    """Holds model, optimizer, EMA and counters; `train` runs until ``config.steps``."""

    def __init__(self, model_config: UniFusionConfig, cache: FeatureCache, config: TrainConfig,
                 output_dir: str | Path, accelerator: Any = None, callbacks: Sequence[Callback] = (),
                 progress: bool = True) -> None:
        self.model_config, self.cache, self.config = model_config, cache, config
        self.output_dir = Path(output_dir)
        self.callbacks, self.show_progress = list(callbacks), progress
        self._check_cache()
        self.accelerator = accelerator or _make_accelerator(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(config.seed, -2))
            self.model = UniFusionModel(model_config)
        self.init_hash = self._init_weights()
        self.lora = None
        if config.lora is not None:
            lc = config.lora
            self.lora = add_lora(self.model, lc.rank, lc.alpha, lc.targets, seed=derived_seed(config.seed, -3))
        self.model.dit.gradient_checkpointing = config.gradient_checkpointing
        module = TrainingModel(self.model)
        self.trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(parameter_groups(module, config), lr=config.lr, betas=config.betas,
                                      eps=config.eps, weight_decay=config.weight_decay,
                                      fused=True if config.fused_optimizer else None)
        self.module, self.optimizer = self.accelerator.prepare(module, optimizer)
        # The compiled forward shares the module's parameters; state dicts and EMA keep the module's names.
        self.forward = compiled_forward(self.module, self.accelerator.device) if config.compile else self.module
        named = dict(self.accelerator.unwrap_model(self.module).named_parameters())
        self.ema = EMA({n: named[n] for n in sorted(self.trainable)}, config.ema_decay, config.ema_warmup) \
            if config.ema_decay > 0 else None
        self.pool = training_pool(cache, config)
        self.step = 0
        c, h, w = cache.latent_shape
        p = model_config.dit.patch_size
        self.shift = config.timestep_shift or resolution_shift(((h + p - 1) // p) * ((w + p - 1) // p))
        self.metric = self._loss_metric()
        self._stop_requested = False

    # --- setup -------------------------------------------------------------------------

    def _check_cache(self) -> None:
        cfg, cache = self.config, self.cache
        cache.check_model(self.model_config)
        if not cache.indices(cfg.kinds):
            raise TrainConfigError(f"the cache {cache.folder} has no {'/'.join(cfg.kinds)} samples for stage "
                                   f"{cfg.stage!r}; cache such samples or pick another stage")
        if cfg.verifi_prob > 0 and not cache.key.has_verifi:
            raise TrainConfigError(f"verifi_prob={cfg.verifi_prob} but the cache {cache.folder} has no Verifi "
                                   "features; rebuild it with verifi=True or set verifi_prob=0")
        if cfg.recon_prob > 0 and not cache.key.has_recon:
            raise TrainConfigError(f"recon_prob={cfg.recon_prob} but the cache {cache.folder} has no reconstruction "
                                   "features; rebuild it with recon=True or set recon_prob=0")
        if cfg.lora is not None and cfg.init_from is None:
            raise TrainConfigError("LoRA training needs init_from: the checkpoint whose DiT the adapters modify")

    def _init_weights(self) -> Optional[str]:
        """Load ``init_from`` (a release checkpoint); returns its identity for resume checks."""
        if self.config.init_from is None:
            return None
        state, head = load_state_dict(self.config.init_from)
        diffs = config_differences(json.loads(head.config.to_json()), json.loads(self.model_config.to_json()))
        diffs = [d for d in diffs if not d.startswith("extra.")]
        if diffs:
            raise TrainConfigError(
                f"init_from {self.config.init_from} has another model config than this run ({'; '.join(diffs)}; "
                "checkpoint vs run); train with the checkpoint's config (model_config=None uses it)"
            )
        self.model.load_state_dict(state, strict=True)
        return f"{Path(self.config.init_from).name}:{head.path.stat().st_size}"

    def _loss_metric(self) -> Optional[Tensor]:
        """The channel whitening of ``loss_whitening`` from a fixed sample of the pool's latents
        (None for plain MSE); the same sample on every run and resume."""
        if not self.config.loss_whitening:
            return None
        latents = torch.stack([self.cache.get(i, ()).latent for i in metric_sample(self.pool)])
        return whitening_matrix(latents, self.config.loss_whitening).to(self.accelerator.device)

    # --- state -------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        """What trainer.json records (JSON-normalised, so tuples compare equal to saved lists)."""
        return json.loads(json.dumps({
            "model_config": json.loads(self.model_config.to_json()),
            "train_config": self.config.to_dict(),
            "cache_key": self.cache.key.to_dict(),
            "dataset_fingerprint": self.cache.dataset_fingerprint,
            "world_size": self.accelerator.num_processes,
            "init_from": self.init_hash,
            "sampling_shift": self.shift,
            "scheduler": {"kind": f"warmup+{self.config.schedule}", "step": self.step,
                          "lr": learning_rate(self.config, max(self.step - 1, 0))},
        }))

    def save(self) -> Path:
        """Write a state for the current step (every process must call it)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        folder = save_state(self.output_dir, self.step, self.module, inner, self.trainable, self.ema, self._meta(),
                            is_main=self.accelerator.is_main_process, accelerator=self.accelerator,
                            keep_last=self.config.keep_last)
        self.accelerator.wait_for_everyone()
        return folder

    def resume(self, folder: str | Path) -> None:
        """Continue from a state folder; refuses states of another model, recipe, cache or world size."""
        folder = Path(folder)
        meta = read_meta(folder)
        now = self._meta()
        diffs = config_differences(meta["model_config"], now["model_config"])
        if diffs:
            raise TrainStateError(
                f"{folder} was trained with another model config ({'; '.join(diffs)}; saved vs this run). Resume "
                "with the saved config, or start a new output folder."
            )
        conflicts = TrainConfig.from_dict(meta["train_config"]).resume_conflicts(self.config)
        for label, a, b in (("init_from", meta.get("init_from"), now["init_from"]),
                            ("world_size", meta.get("world_size"), now["world_size"])):
            if a != b:
                conflicts.append(f"{label}: saved {a!r}, now {b!r}")
        if conflicts:
            raise TrainStateError(
                f"{folder} was trained with other training options ({'; '.join(conflicts)}); an exact resume needs the "
                "same ones (only steps/save_every/keep_last/log_every may change). Use the saved options or a new "
                "output folder."
            )
        cache_diffs = config_differences(meta["cache_key"], now["cache_key"])
        if cache_diffs or meta.get("dataset_fingerprint") != now["dataset_fingerprint"]:
            detail = "; ".join(cache_diffs) or "another dataset"
            raise CacheError(f"{folder} was trained on another feature cache ({detail}; saved vs now); resume with "
                             f"the cache it was trained on")
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        load_state(folder, self.module, inner, self.trainable, self.ema, accelerator=self.accelerator)
        self.step = int(meta["step"])
        self._truncate_log()
        logger.info("resumed from %s at step %d", folder, self.step)

    def _truncate_log(self) -> None:
        """Drop log lines past the resumed step (written after that state was saved)."""
        path = self.output_dir / LOSS_LOG
        if not path.is_file() or not self.accelerator.is_main_process:
            return
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= self.step]
        path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

    # --- training ------------------------------------------------------------------------

    def _micro_loss(self, micro: int) -> tuple[Tensor, bool]:
        cfg, acc = self.config, self.accelerator
        rank, world = acc.process_index, acc.num_processes
        gen = micro_generator(cfg.seed, self.step, micro, rank)
        plan = plan_micro_batch(gen, cfg.batch_size, cfg, self.cache.key.has_verifi, self.cache.key.has_recon,
                                self.shift)
        position = ((self.step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
        picks = sample_indices(len(self.pool), cfg.seed, position, cfg.batch_size)
        items = [self.cache.get(self.pool[i], [v]) for i, v in zip(picks, plan.variants)]
        param = next(self.module.parameters())
        places = [it.places[v] for it, v in zip(items, plan.variants)] if self.cache.key.frame_positions else None
        batch = collate([it.features[v] for it, v in zip(items, plan.variants)], [it.latent for it in items],
                        dtype=param.dtype, places=places).to(acc.device, param.dtype)
        noise_gen = torch.Generator().manual_seed(plan.noise_seed)
        noise = torch.randn(batch.latents.shape, generator=noise_gen).to(acc.device, param.dtype)
        loss = flow_matching_loss(lambda x, t, **kw: self.forward(x, t.to(x.dtype), **kw), batch.latents, noise,
                                  plan.timesteps.to(acc.device), features=batch.features, mask=batch.mask,
                                  drop=plan.drop.to(acc.device), positions=batch.positions, metric=self.metric)
        return loss, plan.recon

    def _optimizer_step(self) -> StepInfo:
        cfg, acc = self.config, self.accelerator
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        total, recon = 0.0, 0
        for micro in range(cfg.grad_accum):
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.module):
                loss, is_recon = self._micro_loss(micro)
                acc.backward(loss / cfg.grad_accum)
            total += float(loss.detach()) / cfg.grad_accum
            recon += int(is_recon)
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = acc.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        mean_loss = float(acc.reduce(torch.tensor(total, device=acc.device), reduction="mean"))
        return StepInfo(self.step, mean_loss, lr, float(norm) if norm is not None else float("nan"), recon)

    def _stop_agreed(self) -> bool:
        """All processes stop at the same step (saving is collective)."""
        flag = torch.tensor(float(self._stop_requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum") > 0)

    @contextlib.contextmanager
    def _sigint(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                self._abort = True
                raise KeyboardInterrupt  # second Ctrl-C: abort without saving
            self._stop_requested = True
            logger.warning("interrupt: saving after this step (press Ctrl-C again to abort without saving)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _log(self, infos: list[StepInfo], started: float, first_step: int) -> None:
        if not infos or not self.accelerator.is_main_process:
            return
        elapsed = time.monotonic() - started
        row = {"step": infos[-1].step, "loss": sum(i.loss for i in infos) / len(infos), "lr": infos[-1].lr,
               "grad_norm": infos[-1].grad_norm, "recon_batches": sum(i.recon_batches for i in infos),
               "elapsed_s": round(elapsed, 3), "steps_per_s": round((infos[-1].step - first_step) / elapsed, 4)}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / LOSS_LOG).open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def train(self) -> TrainResult:
        """Run optimizer steps until ``config.steps``; saves every ``save_every`` steps and at the end."""
        from tqdm.auto import tqdm

        cfg = self.config
        self.module.train()
        result = TrainResult(self.step, None)
        bar = tqdm(total=cfg.steps, initial=self.step, file=sys.stderr, desc="train", dynamic_ncols=True,
                   disable=not (self.show_progress and self.accelerator.is_main_process))
        pending: list[StepInfo] = []
        started, first = time.monotonic(), self.step
        self._stop_requested = self._abort = False
        try:
            with self._sigint():
                while self.step < cfg.steps:
                    info = self._optimizer_step()
                    result.losses.append(info.loss)
                    pending.append(info)
                    bar.update(1)
                    bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}")
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self._log(pending, started, first)
                        pending = []
                    for callback in self.callbacks:
                        callback(info)
                    if self._stop_agreed():
                        result.interrupted = True
                        break
                    if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        result.state_dir = self.save()
        except KeyboardInterrupt:
            if self._abort:
                raise
            self.optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is dropped
            result.interrupted = True
        finally:
            bar.close()
        if result.interrupted:
            self._log(pending, started, first)
            logger.warning("interrupted at step %d; saving a resumable state", self.step)
        result.state_dir = self.save()
        result.step = self.step
        return result
