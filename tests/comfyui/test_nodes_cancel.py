"""Cancelling a running Verifi rewrite stops it between tokens and leaves the server ready.

The interrupt is sent only once the server has reported progress of the Verifi node over its
websocket, so it lands inside the token loop, not before or after it (no sleeps, no timing).
"""

from __future__ import annotations


import pytest

from harness import ComfyServer, PromptInterrupted

VLM = "unifusion-demo-vlm"
WAIT_S = 300.0


def verifi_prompt(max_new_tokens: int, text: str) -> dict:
    return {
        "vlm": {"class_type": "UniFusionVLMLoader", "inputs": {"vlm": VLM, "dtype": "default", "layers": "paper"}},
        "ver": {"class_type": "UniFusionVerifiRewrite", "inputs": {
            "vlm": ["vlm", 0], "text": text, "system_prompt": "rewrite", "max_new_tokens": max_new_tokens,
            "seed": 0, "do_sample": False}},
    }


def test_cancel_during_verifi_leaves_server_ready(server: ComfyServer) -> None:
    server.run(verifi_prompt(2, "warm up"))  # load the VLM first, so the next prompt only rewrites
    total = 1500
    prompt_id, step = server.queue_and_interrupt(verifi_prompt(total, "a long rewrite"), "ver", 2, WAIT_S)
    assert 2 <= step < total
    with pytest.raises(PromptInterrupted) as err:
        server.wait(prompt_id, timeout=WAIT_S)
    assert err.value.node_id == "ver"
    assert server.queue_state() == {"queue_running": [], "queue_pending": []}
    entry = server.run(verifi_prompt(3, "after the cancel"))
    assert entry["outputs"]["ver"]["unifusion_summary"][0].startswith("rewrite: 3 tokens")
