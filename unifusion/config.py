"""Configuration dataclasses for UniFusion.

A checkpoint stores one `UniFusionConfig` as JSON in its safetensors metadata, so the
loader can rebuild the modules and check that the VLM in use is the one the checkpoint
was trained with.

Layer numbering convention (used everywhere in the project): layer ``k`` means the
output of decoder layer ``k`` counted from 1, i.e. ``hidden_states[k]`` of a
transformers model for every ``k`` below the layer count, captured *before* any final
norm (for ``k == num_layers`` transformers applies the final norm, our hooks do not).
Layer 0 is the input of decoder layer 1: the token embeddings, with any image features
merged in (``hidden_states[0]``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Classifier-free guidance applies only at noise levels DEFAULT_GUIDANCE_MIN_T <= t <= DEFAULT_GUIDANCE_MAX_T; outside
# that interval the conditional velocity alone steers ("guidance in a limited interval", Kynkaanniemi et al., 2024).
# At the highest noise levels, where the layout is decided, guidance pushes what a prompt leaves open into every place
# at once: the demo model drew prompts that name no place with too many shapes. At the lowest it sharpens what is
# already drawn and changes the shapes an edit should keep. Chosen on the validation split (192 prompts and 96 edits,
# 20 Euler steps, CFG 4, shift 1.6), text-to-image count / exact and edits exact / identity:
#   every step 79 / 63% and 46 / 79%;  t <= 0.8: 85 / 67% and 45 / 74%;  t >= 0.5: 77 / 66% and 50 / 83%;
#   0.5-0.8: 84 / 72% and 50 / 79%;  0.3-0.8 and 0.4-0.8: 84 / 72% and 49 / 78%;  0.6-0.8: 84 / 73% and 50 / 78%;
#   0.4-0.9: 83 / 72% and 52 / 80%;  0.5-0.85: 84 / 72% and 49 / 78%.
# Only 7 of 20 steps (at shift 1.6) then run the unconditional pass. (0, 1) guides every step. These live here,
# not in flow.py, so that the CLI reads them without importing torch.
DEFAULT_GUIDANCE_MIN_T = 0.5
DEFAULT_GUIDANCE_MAX_T = 0.8


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def default_layer_selection(num_layers: int, every: int = 3) -> tuple[int, ...]:
    """Every ``every``-th layer starting at ``every + 1``: for 32 layers and N=3 this is
    4, 7, ..., 31 as in the paper (first and last layers carry little for generation)."""
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    if every < 1:
        raise ConfigError(f"layer stride must be >= 1, got {every}")
    layers = tuple(range(every + 1, num_layers, every))
    # Tiny models may have fewer layers than the stride: fall back to the middle layer.
    return layers or (max(1, num_layers // 2),)


@dataclass(frozen=True)
class VLMIdentity:
    """What a checkpoint expects of its frozen VLM encoder."""

    architecture: str
    num_layers: int
    hidden_size: int
    selected_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "selected_layers", tuple(int(i) for i in self.selected_layers))
        if not self.selected_layers:
            raise ConfigError("VLMIdentity.selected_layers is empty: select at least one layer")
        bad = [i for i in self.selected_layers if not 0 <= i <= self.num_layers]
        if bad:
            raise ConfigError(
                f"selected layers {bad} are outside 0..{self.num_layers} for a {self.num_layers}-layer VLM "
                "(0 is the input embeddings)"
            )

    def mismatches(self, other: "VLMIdentity") -> list[str]:
        """Fields that differ, each as 'name: expected X, found Y' (empty when compatible)."""
        out = []
        for name in ("architecture", "num_layers", "hidden_size"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: expected {a}, found {b}")
        return out


POOLING_MODES = ("attention", "last", "mean")


@dataclass(frozen=True)
class LAPConfig:
    """Layerwise Attention Pooling plus the bidirectional refiner."""

    vlm_hidden_size: int
    num_vlm_layers: int  # L: how many VLM layers are stacked per token
    out_dim: int  # DiT width the condition tokens are projected to
    num_heads: int = 8
    num_blocks: int = 2  # transformer blocks attending across the layer axis
    refiner_blocks: int = 2  # bidirectional blocks over the condition tokens
    refiner_heads: int = 8
    mlp_ratio: float = 4.0
    # "attention" is LAP. "last" (deepest selected layer) and "mean" (mean over the selected
    # layers) are the paper's ablation baselines, trained with the same pipeline.
    pooling: str = "attention"

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ConfigError(f"LAPConfig.pooling must be one of {list(POOLING_MODES)}, got {self.pooling!r}")
        for name in ("vlm_hidden_size", "num_vlm_layers", "out_dim", "num_heads", "refiner_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"LAPConfig.{name} must be >= 1")
        if self.vlm_hidden_size % self.num_heads:
            raise ConfigError(
                f"LAPConfig: vlm_hidden_size {self.vlm_hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.vlm_hidden_size % self.refiner_heads:
            raise ConfigError(
                f"LAPConfig: vlm_hidden_size {self.vlm_hidden_size} is not divisible by refiner_heads {self.refiner_heads}"
            )


@dataclass(frozen=True)
class DiTConfig:
    """Single-stream DiT over [condition tokens; latent tokens]."""

    in_channels: int = 16  # latent channels (16 for the FLUX VAE)
    patch_size: int = 2
    hidden_size: int = 1024
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    time_embed_dim: int = 256  # width of the timestep embedding feeding adaLN
    rope_axes: tuple[int, int, int] = (16, 24, 24)  # (condition index, latent row, latent column); sums to head dim
    rope_theta: float = 10000.0
    # Add a fixed 2-D sin/cos embedding of (row, column) to the latent tokens. RoPE alone tells a
    # latent token only where it is relative to other tokens; on a small grid whose objects sit at
    # fixed places this lets each token know its place outright (parameter-free, any resolution).
    absolute_position: bool = False
    # The network's head guesses the clean latent x0 and the forward returns the velocity
    # (x_t - x0) / t from it, so samplers (ours and ComfyUI's) and the flow loss stay as they are.
    # A latent that lies on a thin manifold (a few discrete scenes) is easier to guess than the
    # noise-dominated velocity, whose x0 part is a small share at high noise. t is floored at
    # X0_MIN_T in that division.
    predict_x0: bool = False
    # Image tokens that cover the whole frame in a grid (InternVL's single tile or thumbnail, a Qwen
    # image) take the RoPE row/column of the latent tokens they lie over, so a latent token finds the
    # part of a reference image at its own place by relative position instead of from the VLM's
    # features alone (the condition index axis is unchanged). Needs ``context_positions``.
    image_positions: bool = False
    # Each latent token also gets the features of the reference image token(s) over it (placed as in
    # ``image_positions``, the nearest ones; several references averaged) through a zero-initialised
    # linear layer (``image_injection`` weights), beside attention. Attention has to learn to pick the
    # few tokens over a shape out of all of them; the demo's DiT, after its edit finetune, read a kind
    # wrong in 1 of 10 shapes of multi-shape references while a linear probe on those same
    # condition tokens read 98-99%. Adds nothing without ``context_positions`` or without placed tokens.
    image_injection: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_axes", tuple(int(a) for a in self.rope_axes))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"DiTConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        head_dim = self.hidden_size // self.num_heads
        if sum(self.rope_axes) != head_dim or any(a % 2 for a in self.rope_axes):
            raise ConfigError(
                f"DiTConfig: rope_axes {self.rope_axes} must be even and sum to the head dim {head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class UniFusionConfig:
    """Everything needed to rebuild DiT+LAP and check the VLM they were trained with."""

    vlm: VLMIdentity
    lap: LAPConfig
    dit: DiTConfig
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. training VAE name)

    def __post_init__(self) -> None:
        if self.lap.num_vlm_layers != len(self.vlm.selected_layers):
            raise ConfigError(
                f"LAP expects {self.lap.num_vlm_layers} layers but the VLM selection has "
                f"{len(self.vlm.selected_layers)} ({list(self.vlm.selected_layers)})"
            )
        if self.lap.vlm_hidden_size != self.vlm.hidden_size:
            raise ConfigError(
                f"LAP input width {self.lap.vlm_hidden_size} differs from VLM hidden size {self.vlm.hidden_size}"
            )
        if self.lap.out_dim != self.dit.hidden_size:
            raise ConfigError(f"LAP output width {self.lap.out_dim} differs from DiT width {self.dit.hidden_size}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "UniFusionConfig":
        try:
            raw = json.loads(text)
            return cls(
                vlm=_build(VLMIdentity, raw["vlm"]),
                lap=_build(LAPConfig, raw["lap"]),
                dit=_build(DiTConfig, raw["dit"]),
                extra=dict(raw.get("extra", {})),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"unreadable UniFusion config ({exc}); the checkpoint metadata is damaged") from exc


def _build(cls: type, raw: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{cls.__name__} has no fields {sorted(unknown)}; the checkpoint is from a newer version")
    return cls(**raw)


def make_config(
    vlm: VLMIdentity,
    dit: DiTConfig,
    lap_heads: int = 8,
    refiner_blocks: int = 2,
    extra: dict[str, Any] | None = None,
) -> UniFusionConfig:
    """Build a consistent config whose LAP matches the VLM and the DiT."""
    lap = LAPConfig(
        vlm_hidden_size=vlm.hidden_size,
        num_vlm_layers=len(vlm.selected_layers),
        out_dim=dit.hidden_size,
        num_heads=lap_heads,
        refiner_heads=lap_heads,
        refiner_blocks=refiner_blocks,
    )
    return UniFusionConfig(vlm=vlm, lap=lap, dit=dit, extra=dict(extra or {}))


def tiny_preset(vlm: VLMIdentity | None = None) -> UniFusionConfig:
    """A few-hundred-thousand-parameter model for tests."""
    vlm = vlm or VLMIdentity("InternVLForConditionalGeneration", 8, 64, default_layer_selection(8))
    dit = DiTConfig(in_channels=4, patch_size=1, hidden_size=64, depth=2, num_heads=4, time_embed_dim=32,
                    rope_axes=(4, 6, 6))
    return make_config(vlm, dit, lap_heads=4, refiner_blocks=1)


def paper_preset() -> UniFusionConfig:
    """InternVL2.5-8B encoder (InternLM2.5-7B language model: 32 layers, width 4096) and an
    ~8B single-stream DiT+LAP on the 16-channel FLUX VAE latent."""
    vlm = VLMIdentity("InternVLForConditionalGeneration", 32, 4096, default_layer_selection(32))
    dit = DiTConfig(in_channels=16, patch_size=2, hidden_size=4096, depth=32, num_heads=32,
                    time_embed_dim=1024, rope_axes=(32, 48, 48))
    return make_config(vlm, dit, lap_heads=32, refiner_blocks=2)


PRESETS = {"tiny": tiny_preset, "paper": paper_preset}
