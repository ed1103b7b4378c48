"""A whole text-to-image run through a real ComfyUI against the standalone UniFusionPipeline.

ComfyUI side: a headless server (tests/comfyui/harness.py, started once, start-up excluded) runs
``workflows/text_to_image.json`` converted to an API prompt (tests/comfyui/ui_workflow.py): VLM
encode, LAP Pool, KSampler (euler, simple) with CFG against ConditioningZeroOut, VAE decode,
SaveImage. Pipeline side: `UniFusionPipeline.generate` with the settings read from that same API
prompt (text, seed, steps, CFG, size, shift, guidance interval), then the image saved as PNG like
SaveImage does.

Both sides load the same files: the bundled demo (``unifusion/demo/assets/``) when present, else a
tiny random model built like tests/comfyui/tiny_unifusion.py. Models load once per side (a warm-up
run each); every timed repeat changes the prompt text and the seed, identically on both sides, so
ComfyUI's node cache cannot skip the encode. Runs alternate between the sides so background load
hits both. Figures per side: CPU seconds (of the server process / of this process; one torch thread
on both sides) and wall seconds (ComfyUI: its own execution_start -> execution_success timestamps,
so HTTP polling is excluded). Goal: ComfyUI / pipeline <= 1.1.

Run with ComfyUI's interpreter, so both sides use the same torch:
``/path/to/ComfyUI/.venv/bin/python benchmarks/comfy_vs_pipeline.py --comfyui /path/to/ComfyUI``
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "comfyui"))

from benchmarks.common import comfyui_dir, import_comfy, interleaved, log_lines, median, pack_module  # noqa: E402
from benchmarks.common import process_cpu_seconds, setup, table, verdict  # noqa: E402
from harness import ComfyServer  # noqa: E402
from ui_workflow import ui_to_api  # noqa: E402
from unifusion.bundled import ASSETS_DIR, DEMO_CHECKPOINT, DEMO_VAE, DEMO_VAE_PATH, DEMO_VLM  # noqa: E402
from unifusion.pipeline import UniFusionPipeline  # noqa: E402
from unifusion.train.trainer import has_cpp_compiler  # noqa: E402

logger = logging.getLogger("benchmarks.comfy_vs_pipeline")
WORKFLOW = REPO / "workflows" / "text_to_image.json"
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "gray")


@dataclass(frozen=True)
class Settings:
    """What one text-to-image run does, as the API prompt says it."""

    text: str
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    batch: int
    shift: float
    guidance: tuple[float, float]  # UniFusion Guidance Interval's (guidance_min_t, guidance_max_t)


@dataclass(frozen=True)
class Timing:
    cpu: float
    wall: float
    image: np.ndarray  # (H, W, 3) uint8


def model_files(work: Path) -> tuple[dict[str, Path], str]:
    """The bundled demo files when they exist, else a tiny random model (built once under ``work``)."""
    bundled = {"unifusion_vlm": ASSETS_DIR / DEMO_VLM, "diffusion_models": ASSETS_DIR / DEMO_CHECKPOINT,
               "vae": ASSETS_DIR / DEMO_VAE_PATH}
    if all(p.exists() for p in bundled.values()):
        return bundled, f"bundled demo model ({ASSETS_DIR})"
    from tiny_unifusion import build_tiny_files

    tiny = build_tiny_files(work / "tiny")
    return ({"unifusion_vlm": tiny.vlm, "diffusion_models": tiny.checkpoint, "vae": tiny.vae},
            "tiny random model (tests/comfyui/tiny_unifusion.py; the demo assets are not trained yet)")


def nodes_of(prompt: dict[str, Any], class_type: str) -> list[dict[str, Any]]:
    return [node for node in prompt.values() if node["class_type"] == class_type]


def only(prompt: dict[str, Any], class_type: str) -> dict[str, Any]:
    found = nodes_of(prompt, class_type)
    if len(found) != 1:
        raise ValueError(f"{WORKFLOW.name}: expected one {class_type} node, found {len(found)}")
    return found[0]["inputs"]


def with_run(prompt: dict[str, Any], text: str, seed: int, steps: Optional[int] = None,
             size: Optional[tuple[int, int]] = None) -> dict[str, Any]:
    """The API prompt with another prompt text and seed (and optionally step count and image size)."""
    prompt = copy.deepcopy(prompt)
    only(prompt, "UniFusionEncode")["text"] = text
    sampler = only(prompt, "KSampler")
    sampler["seed"] = seed
    if steps is not None:
        sampler["steps"] = steps
    if size is not None:
        only(prompt, "EmptyLatentImage").update(width=size[0], height=size[1])
    return prompt


def guidance_interval_of(prompt: dict[str, Any]) -> tuple[float, float]:
    """The (guidance_min_t, guidance_max_t) of the prompt's UniFusion Guidance Interval node."""
    node = only(prompt, "UniFusionGuidanceInterval")
    return float(node["guidance_min_t"]), float(node["guidance_max_t"])


def settings_of(prompt: dict[str, Any]) -> Settings:
    """Read the run's settings from the API prompt, so the pipeline does exactly what ComfyUI does."""
    sampler, latent = only(prompt, "KSampler"), only(prompt, "EmptyLatentImage")
    if (sampler["sampler_name"], sampler["scheduler"], float(sampler["denoise"])) != ("euler", "simple", 1.0):
        raise ValueError(f"{WORKFLOW.name}: the pipeline runs euler / simple / denoise 1.0, the workflow has "
                         f"{sampler['sampler_name']} / {sampler['scheduler']} / {sampler['denoise']}")
    return Settings(text=only(prompt, "UniFusionEncode")["text"], seed=int(sampler["seed"]),
                    steps=int(sampler["steps"]), cfg=float(sampler["cfg"]), width=int(latent["width"]),
                    height=int(latent["height"]), batch=int(latent["batch_size"]),
                    shift=float(only(prompt, "ModelSamplingAuraFlow")["shift"]),
                    guidance=guidance_interval_of(prompt))


def run_comfy(server: ComfyServer, prompt: dict[str, Any]) -> Timing:
    pid = server.process.pid
    before = process_cpu_seconds(pid)
    entry = server.run(prompt, timeout=900)
    cpu = process_cpu_seconds(pid) - before
    stamps = {event: data["timestamp"] for event, data in entry["status"]["messages"] if "timestamp" in data}
    wall = (stamps["execution_success"] - stamps["execution_start"]) / 1000.0
    paths = [p for p in server.output_images(entry) if p.parent == server.output_dir]
    return Timing(cpu, wall, np.asarray(Image.open(paths[0]).convert("RGB")))


def run_pipeline(pipe: UniFusionPipeline, s: Settings, out_dir: Path, index: int) -> Timing:
    cpu, wall = time.process_time(), time.perf_counter()
    images = pipe.sample(pipe.encode(s.text), s.width, s.height, steps=s.steps, cfg_scale=s.cfg, seed=s.seed,
                         batch_size=s.batch, shift=s.shift,  # the workflow's ModelSamplingAuraFlow shift
                         guidance_min_t=s.guidance[0], guidance_max_t=s.guidance[1])  # and its Guidance Interval
    for i, image in enumerate(images):
        image.save(out_dir / f"pipeline_{index:03d}_{i}.png", compress_level=4)  # as SaveImage
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return Timing(cpu, wall, np.asarray(images[0]))


def stage_breakdown(comfy_dir: Path, comfy_args: list[str], files: dict[str, Path], s: Settings,
                    pipe: UniFusionPipeline, repeats: int, compile_model: bool = False
                    ) -> tuple[list[tuple], list[tuple]]:
    """The same stages in this process, without the server: our node functions and ComfyUI's own
    KSampler / VAEDecode code against the pipeline's encode and sample (which includes the decode).
    With ``compile_model``, also ComfyUI's sample + decode on the MODEL after its TorchCompileModel
    node (inductor; compiled in the untimed warm-up) against the same MODEL eager, timed in turn."""
    import_comfy(comfy_dir, args=comfy_args)
    import comfy.sd
    import comfy.utils
    import nodes as comfy_nodes  # ComfyUI's nodes.py
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm lines in this process's output
    vlm_nodes, model_nodes, encoding, guidance = (pack_module(f"nodes.{m}")
                                                  for m in ("vlm", "model", "encoding", "guidance"))
    # 'all', as the workflow captures: the demo checkpoint pools layer 0, which 'paper' leaves out
    vlm = vlm_nodes.load_vlm_patcher(files["unifusion_vlm"], "default", "all")
    model = model_nodes.load_model_patcher(files["diffusion_models"], vae_path=files["vae"])
    model = guidance.limit_guidance(ModelSamplingAuraFlow().patch_aura(model, s.shift)[0], *s.guidance)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files["vae"])))
    latent = comfy_nodes.EmptyLatentImage().generate(s.width, s.height, s.batch)[0]

    def comfy_encode() -> list:
        return encoding.lap_conditioning(model, encoding.encode_features(vlm, s.text, None))

    positive = comfy_encode()
    negative = comfy_nodes.ConditioningZeroOut().zero_out(positive)[0]

    def sample_decode(patcher: Any) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            samples = comfy_nodes.common_ksampler(patcher, s.seed, s.steps, s.cfg, "euler", "simple", positive,
                                                  negative, latent)[0]
            return comfy_nodes.VAEDecode().decode(vae, samples)[0]
        return run

    comfy_sample_decode = sample_decode(model)

    condition = pipe.encode(s.text)
    stages = {
        "encode + LAP": (comfy_encode, lambda: pipe.encode(s.text)),
        "sample + decode": (comfy_sample_decode, lambda: pipe.sample(condition, s.width, s.height, steps=s.steps,
                                                                     cfg_scale=s.cfg, seed=s.seed, batch_size=s.batch,
                                                                     shift=s.shift,
                                                                     guidance_min_t=s.guidance[0],
                                                                     guidance_max_t=s.guidance[1])),
    }
    rows, compile_rows = [], []
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        for name, (ours, theirs) in stages.items():
            times = interleaved({"comfy": ours, "pipeline": theirs}, repeats)
            c, p = median(times["comfy"]), median(times["pipeline"])
            rows.append((name, c, p, c / p))
        if compile_model:
            from comfy_api.torch_helpers import set_torch_compile_wrapper  # what the TorchCompileModel node calls

            compiled = model.clone()
            set_torch_compile_wrapper(model=compiled, backend="inductor")
            times = interleaved({"eager": comfy_sample_decode, "compiled": sample_decode(compiled)}, repeats)
            e, c = median(times["eager"]), median(times["compiled"])
            compile_rows.append(("sample + decode", e, c, c / e))
    return rows, compile_rows


def compare(server: ComfyServer, files: dict[str, Path], pipe: UniFusionPipeline, out_dir: Path, repeats: int,
            steps: Optional[int] = None, size: Optional[tuple[int, int]] = None,
            ) -> tuple[Settings, list[Timing], list[Timing]]:
    """Link the files under the demo names, then run the workflow and the pipeline alternately:
    one warm-up run each (model loads), then ``repeats`` timed runs with new text and seed each."""
    names = {"unifusion_vlm": DEMO_VLM, "diffusion_models": DEMO_CHECKPOINT, "vae": DEMO_VAE}
    for folder, path in files.items():
        server.link_model(folder, path, names[folder])
    template = ui_to_api(json.loads(WORKFLOW.read_text(encoding="utf-8")), server.object_info())
    base = settings_of(template)
    out_dir.mkdir(parents=True, exist_ok=True)
    comfy_runs, pipe_runs = [], []
    settings = base
    for r in range(repeats + 1):
        text = base.text.replace("red", COLOURS[r % len(COLOURS)], 1)
        prompt = with_run(template, text, base.seed + r, steps, size)
        settings = settings_of(prompt)
        results = {}
        for side in ("comfy", "pipeline") if r % 2 == 0 else ("pipeline", "comfy"):
            results[side] = run_comfy(server, prompt) if side == "comfy" else run_pipeline(pipe, settings, out_dir, r)
        if r > 0:
            comfy_runs.append(results["comfy"])
            pipe_runs.append(results["pipeline"])
    return settings, comfy_runs, pipe_runs


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_DIR)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="override the workflow's step count")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="override the workflow's image size (more work per step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="also time ComfyUI's sample + decode after its TorchCompileModel node (inductor) against "
                             "the eager MODEL; needs a C++ compiler on PATH")
    parser.add_argument("--comfy-arg", action="append", default=[], dest="comfy_args",
                        help="extra ComfyUI command-line argument (repeatable), e.g. --comfy-arg=--use-pytorch-"
                             "cross-attention for the attention ComfyUI uses on NVIDIA GPUs")
    args = parser.parse_args(argv)
    if args.compile and not has_cpp_compiler():
        raise SystemExit("--compile: inductor builds its CPU kernels with a C++ compiler; install g++ (or clang++) "
                         "or leave out --compile")
    setup(args.threads)
    comfy_dir = comfyui_dir(args.comfyui)
    if comfy_dir is None:
        raise SystemExit("comfy_vs_pipeline.py runs a ComfyUI server: pass --comfyui DIR or set COMFYUI_DIR")
    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server's torch threads too

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files, label = model_files(work)
        pipe = UniFusionPipeline.from_files(files["unifusion_vlm"], files["diffusion_models"], files["vae"])
        with ComfyServer(comfy_dir, REPO, work / "server", extra_args=tuple(args.comfy_args)) as server:
            settings, comfy_runs, pipe_runs = compare(server, files, pipe, work / "pipeline", args.repeats,
                                                      args.steps, args.size)
        stages, compile_rows = stage_breakdown(comfy_dir, args.comfy_args, files, settings, pipe, args.repeats,
                                               args.compile)
    report(label, settings, comfy_runs, pipe_runs, args.comfy_args)
    logger.info("In-process stages (no server; CPU seconds, median of %d; ComfyUI's KSampler/VAEDecode code, our "
                "node functions):", args.repeats)
    log_lines(table(("stage", "ComfyUI nodes", "pipeline", "ratio"), stages, floatfmt="{:.4f}"))
    if compile_rows:
        logger.info("TorchCompileModel (inductor) on the MODEL, in-process, CPU seconds, median of %d, timed in turn "
                    "with the eager MODEL after an untimed compiling run each:", args.repeats)
        log_lines(table(("stage", "eager", "compiled", "compiled/eager"), compile_rows, floatfmt="{:.4f}"))
    comfy_total = median([t.cpu for t in comfy_runs])
    logger.info("server cost outside these stages (whole ComfyUI run - in-process stages; a difference of noisy "
                "medians): %.4f s CPU", comfy_total - sum(row[1] for row in stages))


def report(label: str, settings: Settings, comfy_runs: list[Timing], pipe_runs: list[Timing],
           comfy_args: list[str]) -> None:
    logger.info("Text-to-image: ComfyUI (workflows/text_to_image.json, extra arguments %s) vs UniFusionPipeline; %s",
                " ".join(comfy_args) or "none", label)
    logger.info("%dx%d, %d steps, CFG %.1f, shift %.1f, batch %d; torch %s, %d thread(s) each side; median of %d "
                "runs after a warm-up, prompt text and seed changed every run", settings.width, settings.height,
                settings.steps, settings.cfg, settings.shift, settings.batch, torch.__version__,
                torch.get_num_threads(), len(comfy_runs))
    rows = []
    for clock in ("cpu", "wall"):
        c = median([getattr(t, clock) for t in comfy_runs])
        p = median([getattr(t, clock) for t in pipe_runs])
        rows.append((f"{clock} s", c, p, c / p, verdict(c / p, 1.1)))
    log_lines(table(("clock", "ComfyUI", "pipeline", "ComfyUI/pipeline", "goal <= 1.1"), rows, floatfmt="{:.4f}"))
    diffs = [int(np.abs(a.image.astype(int) - b.image.astype(int)).max()) for a, b in zip(comfy_runs, pipe_runs)]
    logger.info("same prompt and seed -> largest pixel difference between the two sides' images: %s (of 255)",
                diffs)


if __name__ == "__main__":
    main()
