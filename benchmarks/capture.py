"""Memory of selected-layer capture against ``output_hidden_states=True``, one long forward.

Each method runs one uncached forward of the base model over a long text sequence and
produces what LAP needs, the stacked selected layers ``(1, S, L, H)``:

- ``plain``: the forward alone (no states kept): the baseline every figure is taken against.
- ``capture``: `LayerCapture` hooks on the selected layers, then ``capture.stacked()``.
- ``hidden_states``: ``output_hidden_states=True`` (every layer kept), then the selected
  entries stacked.

"Extra" memory of a method = its peak of live allocations minus the plain forward's peak,
both counted from the live allocations at the start of the call. Measured on CUDA with
``torch.cuda.max_memory_allocated``; on CPU with ``torch.profiler`` (``profile_memory=True``):
the allocator reports every allocation and free as a ``[memory]`` event with its byte count,
and the running sum of those events in time order is the live-allocation curve, whose
maximum is the peak. This counts tensor storage exactly; it ignores allocator caching and
RSS effects, which are the same for all methods.

Goal: extra(capture) / extra(hidden_states) <= 1/N + 10 %, with N the layer stride
(every N-th layer selected), i.e. capture costs about what the selected layers weigh.

Run: ``python benchmarks/capture.py [--family internvl] [--layers 32] [--hidden 128] [--seq 2048]``
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unifusion.config import default_layer_selection  # noqa: E402
from unifusion.vlm.layers import LayerCapture  # noqa: E402
from unifusion.vlm.loader import LoadedVLM, load_vlm  # noqa: E402
from unifusion.vlm.tiny import FAMILIES, build_tiny_vlm  # noqa: E402

logger = logging.getLogger("benchmarks.capture")
MiB = 1 << 20


def plain(vlm: LoadedVLM, ids: torch.Tensor) -> torch.Tensor:
    return vlm.base_model(input_ids=ids, use_cache=False).last_hidden_state


def capture(vlm: LoadedVLM, ids: torch.Tensor) -> torch.Tensor:
    with LayerCapture(vlm.decoder_layers, vlm.selected_layers) as hooks:
        vlm.base_model(input_ids=ids, use_cache=False)
    return hooks.stacked()  # (1, S, L, H)


def hidden_states(vlm: LoadedVLM, ids: torch.Tensor) -> torch.Tensor:
    out = vlm.base_model(input_ids=ids, use_cache=False, output_hidden_states=True)
    return torch.stack([out.hidden_states[k] for k in vlm.selected_layers], dim=2)  # (1, S, L, H)


def cpu_peak(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Peak live bytes above the start, from the profiler's allocation/free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak, result


def cuda_peak(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[int, torch.Tensor]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start, result


def measure(vlm: LoadedVLM, ids: torch.Tensor, fn: Callable) -> tuple[int, torch.Tensor]:
    gc.collect()
    with torch.no_grad():
        if vlm.device.type == "cuda":
            return cuda_peak(lambda: fn(vlm, ids), vlm.device)
        return cpu_peak(lambda: fn(vlm, ids))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="internvl")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 as InternVL2.5-8B's LM)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (multiple of 16)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens in the forward")
    parser.add_argument("--stride", type=int, default=3, help="N: every N-th layer is selected, as in the paper")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for name in ("transformers", "unifusion"):
        logging.getLogger(name).setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_vlm(Path(tmp) / args.family, args.family, num_layers=args.layers, hidden_size=args.hidden)
        vlm = load_vlm(folder, dtype=getattr(torch, args.dtype), device=args.device,
                       selected_layers=default_layer_selection(args.layers, args.stride))
    vocab = len(vlm.tokenizer)
    ids = torch.randint(vocab // 2, vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(vlm.device)
    methods = {"plain": plain, "capture": capture, "hidden_states": hidden_states}
    measure(vlm, ids[:, :64], capture)  # warm-up (lazy initialisation allocates once)
    peaks, results = {}, {}
    for name, fn in methods.items():
        peaks[name], results[name] = measure(vlm, ids, fn)
    torch.testing.assert_close(results["capture"], results["hidden_states"], atol=1e-5, rtol=0)

    selected = len(vlm.selected_layers)
    state_bytes = ids.shape[1] * vlm.hidden_size * torch.finfo(vlm.dtype).bits // 8  # one layer's states
    logger.info("Capture memory benchmark: %s, %d layers, width %d, %d tokens, %s %s; selected layers %s (N=%d)",
                args.family, args.layers, args.hidden, args.seq, args.device, args.dtype,
                list(vlm.selected_layers), args.stride)
    logger.info("one layer's states: %.1f MiB; selected stack: %.1f MiB; all %d hidden states: %.1f MiB",
                state_bytes / MiB, selected * state_bytes / MiB, args.layers + 1, (args.layers + 1) * state_bytes / MiB)
    logger.info("%-14s %12s %12s", "method", "peak MiB", "extra MiB")
    extra = {name: peaks[name] - peaks["plain"] for name in methods}
    for name in methods:
        logger.info("%-14s %12.1f %12.1f", name, peaks[name] / MiB, extra[name] / MiB)
    ratio = extra["capture"] / extra["hidden_states"]
    goal = 1.1 / args.stride
    logger.info("extra(capture) / extra(hidden_states) = %.3f  (1/N = %.3f; goal <= 1/N + 10%% = %.3f: %s)",
                ratio, 1 / args.stride, goal, "met" if ratio <= goal else "NOT met")


if __name__ == "__main__":
    main()
