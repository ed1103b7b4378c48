"""Shared helpers of the benchmark scripts: clocks, peak-memory trackers, ComfyUI imports, tables.

Timings on CPU are the CPU seconds of the measured process (one thread), which other jobs on a
shared machine inflate far less than wall time; on CUDA they are wall seconds around a
synchronised call. Peak memory on CPU comes from ``torch.profiler`` (``profile_memory=True``):
the running sum of the allocator's allocation/free events in time order, whose maximum is the
peak of live tensor storage above the start (deterministic; allocator caching not counted).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
GiB = 1 << 30
PACK = "unifusion_pack"

logger = logging.getLogger("benchmarks")


def setup(threads: int = 1) -> None:
    """One torch thread (stable CPU timings on a shared machine; 0 keeps torch's default) and
    plain logging to stdout: the benchmarks' own lines, warnings and errors of everything else."""
    if threads > 0:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    logger.setLevel(logging.INFO)


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds of one call: CPU seconds of this process on CPU, synchronised wall seconds on an accelerator."""
    device = torch.device(device)
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


def interleaved(methods: dict[str, Callable[[], Any]], repeats: int, device: torch.device | str = "cpu",
                warmup: int = 1) -> dict[str, list[float]]:
    """Time every method ``repeats`` times after ``warmup`` untimed calls each, in rotating order so
    background load hits all methods alike. Returns the seconds of every call per method."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(methods[name], device))
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def cpu_peak_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Peak live tensor bytes allocated on CPU during ``fn()`` above what was live before, and its result."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak, result


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """Peak allocated CUDA bytes during ``fn()`` above what was allocated before, and its result."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start, result


def peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[int, Any]:
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_bytes(fn, device)
    return cpu_peak_bytes(fn)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc), e.g. a ComfyUI server."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], floatfmt: str = "{:.3f}") -> list[str]:
    """Rows as aligned text lines (floats through ``floatfmt``)."""
    cells = [[floatfmt.format(c) if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join("{:>" + str(w) + "}" for w in widths)
    return [line.format(*headers), *(line.format(*r) for r in cells)]


def log_lines(lines: Iterable[str]) -> None:
    for line in lines:
        logger.info("%s", line)


def verdict(value: float, goal: float, at_most: bool = True) -> str:
    """'met' or 'NOT met' for ``value <= goal`` (or ``>=`` with ``at_most=False``)."""
    ok = value <= goal if at_most else value >= goal
    return "met" if ok else "NOT met"


def comfyui_dir(explicit: Optional[str] = None) -> Optional[Path]:
    """ComfyUI from an argument or $COMFYUI_DIR, when it is a checkout (main.py and comfy/)."""
    raw = explicit or os.environ.get("COMFYUI_DIR")
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise SystemExit(f"{raw} is not a ComfyUI checkout (no main.py and comfy/); fix --comfyui or COMFYUI_DIR")
    return path


def import_comfy(comfy_dir: Path, cpu: bool = True, args: Sequence[str] = ()) -> ModuleType:
    """Make ``import comfy...`` work in this process, parsing ComfyUI's command line as ``args``
    plus ``--cpu`` unless told otherwise (without it ComfyUI asks CUDA for a device). The first
    call fixes the arguments. Returns comfy.model_management."""
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    argv = sys.argv
    sys.argv = [argv[0]] + (["--cpu"] if cpu else []) + list(args)
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        return importlib.import_module("comfy.model_management")
    finally:
        sys.argv = argv


def pack_module(name: str) -> ModuleType:
    """The repo loaded as a package, as ComfyUI loads it (relative imports work): ``pack_module("nodes.model")``."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.{name}")


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Small random weights everywhere (also where adaLN-Zero starts at zero), so timings see real
    arithmetic rather than zeros or uninitialised memory."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_((torch.randn(param.shape, generator=gen) * std).to(param.dtype))
    return module
