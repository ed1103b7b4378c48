"""The command line the demo probes share: which checkpoint and assets to load, and errors as
``error: ...`` with exit status 2 (as `unifusion` reports them) instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


def run_probe(prog: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
              probe: Callable[[Any, argparse.Namespace], str], argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, load the pipeline (default: the bundled demo files), print ``probe(pipe, args)``."""
    from ..bundled import ASSETS_DIR, DEMO_CHECKPOINT, DEMO_VAE_PATH, DEMO_VLM
    from ..pipeline import UniFusionPipeline

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--checkpoint", type=Path, default=ASSETS_DIR / DEMO_CHECKPOINT,
                        help="UniFusion checkpoint to probe (default: the bundled demo model)")
    parser.add_argument("--assets", type=Path, default=ASSETS_DIR, help="folder with the demo VLM and autoencoder")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:  # UniFusionError (a missing or mismatched file) and bad counts are ValueErrors
        pipe = UniFusionPipeline.from_files(args.assets / DEMO_VLM, args.checkpoint, args.assets / DEMO_VAE_PATH)
        table = probe(pipe, args)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(table + "\n")
    return 0
