"""Memory plan of the paper-size models: weights, activation peaks, and what fits a 24 GB / 12 GB card.

Both models are built on the ``meta`` device (no memory): the VLM as InternVL2.5-8B (InternViT-300M
vision tower, 32-layer 4096-wide InternLM2.5-7B language model in the Llama layout), and our
DiT+LAP from ``config.paper_preset()``. For bf16, fp16 and fp8 weight storage the script prints:

- weight bytes of each part;
- the peak activation bytes of one DiT step at 1024x1024 (16x128x128 latent, patch 2: 4096 image
  tokens) with CFG batched (batch 2), for the paper's condition length: text ~256 tokens plus
  (4 tiles + thumbnail) x 256 tokens per reference, 0..3 references; also LAP Pool and the VLM;
- the same formula checked against a scaled-down DiT and LAP measured on CPU with the allocation
  tracker (benchmarks/common.cpu_peak_bytes), goal within 20 %;
- whether the VLM and the DiT each fit a 24 GB and a 12 GB card one at a time, as ComfyUI's
  manager loads them (weights + activations + ComfyUI's reserve), in bf16 or fp8;
- ComfyUI's own estimate (comfy.sampler_helpers.estimate_memory with the nodes' memory_usage_factor
  and extra_conds_shapes, flash-attention branch as on CUDA) against the formula: goal within 20 %.

The activation formula counts live tensors per phase of a block in units of ``batch x tokens x
width x activation bytes`` (see `block_phases`); it is exact for eager PyTorch up to small terms.

Run: ``python benchmarks/memory_plan.py`` (ComfyUI's estimate needs ``--comfyui DIR`` or $COMFYUI_DIR
and ComfyUI's interpreter; without it the nodes' pure replica of ComfyUI's formula is used).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MethodType, SimpleNamespace
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import GiB, MiB, comfyui_dir, cpu_peak_bytes, import_comfy, log_lines, pack_module  # noqa: E402
from benchmarks.common import setup, table, verdict  # noqa: E402
from unifusion.config import DiTConfig, LAPConfig, UniFusionConfig, paper_preset  # noqa: E402
from unifusion.lap import LAP_CHUNK_TOKENS as LAP_CHUNK  # noqa: E402

logger = logging.getLogger("benchmarks.memory_plan")

STORAGE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}  # weight storage; fp8 computes in bf16 (ComfyUI manual cast)
TEXT_TOKENS = 256
TOKENS_PER_TILE = 256  # InternVL: 448x448 tile -> 1024 patches -> pixel shuffle 0.5 -> 256 tokens
TILES_PER_REFERENCE = 5  # 4 tiles + thumbnail
LATENT = (16, 128, 128)  # FLUX VAE latent of a 1024x1024 image
CARDS_GIB = {"24 GB": 24.0, "12 GB": 12.0}
CUDA_CONTEXT = 0.5 * GiB  # CUDA context + cuBLAS workspace, not available to tensors
COMFY_RESERVE = 400 * MiB  # model_management.EXTRA_RESERVED_VRAM (Linux)
COMFY_MIN_INFERENCE = 0.8 * GiB + COMFY_RESERVE  # minimum_inference_memory(): what a VLM load keeps free
VERIFI_TOKENS = 128


def condition_tokens(references: int) -> int:
    """Condition tokens the DiT sees: the prompt's text plus every reference's tiles and thumbnail."""
    return TEXT_TOKENS + references * TILES_PER_REFERENCE * TOKENS_PER_TILE


# ---- weights ---------------------------------------------------------------------------------------

def paper_vlm_config():
    """InternVL2.5-8B in transformers' native layout: InternViT-300M-448px + InternLM2.5-7B (Llama layout)."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig

    text = LlamaConfig(vocab_size=92553, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                       rope_theta=1e6, tie_word_embeddings=False)
    return InternVLConfig(vision_config=InternVLVisionConfig(), text_config=text, downsample_ratio=0.5,
                          tie_word_embeddings=False)


def vlm_parameter_counts(config) -> dict[str, int]:
    """Parameters per part of the VLM, built on the meta device."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.model.named_children()}
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    counts["lm_head (Verifi only)"] = 0 if tied else model.lm_head.weight.numel()
    return counts


def unifusion_parameter_counts(cfg: UniFusionConfig) -> dict[str, int]:
    """Parameters of the DiT and of LAP + refiner (one module, one checkpoint), built on meta."""
    from unifusion.model import UniFusionModel

    model = UniFusionModel(cfg, device="meta")
    return {"dit": sum(p.numel() for p in model.dit.parameters()),
            "lap + refiner": sum(p.numel() for p in model.lap.parameters())}


# ---- activations -----------------------------------------------------------------------------------

def rms_norm_units(act_bytes: int, device: str) -> float:
    """Live units while q/k RMSNorm runs on a strided (B, heads, N, dim) view, output included.
    Measured on CPU: 16-bit upcasts to float32 (copy, product, cast back) = 6; fp32: copy + output
    = 2. CUDA is taken as copy + output (2) in any dtype (not measured here)."""
    if device == "cpu" and act_bytes < 4:
        return 6.0
    return 2.0


def block_phases(act_bytes: int, mlp_ratio: float, device: str, rope: bool, held: float) -> dict[str, float]:
    """Live units of one pre-norm transformer block per phase; a unit is one (batch, tokens, width)
    tensor in the activation dtype. ``held`` = tensors the caller keeps alive during the block (its
    input, and for the DiT the context and image tokens). float32 temporaries count 4/act_bytes."""
    f32 = 4.0 / act_bytes
    attn_in = held + 1 + 3  # normalised/modulated input, fused qkv
    phases = {
        "q/k norm": attn_in + 1 + rms_norm_units(act_bytes, device),  # q normalised, k being normalised
        "attention": attn_in + 2 + 2,  # q, k normalised, attention output and its (B, N, D) copy
        "mlp": held + 1 + 1 + 2 * mlp_ratio,  # residual after attention, normalised input, fc1 and activation
    }
    if device == "cpu" and act_bytes < 4:  # unifusion.attention runs CPU attention on float32 q, k, v, output
        phases["attention"] = attn_in + 2 + 4 * f32
    if rope:  # q rotated; k upcast to float32 (16-bit only), two float32 products and their sum
        phases["rope"] = attn_in + 2 + 1 + (f32 if act_bytes < 4 else 0.0) + 3 * f32
    return phases


@dataclass(frozen=True)
class Estimate:
    peak: float  # bytes
    phases: dict[str, float]  # bytes per phase
    unit: float  # bytes of one unit


def dit_step_bytes(dit: DiTConfig, batch: int, latent_tokens: int, cond_tokens: int, act_bytes: int,
                   device: str = "cuda", cast_weight_bytes: int = 0) -> Estimate:
    """Peak activation bytes of one DiT forward (weights excluded). Held during every block: the
    block input and the context + image tokens kept by the forward; plus RoPE tables in float32.
    ``cast_weight_bytes``: the largest weight cast per Linear call (ComfyUI manual cast, e.g. fp8)."""
    tokens = latent_tokens + cond_tokens
    unit = float(batch * tokens * dit.hidden_size * act_bytes)
    phases = {k: v * unit for k, v in block_phases(act_bytes, dit.mlp_ratio, device, rope=True, held=2.0).items()}
    phases["mlp"] += cast_weight_bytes
    rope_tables = batch * tokens * dit.head_dim * 2 * 4  # (B, 1, N, dim/2, 2, 2) float32
    phases = {k: v + rope_tables for k, v in phases.items()}
    return Estimate(max(phases.values()), phases, unit)


def lap_bytes(lap: LAPConfig, batch: int, tokens: int, act_bytes: int, device: str = "cuda",
              with_input: bool = True) -> Estimate:
    """Peak activation bytes of LAP + refiner on ``tokens`` condition tokens. LAP runs its blocks on
    (tokens, L layers, H): a unit is tokens x L x H; the refiner (tokens x H, with RoPE) is 1/L of
    that and never the peak. ``with_input`` adds the (B, S, L, H) features themselves."""
    unit = float(batch * tokens * lap.num_vlm_layers * lap.vlm_hidden_size * act_bytes)
    held = 1.0 + (1.0 if with_input else 0.0)
    phases = {k: v * unit for k, v in block_phases(act_bytes, lap.mlp_ratio, device, rope=False, held=held).items()}
    return Estimate(max(phases.values()), phases, unit)


def vlm_bytes(config, tokens: int, images: int, selected_layers: int, act_bytes: int,
              new_tokens: int = 0) -> Estimate:
    """Rough peak of one VLM encode (analytic only, not measured): the decoder MLP phase
    (residual, normed input, activation, up projection, their product), the selected-layer capture
    buffer, the vision tower's MLP phase over all tiles, and the KV cache when Verifi generates."""
    text, vision = config.text_config, config.vision_config
    unit = float(tokens * text.hidden_size * act_bytes)
    ratio = text.intermediate_size / text.hidden_size
    kv_dim = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    vision_tokens = images * ((vision.image_size[0] // vision.patch_size[0]) ** 2 + 1)
    parts = {
        "decoder layer": (2 + 3 * ratio) * unit,
        "layer capture": selected_layers * unit,
        "vision tower": vision_tokens * vision.hidden_size * act_bytes * (2 + 2 * vision.intermediate_size
                                                                        / vision.hidden_size),
        "kv cache": (2 * text.num_hidden_layers * (tokens + new_tokens) * kv_dim * act_bytes) if new_tokens else 0.0,
    }
    peak = parts["layer capture"] + parts["kv cache"] + max(parts["decoder layer"], parts["vision tower"])
    return Estimate(peak, parts, unit)


# ---- measurement -----------------------------------------------------------------------------------

def measure_dit_step(dit: DiTConfig, batch: int, side: int, cond: int, dtype: torch.dtype) -> int:
    """Peak bytes of one DiT forward on CPU (allocation tracker), weights and inputs excluded."""
    from unifusion.dit import UniFusionDiT

    torch.manual_seed(0)
    model = UniFusionDiT(dit, dtype=dtype).eval()
    x = torch.randn(batch, dit.in_channels, side, side, dtype=dtype)
    context = torch.randn(batch, cond, dit.hidden_size, dtype=dtype)
    t = torch.rand(batch)
    with torch.inference_mode():
        model(x[:, :, :dit.patch_size, :dit.patch_size], t, context[:, :1])  # lazy initialisation
        peak, _ = cpu_peak_bytes(lambda: model(x, t, context))
    return peak


def measure_lap(lap: LAPConfig, tokens: int, dtype: torch.dtype) -> int:
    """Peak bytes of LAP + refiner on CPU (features allocated before: excluded)."""
    from unifusion.lap import LAPConditioner

    torch.manual_seed(0)
    model = LAPConditioner(lap, dtype=dtype).eval()
    features = torch.randn(1, tokens, lap.num_vlm_layers, lap.vlm_hidden_size, dtype=dtype)
    with torch.inference_mode():
        model(features[:, :2])
        peak, _ = cpu_peak_bytes(lambda: model(features))
    return peak


# ---- ComfyUI's estimate ----------------------------------------------------------------------------

def comfy_estimate_bytes(cfg: UniFusionConfig, batch: int, cond_tokens: int, dtype: torch.dtype,
                         comfy_dir: Optional[Path]) -> tuple[float, str]:
    """ComfyUI's memory_required for one sampling call (cond + uncond), flash branch as on CUDA.
    With ComfyUI importable: its own estimate_memory over the nodes' UniFusionBaseModel methods
    (memory_required counts the condition tokens once per latent); else the nodes' pure replica
    (nodes/memory.py)."""
    memory = pack_module("nodes.memory")
    factor = memory.memory_usage_factor(cfg.dit)
    latent = (batch, *LATENT)
    if comfy_dir is None:
        return memory.comfy_estimate_bytes(factor, (2 * batch, *LATENT), 2 * cond_tokens * batch, cfg.dit.patch_size,
                                           torch.finfo(dtype).bits // 8), "nodes/memory.py replica"
    mm = import_comfy(comfy_dir)
    import comfy.model_base
    import comfy.sampler_helpers

    nodes_model = pack_module("nodes.model")
    probe = SimpleNamespace(memory_usage_factor=factor, memory_usage_factor_conds=("c_crossattn",),
                            memory_usage_shape_process={}, manual_cast_dtype=None,
                            unifusion_config=cfg, get_dtype=lambda: dtype)
    probe.extra_conds_shapes = MethodType(nodes_model.UniFusionBaseModel.extra_conds_shapes, probe)
    base_required = MethodType(comfy.model_base.BaseModel.memory_required, probe)

    def required(shape, cond_shapes={}):  # noqa: B006 (ComfyUI's own signature)
        # UniFusionBaseModel.memory_required, on a probe that is not a BaseModel
        return base_required(shape, memory.batch_scaled_cond_shapes(shape, cond_shapes))

    probe.memory_required = required
    cond = {"cross_attn": torch.empty(1, cond_tokens, cfg.dit.hidden_size, device="meta")}
    flash = mm.pytorch_attention_flash_attention
    mm.pytorch_attention_flash_attention = lambda: True  # what a CUDA machine with PyTorch attention takes
    try:
        needed, _ = comfy.sampler_helpers.estimate_memory(SimpleNamespace(model=probe), latent,
                                                           {"positive": [cond], "negative": [dict(cond)]})
    finally:
        mm.pytorch_attention_flash_attention = flash
    return float(needed), "ComfyUI estimate_memory"


# ---- report ----------------------------------------------------------------------------------------

def gib(value: float) -> str:
    return f"{value / GiB:.2f}"




def report_weights(vlm_counts: dict[str, int], uni_counts: dict[str, int]) -> None:
    logger.info("== Weights (parameters built on meta) ==")
    parts = {f"VLM {k}": v for k, v in vlm_counts.items()}
    parts.update({f"UniFusion {k}": v for k, v in uni_counts.items()})
    parts["VLM total"] = sum(vlm_counts.values())
    parts["DiT + LAP total"] = sum(uni_counts.values())
    rows = [(k, f"{v / 1e9:.3f}", *(gib(v * b) for b in STORAGE_BYTES.values())) for k, v in parts.items()]
    log_lines(table(("part", "params (B)", *(f"{k} GiB" for k in STORAGE_BYTES)), rows))


def report_activations(cfg: UniFusionConfig, vlm_config, latent_tokens: int) -> dict[str, dict[int, float]]:
    """Peaks per number of references: DiT step (worst of bf16 and fp8 storage), LAP Pool, VLM."""
    logger.info("== Activation peaks, 16-bit compute (bf16/fp16, and fp8 storage cast to bf16), CUDA accounting ==")
    logger.info("DiT step at 1024x1024: %d latent tokens, batch 2 (cond + uncond); units of 2 x tokens x %d x 2 B",
                latent_tokens, cfg.dit.hidden_size)
    fc1 = int(cfg.dit.hidden_size * cfg.dit.mlp_ratio) * cfg.dit.hidden_size * 2
    peaks: dict[str, dict[int, float]] = {"dit": {}, "lap": {}, "lap chunked": {}, "vlm": {}}
    rows = []
    for r in range(4):
        s = condition_tokens(r)
        est = dit_step_bytes(cfg.dit, 2, latent_tokens, s, 2)
        est8 = dit_step_bytes(cfg.dit, 2, latent_tokens, s, 2, cast_weight_bytes=fc1)
        lap = lap_bytes(cfg.lap, 1, s, 2)
        chunk = lap_bytes(cfg.lap, 1, min(s, LAP_CHUNK), 2, with_input=False).peak + lap.unit  # + all features
        images = r * TILES_PER_REFERENCE
        prompt = TEXT_TOKENS + images * TOKENS_PER_TILE + 64  # + system prompt and chat template
        vlm = vlm_bytes(vlm_config, prompt, images, cfg.lap.num_vlm_layers, 2, VERIFI_TOKENS)
        peaks["dit"][r], peaks["lap"][r], peaks["lap chunked"][r] = max(est.peak, est8.peak), lap.peak, chunk
        peaks["vlm"][r] = vlm.peak
        phase = max(est.phases, key=est.phases.get)
        rows.append((r, s, latent_tokens + s, gib(est.peak), gib(est8.peak), f"{phase} {est.peak / est.unit:.2f}",
                     gib(lap.peak), gib(chunk), gib(vlm.peak)))
    logger.info("LAP Pool pools %d tokens at a time (unifusion.lap.LAP_CHUNK_TOKENS); the one-pass column is "
                "what it would need without chunks", LAP_CHUNK)
    log_lines(table(("refs", "cond tok", "tokens", "DiT GiB", "DiT fp8 GiB", "peak phase (units)", "LAP one pass GiB",
                     f"LAP ({LAP_CHUNK}-token chunks) GiB", "VLM+Verifi GiB"), rows))
    logger.info("VLM: analytic only (decoder MLP phase, %d captured layers, vision tower, KV cache of %d new tokens)",
                cfg.lap.num_vlm_layers, VERIFI_TOKENS)
    return peaks


def report_measured() -> None:
    logger.info("== Formula vs measured (CPU, allocation tracker, scaled-down configs; goal within 20%) ==")
    small_dit = DiTConfig(in_channels=16, patch_size=2, hidden_size=512, depth=2, num_heads=4, time_embed_dim=128,
                          rope_axes=(32, 48, 48))
    small_lap = LAPConfig(vlm_hidden_size=256, num_vlm_layers=10, out_dim=512, num_heads=4, refiner_heads=4)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        size, name = torch.finfo(dtype).bits // 8, str(dtype).split(".")[1]
        side, cond = 32, 64
        measured = measure_dit_step(small_dit, 2, side, cond, dtype)
        formula = dit_step_bytes(small_dit, 2, (side // 2) ** 2, cond, size, device="cpu").peak
        rows.append(("DiT step", name, f"{measured / MiB:.2f}", f"{formula / MiB:.2f}", formula / measured,
                     verdict(abs(formula / measured - 1), 0.2)))
        measured = measure_lap(small_lap, 128, dtype)
        formula = lap_bytes(small_lap, 1, 128, size, device="cpu", with_input=False).peak
        rows.append(("LAP + refiner", name, f"{measured / MiB:.2f}", f"{formula / MiB:.2f}", formula / measured,
                     verdict(abs(formula / measured - 1), 0.2)))
    log_lines(table(("module", "dtype", "measured MiB", "formula MiB", "formula/measured", "goal"), rows))


def report_fit(cfg: UniFusionConfig, weights: dict[str, int], peaks: dict[str, dict[int, float]]) -> None:
    logger.info("== Fit one model at a time: weights + max(activations + %d MiB, ComfyUI's reservation) <= card "
                "- %.1f GiB CUDA context; 3 references ==", COMFY_RESERVE // MiB, CUDA_CONTEXT / GiB)
    memory = pack_module("nodes.memory")
    factor = memory.memory_usage_factor(cfg.dit)
    # load_models_gpu keeps max(minimum_inference_memory, minimum estimate + reserve) free; the minimum
    # estimate is one latent and one condition (ComfyUI then runs cond and uncond apart if short).
    dit_reserve = max(COMFY_MIN_INFERENCE, memory.comfy_estimate_bytes(
        factor, (1, *LATENT), condition_tokens(3), cfg.dit.patch_size, 2) + COMFY_RESERVE)
    models = {"VLM": (weights["vlm"], peaks["vlm"][3], COMFY_MIN_INFERENCE),
              "DiT + LAP": (weights["unifusion"], max(peaks["dit"][3], peaks["lap chunked"][3]), dit_reserve)}
    # The VLM loader's fp8 storage keeps the LM head in 16 bits (it picks Verifi's tokens).
    exact = {"VLM": weights["vlm lm_head"], "DiT + LAP": 0}
    rows = []
    for card, size_gib in CARDS_GIB.items():
        usable = size_gib * GiB - CUDA_CONTEXT
        for storage in ("bf16", "fp8"):
            for name, (params, act, reserve) in models.items():
                stored = (params - exact[name]) * STORAGE_BYTES[storage] + exact[name] * 2
                need = stored + max(act + COMFY_RESERVE, reserve)
                rows.append((card, name, storage, gib(stored), gib(act), gib(reserve), gib(need), gib(usable),
                             "fits" if need <= usable else "no"))
    log_lines(table(("card", "model", "storage", "weights GiB", "act GiB", "ComfyUI keeps GiB", "need GiB",
                     "usable GiB", "full load"), rows))


def report_comfy(cfg: UniFusionConfig, latent_tokens: int, comfy_dir: Optional[Path]) -> None:
    logger.info("== ComfyUI's estimate vs the formula (DiT step, bf16 compute; goal within 20%) ==")
    rows, source = [], ""
    for batch in (1, 4):
        for r in range(4):
            s = condition_tokens(r)
            comfy, source = comfy_estimate_bytes(cfg, batch, s, torch.bfloat16, comfy_dir)
            formula = dit_step_bytes(cfg.dit, 2 * batch, latent_tokens, s, 2).peak
            ratio = comfy / formula
            rows.append((batch, r, s, gib(comfy), gib(formula), ratio, verdict(abs(ratio - 1), 0.2)))
    logger.info("source of ComfyUI's figure: %s; latent batch 1 and 4 (the model sees 2 x batch sequences)", source)
    log_lines(table(("batch", "refs", "cond tok", "ComfyUI GiB", "formula GiB", "ComfyUI/formula", "goal"), rows))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", help="ComfyUI checkout for its own estimate (default: $COMFYUI_DIR)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    setup(args.threads)
    comfy_dir = comfyui_dir(args.comfyui)
    if comfy_dir is not None:
        import_comfy(comfy_dir)  # its start-up lines print here, not inside the tables
    pack_module("nodes.memory")
    cfg, vlm_config = paper_preset(), paper_vlm_config()
    latent_tokens = LATENT[1] * LATENT[2] // cfg.dit.patch_size**2
    vlm_counts, uni_counts = vlm_parameter_counts(vlm_config), unifusion_parameter_counts(cfg)
    report_weights(vlm_counts, uni_counts)
    logger.info("")
    peaks = report_activations(cfg, vlm_config, latent_tokens)
    logger.info("")
    report_measured()
    logger.info("")
    report_fit(cfg, {"vlm": sum(vlm_counts.values()), "unifusion": sum(uni_counts.values()),
                     "vlm lm_head": vlm_counts["lm_head (Verifi only)"]}, peaks)
    logger.info("")
    report_comfy(cfg, latent_tokens, comfy_dir)


if __name__ == "__main__":
    main()
