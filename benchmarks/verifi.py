"""Verifi speed: capture during generate against plain generate and against generate + re-encode.

Three ways to get a rewritten prompt, measured side by side in one run (same model,
same prompt with reference images, the same number of new tokens, greedy):

- ``verifi``: `verifi_rewrite` (generate with layer capture, one look-ahead token).
- ``generate``: build the same chat and run plain ``generate`` (no hooks): the floor.
- ``two-pass``: plain ``generate`` then one uncached forward of the base model over the
  whole sequence (prompt, image pixels through the vision tower again, generated
  tokens) inside a `LayerCapture`: what Verifi avoids. The image preprocessing is
  reused, so this side is, if anything, flattered.

Ratios: verifi / generate (goal <= 1.05) and two-pass / verifi (goal >= 1.3). Each figure
is the median of ``--repeats`` timed runs after one warm-up; the three methods run
interleaved in rotating order so background load hits them alike.

Run: ``python benchmarks/verifi.py [--family internvl] [--layers 12] [--hidden 384] ...``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unifusion.vlm.layers import LayerCapture  # noqa: E402
from unifusion.vlm.loader import LoadedVLM, load_vlm  # noqa: E402
from unifusion.vlm.prompt import build_prompt  # noqa: E402
from unifusion.vlm.tiny import FAMILIES, build_tiny_vlm  # noqa: E402
from unifusion.vlm.verifi import DEFAULT_SYSTEM_PROMPT, eos_token_ids, verifi_rewrite  # noqa: E402

logger = logging.getLogger("benchmarks.verifi")
TEXT = "make the red circle bigger and put a blue star on the left of the green square"


def reference_images(count: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    """RGB images with coloured blocks (content does not matter for speed)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = np.full((height, width, 3), 255, dtype=np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, height * 3 // 4), rng.integers(0, width * 3 // 4)
            pixels[y: y + height // 6, x: x + width // 6] = rng.integers(0, 255, 3)
        images.append(Image.fromarray(pixels))
    return images


def plain_generate(vlm: LoadedVLM, images: list, new_tokens: int, tiles: int):
    """Same chat as Verifi, plain generate of exactly `new_tokens` tokens, no hooks."""
    prompt = build_prompt(vlm, images + [TEXT], system_prompt=DEFAULT_SYSTEM_PROMPT, max_tiles=tiles)
    eos = eos_token_ids(vlm)
    sequence = vlm.model.generate(**prompt.model_kwargs(vlm.device, vlm.dtype), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=vlm.tokenizer.pad_token_id)
    vlm.tokenizer.decode(sequence[0, prompt.input_ids.shape[1]:].tolist(), skip_special_tokens=True)
    return prompt, sequence


def two_pass(vlm: LoadedVLM, images: list, new_tokens: int, tiles: int) -> torch.Tensor:
    """Generate, then re-encode prompt + generated tokens (vision tower included) in one forward."""
    prompt, sequence = plain_generate(vlm, images, new_tokens, tiles)
    kwargs = prompt.model_kwargs(vlm.device, vlm.dtype)
    kwargs["input_ids"] = sequence
    kwargs["attention_mask"] = torch.ones_like(sequence)
    if "mm_token_type_ids" in kwargs:
        extra = sequence.shape[1] - prompt.input_ids.shape[1]
        kwargs["mm_token_type_ids"] = torch.nn.functional.pad(kwargs["mm_token_type_ids"], (0, extra))
    with torch.no_grad(), LayerCapture(vlm.decoder_layers, vlm.selected_layers) as capture:
        vlm.base_model(**kwargs, use_cache=False)
    return capture.stacked()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds on an accelerator; on CPU the process's CPU seconds, which other jobs on a
    shared machine inflate far less than wall time (exact with ``--threads 1``)."""
    if device.type == "cpu":
        start = time.process_time()
        fn()
        return time.process_time() - start
    synchronize = torch.get_device_module(device.type).synchronize
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl",
                        help="qwen families give real image-token counts (256 per 448x448 area); the tiny InternVL "
                             "has 16 tokens per tile instead of 256")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers of the benchmark VLM")
    parser.add_argument("--hidden", type=int, default=384, help="hidden size (multiple of 16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated by every method")
    parser.add_argument("--images", type=int, default=1, help="reference images in the prompt")
    parser.add_argument("--image-size", type=int, nargs=2, default=(1024, 768), metavar=("W", "H"))
    parser.add_argument("--tiles", type=int, default=4, help="max tiles per image")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1 keeps timings stable on a small shared machine; 0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for name in ("transformers", "unifusion"):
        logging.getLogger(name).setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_vlm(Path(tmp) / args.family, args.family, num_layers=args.layers, hidden_size=args.hidden)
        vlm = load_vlm(folder, dtype=getattr(torch, args.dtype), device=args.device)
    images = reference_images(args.images, *args.image_size)
    n, tiles = args.new_tokens, args.tiles
    methods: dict[str, Callable[[], object]] = {
        "verifi": lambda: verifi_rewrite(vlm, TEXT, images, max_new_tokens=n, min_new_tokens=n, max_tiles=tiles),
        "generate": lambda: plain_generate(vlm, images, n, tiles),
        "two-pass": lambda: two_pass(vlm, images, n, tiles),
    }
    result = verifi_rewrite(vlm, TEXT, images, max_new_tokens=n, min_new_tokens=n, max_tiles=tiles)  # warm-up
    prompt, sequence = plain_generate(vlm, images, n, tiles)
    same = torch.equal(sequence[0, prompt.input_ids.shape[1]:].cpu(), result.token_ids)
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.repeats):
        for name in names[r % 3:] + names[: r % 3]:
            times[name].append(timed(methods[name], vlm.device))
    median = {name: statistics.median(values) for name, values in times.items()}

    clock = "CPU seconds of this process" if vlm.device.type == "cpu" else "wall seconds"
    logger.info("Verifi benchmark: %s, %d layers, width %d, %s %s, %d threads; %s, median of %d after warm-up",
                args.family, args.layers, args.hidden, args.device, args.dtype, torch.get_num_threads(), clock,
                args.repeats)
    logger.info("prompt %d tokens (%d image tokens from %d images, <= %d tiles each), %d new tokens, "
                "selected layers %s; verifi tokens == generate tokens: %s", prompt.input_ids.shape[1],
                int(prompt.is_image.sum()), args.images, tiles, n, list(vlm.selected_layers), same)
    logger.info("%-10s %10s %10s %10s", "method", "median", "min", "max")
    for name in names:
        logger.info("%-10s %10.4f %10.4f %10.4f", name, median[name], min(times[name]), max(times[name]))
    overhead = median["verifi"] / median["generate"]
    saving = median["two-pass"] / median["verifi"]
    logger.info("verifi / generate   = %.3f  (goal <= 1.05: %s)", overhead, "met" if overhead <= 1.05 else "NOT met")
    logger.info("two-pass / verifi   = %.3f  (goal >= 1.3:  %s)", saving, "met" if saving >= 1.3 else "NOT met")


if __name__ == "__main__":
    main()
