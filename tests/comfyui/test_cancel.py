"""Cancelling during VLM encoding, Verifi generation and sampling leaves nothing behind.

Server level: a few cancel cycles (each cancel lands inside the node: the interrupt is sent
once the server reports that node's progress over its websocket), and after every cancel the
same prompt as before gives a pixel-identical image; the server's RSS stays flat across cycles.
In process (ComfyUI's interpreter, the nodes' own code): an interrupt raised from inside the
VLM's forward removes every hook the encode or Verifi added, keeps the VLM fully loaded, and
the next encode returns exactly the features of one that was never interrupted.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from harness import ComfyServer, PromptInterrupted, find_python
from test_nodes import graph, image_of
from tiny_unifusion import ensure_tiny_files

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 300.0
CYCLES = 3
RSS_GROWTH_LIMIT = 0.05
LONG_TEXT = " ".join(["a red circle"] * 700)  # ~2000 tokens: the encode's forward takes a while


def rss_mb(server: ComfyServer) -> float:
    """Resident memory of the server process (Linux /proc)."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc status")


def cancel(server: ComfyServer, prompt: dict, node: str, after_steps: int) -> None:
    prompt_id, _ = server.queue_and_interrupt(prompt, node, after_steps, WAIT_S)
    with pytest.raises(PromptInterrupted) as err:
        server.wait(prompt_id, timeout=WAIT_S)
    assert err.value.node_id == node


def encode_prompt(cycle: int) -> dict:
    return graph(text=f"{LONG_TEXT} {cycle}", seed=7)


def verifi_prompt(cycle: int) -> dict:
    prompt = graph(seed=7)
    prompt["enc"] = {"class_type": "UniFusionVerifiRewrite", "inputs": {
        "vlm": ["vlm", 0], "text": f"two blue squares {cycle}", "system_prompt": "rewrite", "max_new_tokens": 1500,
        "seed": 0, "do_sample": False}}
    return prompt


def sampling_prompt(cycle: int) -> dict:
    prompt = graph(seed=100 + cycle)
    prompt["ks"]["inputs"]["steps"] = 400
    return prompt


def test_cancel_cycles_leave_the_next_image_identical_and_memory_flat(server: ComfyServer) -> None:
    base = graph(text="a red circle", seed=7)
    reference = image_of(server, server.run(base))
    sizes = []
    for cycle in range(CYCLES):
        for prompt, node, after in ((encode_prompt(cycle), "enc", 1), (verifi_prompt(cycle), "enc", 2),
                                    (sampling_prompt(cycle), "ks", 2)):
            cancel(server, prompt, node, after)
            assert server.queue_state() == {"queue_running": [], "queue_pending": []}
            # The cancelled prompt replaced base's nodes in the cache: this runs them again.
            assert np.array_equal(image_of(server, server.run(base)), reference), (cycle, node)
        sizes.append(rss_mb(server))
    growth = (sizes[-1] - sizes[0]) / sizes[0]
    assert growth < RSS_GROWTH_LIMIT, f"server RSS per cycle (MB): {sizes}"


PROBE = textwrap.dedent('''
    import importlib.util, json, sys
    comfy_dir, repo, vlm_dir = sys.argv[1:4]
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.model_management as mm
    spec = importlib.util.spec_from_file_location("unifusion_pack", repo + "/__init__.py",
                                                  submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["unifusion_pack"] = pack
    spec.loader.exec_module(pack)
    from pathlib import Path
    from unifusion_pack.nodes.encoding import encode_features, verifi_features
    from unifusion_pack.nodes.vlm import load_vlm_patcher

    vlm = load_vlm_patcher(Path(vlm_dir), "default", "paper")

    def encode():
        return encode_features(vlm, "a red circle", None).features.features

    def rewrite():
        found = verifi_features(vlm, "two blue squares", None, "rewrite", 12, 0, False)
        return found.features.features, found.rewritten

    def hook_counts():
        layers = vlm.model.loaded.decoder_layers
        return [len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in layers]

    def interrupted(run, on_call):
        """Run with an interrupt raised from inside the VLM forward on the on_call-th call of layer 5."""
        calls = []

        def trip(module, args, output):
            calls.append(1)
            if len(calls) == on_call:
                mm.interrupt_current_processing(True)

        handle = vlm.model.loaded.decoder_layers[4].register_forward_hook(trip)
        try:
            run()
            outcome = "finished"
        except mm.InterruptProcessingException:
            outcome = "interrupted"
        finally:
            handle.remove()
        return outcome, len(calls)

    report = {"hooks_before": hook_counts()}
    with torch.inference_mode():
        clean_features, (clean_rewrite_features, clean_text) = encode(), rewrite()
        report["encode"] = interrupted(encode, 1)
        report["hooks_after_encode"] = hook_counts()
        report["verifi"] = interrupted(rewrite, 3)
        report["hooks_after_verifi"] = hook_counts()
        report["same_features"] = bool(torch.equal(encode(), clean_features))
        again_features, again_text = rewrite()
        report["same_rewrite"] = bool(torch.equal(again_features, clean_rewrite_features)) and again_text == clean_text
    report["loaded"] = [type(m.model.model).__name__ for m in mm.current_loaded_models]
    report["weights_loaded"] = vlm.model.model_loaded_weight_memory == vlm.model_size()
    report["interrupt_flag"] = mm.processing_interrupted()
    print(json.dumps(report))
''')


def test_interrupt_inside_the_vlm_removes_its_hooks(comfy_dir: Path, comfy_server: ComfyServer,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    files = ensure_tiny_files(comfy_server, tmp_path_factory)
    result = subprocess.run([find_python(comfy_dir), "-c", PROBE, str(comfy_dir), str(REPO), str(files.vlm)],
                            capture_output=True, text=True, timeout=600, cwd=comfy_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["hooks_before"] == [0] * 8
    assert report["encode"] == ["interrupted", 1]  # stopped inside the forward, at layer 5 of 8
    assert report["verifi"] == ["interrupted", 3]  # stopped at the third generated token
    assert report["hooks_after_encode"] == report["hooks_after_verifi"] == [0] * 8
    assert report["same_features"] and report["same_rewrite"]
    assert report["loaded"] == ["VLMHolder"] and report["weights_loaded"]
    assert report["interrupt_flag"] is False
