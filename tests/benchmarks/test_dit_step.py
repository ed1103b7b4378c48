"""dit_step.py's baseline is an equally sized model: ComfyUI's single-stream stack does the same
arithmetic per step as our DiT (FLOPs counted by torch), on the same input shapes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "comfyui"))

from harness import find_python, require_comfyui  # noqa: E402

PROBE = textwrap.dedent('''
    import json, sys, torch
    repo, comfy_dir = sys.argv[1:3]
    sys.path.insert(0, repo)
    torch.set_num_threads(1)
    from benchmarks import dit_step
    from benchmarks.common import import_comfy, randomize_
    from pathlib import Path
    import_comfy(Path(comfy_dir))
    import comfy.ops
    from comfy.ldm.modules.attention import optimized_attention
    from torch.utils.flop_counter import FlopCounterMode
    out = {}
    for name, (cfg, side, cond) in dit_step.CONFIGS.items():
        ops = comfy.ops.pick_operations(torch.float32, None)
        ours = randomize_(dit_step.UniFusionDiT(cfg, operations=ops, attention=optimized_attention)).eval()
        theirs = randomize_(dit_step.SingleStreamStack(cfg, operations=ops)).eval()
        x, t = torch.randn(2, cfg.in_channels, side, side), torch.rand(2)
        context = torch.randn(2, cond, cfg.hidden_size)
        flops, shapes = [], []
        with torch.inference_mode():
            for model in (ours, theirs):
                with FlopCounterMode(display=False) as counter:
                    y = model(x, t, context)
                flops.append(counter.get_total_flops())
                shapes.append(list(y.shape))
        blocks = [len(ours.blocks), len(theirs.blocks)]
        out[name] = {"flops": flops, "shapes": shapes, "x": list(x.shape), "blocks": blocks}
    print(json.dumps(out))
''')


def test_comfy_stack_does_the_same_work_as_our_dit():
    comfy_dir = require_comfyui(REPO, "set COMFYUI_DIR=/path/to/ComfyUI to build ComfyUI's single-stream blocks")
    result = subprocess.run([find_python(comfy_dir), "-c", PROBE, str(REPO), str(comfy_dir)], capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"demo-like", "scaled"}
    for entry in report.values():
        ours, theirs = entry["flops"]
        assert ours > 0 and theirs == pytest.approx(ours, rel=0.03)
        assert entry["shapes"] == [entry["x"], entry["x"]]
        assert entry["blocks"][0] == entry["blocks"][1]
