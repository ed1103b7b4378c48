"""Soak: a bounded queue of mixed prompts against a local ComfyUI, watching the server's memory.

Starts ComfyUI on 127.0.0.1 through the test harness (tests/comfyui/harness.py: temporary base
directory, the pack symlinked in, in-memory database), with the bundled demo model when
unifusion/demo/assets/ holds it, else a tiny random model built here (tests/comfyui/
tiny_unifusion.py) under the demo names. Then it runs ``--prompts`` prompts one after another,
cycling through text-to-image, single and multi-reference edits, Verifi rewrites (greedy and
sampled), the one-node Text Encode, odd sizes and batches; every seventh prompt repeats the one
before it unchanged (served from ComfyUI's cache), the others change text, seed or inputs.

Every ``--every`` prompts it records the server's resident memory (VmRSS). It prints the RSS
series, the growth from the end of the warm-up (``--warmup`` prompts) to the end (goal: < 5 %),
how many prompts completed, and whether every image a history entry lists exists on disk.
Exit status 1 when a prompt failed or an output file is missing.

Run: ``COMFYUI_DIR=/path/to/ComfyUI OMP_NUM_THREADS=1 python benchmarks/soak.py [--prompts 100]``
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "comfyui"), str(REPO)]

from harness import ComfyServer, PromptFailed, find_comfyui  # noqa: E402
from unifusion.bundled import ASSETS_DIR, DEMO_CHECKPOINT, DEMO_VAE, DEMO_VAE_PATH, DEMO_VLM  # noqa: E402

logger = logging.getLogger("benchmarks.soak")
GROWTH_GOAL = 0.05
TEXTS = ("a red circle", "two blue squares on the left", "a green triangle above a yellow star",
         "three small pink hearts", "a big orange ring in the center")


def loaders(layers: str = "paper") -> dict:
    return {
        "vlm": {"class_type": "UniFusionVLMLoader", "inputs": {"vlm": DEMO_VLM, "dtype": "default", "layers": layers}},
        "model": {"class_type": "UniFusionModelLoader",
                  "inputs": {"checkpoint": DEMO_CHECKPOINT, "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": DEMO_VAE}},
    }


def sample(positive: str, seed: int, steps: int, size: tuple[int, int] = (64, 64), batch: int = 1) -> dict:
    return {
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [positive, 0]}},
        "latent": {"class_type": "EmptyLatentImage",
                   "inputs": {"width": size[0], "height": size[1], "batch_size": batch}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "positive": [positive, 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "soak"}},
    }


def references(count: int, color: int) -> dict:
    nodes: dict = {}
    previous = None
    for i in range(count):
        nodes[f"img{i}"] = {"class_type": "EmptyImage", "inputs": {
            "width": 48 + 16 * i, "height": 40, "batch_size": 1, "color": (color * (i + 1)) & 0xFFFFFF}}
        inputs = {"image": [f"img{i}", 0], "max_tiles": 2}
        if previous:
            inputs["references"] = [previous, 0]
        nodes[f"ref{i}"] = {"class_type": "UniFusionReference", "inputs": inputs}
        previous = f"ref{i}"
    return nodes


def encode(text: str, refs: int = 0) -> dict:
    inputs = {"vlm": ["vlm", 0], "text": text, "system_prompt": ""}
    if refs:
        inputs["references"] = [f"ref{refs - 1}", 0]
    return {"enc": {"class_type": "UniFusionEncode", "inputs": inputs},
            "lap": {"class_type": "UniFusionLAPPool",
                    "inputs": {"model": ["model", 0], "features": ["enc", 0], "layer_gains": ""}}}


def t2i(i: int, steps: int) -> dict:
    return {**loaders(), **encode(TEXTS[i % len(TEXTS)]), **sample("lap", seed=i, steps=steps)}


def edit(i: int, steps: int) -> dict:
    refs = 1 + i % 3
    return {**loaders(), **references(refs, 0x113355 + 977 * i), **encode("make it blue", refs),
            **sample("lap", seed=i, steps=steps)}


def verifi(i: int, steps: int) -> dict:
    prompt = {**loaders(), **encode(""), **sample("lap", seed=i, steps=steps)}
    prompt["enc"] = {"class_type": "UniFusionVerifiRewrite", "inputs": {
        "vlm": ["vlm", 0], "text": TEXTS[i % len(TEXTS)], "system_prompt": "rewrite it in detail",
        "max_new_tokens": 16, "seed": i, "do_sample": i % 2 == 1}}
    return prompt


def text_encode(i: int, steps: int) -> dict:
    prompt = {**loaders(), **sample("te", seed=i, steps=steps)}
    prompt["te"] = {"class_type": "UniFusionTextEncode", "inputs": {
        "vlm": ["vlm", 0], "model": ["model", 0], "text": TEXTS[i % len(TEXTS)], "verifi": i % 4 == 3,
        "max_new_tokens": 12}}
    return prompt


def odd_size_batch(i: int, steps: int) -> dict:
    size = ((72, 64), (64, 88), (96, 96))[i % 3]
    return {**loaders("all"), **encode(TEXTS[i % len(TEXTS)]), **sample("lap", seed=i, steps=steps, size=size,
                                                                        batch=1 + i % 2)}


KINDS: tuple[Callable[[int, int], dict], ...] = (t2i, edit, verifi, text_encode, odd_size_batch)


def prompt_for(i: int, steps: int) -> tuple[str, dict]:
    """The i-th prompt; every seventh repeats the one before it unchanged (cycling the kinds)."""
    source = i - 1 if i % 7 == 6 else i
    kind = KINDS[source % len(KINDS)]
    return ("repeat " if source != i else "") + kind.__name__, kind(source, steps)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def link_model(server: ComfyServer, tiny_root: Path) -> str:
    """The bundled demo model when it is there (the pack lists it itself), else a tiny random one."""
    if all((ASSETS_DIR / name).exists() for name in (DEMO_VLM, DEMO_CHECKPOINT, DEMO_VAE_PATH)):
        return f"bundled demo model ({ASSETS_DIR})"
    from tiny_unifusion import build_tiny_files, link_tiny_files

    link_tiny_files(server, build_tiny_files(tiny_root))
    return "tiny random model (unifusion/demo/assets/ is empty)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10, help="prompts before the growth baseline")
    parser.add_argument("--every", type=int, default=10, help="record RSS every N prompts")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per prompt")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per prompt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Started in the background, a shell leaves SIGINT ignored; the harness stops ComfyUI with it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    comfy_dir = find_comfyui(REPO)
    if comfy_dir is None:
        logger.error("set COMFYUI_DIR=/path/to/ComfyUI")
        return 2
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    with tempfile.TemporaryDirectory(prefix="unifusion_soak_") as work:
        server = ComfyServer(comfy_dir, REPO, Path(work))
        with server:
            model = link_model(server, Path(work) / "tiny")
            logger.info("ComfyUI %s, %s, OMP_NUM_THREADS=%s, %d prompts", comfy_dir, model, threads, args.prompts)
            pid = server.process.pid
            series: list[tuple[int, float]] = [(0, rss_mb(pid))]
            completed, failures, outputs = 0, [], []
            start = time.monotonic()
            for i in range(args.prompts):
                name, prompt = prompt_for(i, args.steps)
                try:
                    entry = server.run(prompt, timeout=args.timeout)
                except PromptFailed as err:
                    failures.append(f"#{i} {name}: {err.node_type}: {err.exception_message.strip()}")
                else:
                    completed += 1
                    outputs += server.output_images(entry)
                if (i + 1) % args.every == 0:
                    series.append((i + 1, rss_mb(pid)))
                    logger.info("%4d prompts  RSS %7.1f MB  (%s)", i + 1, series[-1][1], name)
            elapsed = time.monotonic() - start
            files = set(outputs)  # a repeated prompt lists the files of the run it repeats
            missing = sorted(str(p) for p in files if not p.is_file())
    baseline = next((mb for n, mb in series if n >= args.warmup), series[0][1])
    final, peak = series[-1][1], max(mb for _, mb in series)
    growth = (final - baseline) / baseline
    logger.info("RSS (MB) every %d prompts: %s", args.every, ", ".join(f"{mb:.0f}" for _, mb in series))
    logger.info("growth after warm-up (%d prompts): %.1f MB -> %.1f MB = %+.2f %% (goal < %.0f %%: %s); peak %.1f MB",
                args.warmup, baseline, final, 100 * growth, 100 * GROWTH_GOAL,
                "met" if growth < GROWTH_GOAL else "MISSED", peak)
    logger.info("completed %d/%d prompts in %.0f s (%.2f s each); output files present at the end %d/%d",
                completed, args.prompts, elapsed, elapsed / max(args.prompts, 1), len(files) - len(missing), len(files))
    for line in failures + [f"missing {path}" for path in missing]:
        logger.info("  %s", line)
    return 0 if completed == args.prompts and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
