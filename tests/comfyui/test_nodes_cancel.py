"""Cancelling a running Verifi rewrite stops it between tokens and leaves the server ready.

The interrupt is sent only once the server has reported progress of the Verifi node over its
websocket, so it lands inside the token loop, not before or after it (no sleeps, no timing).
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from harness import ComfyServer, PromptInterrupted
from tiny_unifusion import ensure_tiny_files

aiohttp = pytest.importorskip("aiohttp")

VLM = "unifusion-demo-vlm"
WAIT_S = 300.0


@pytest.fixture(scope="module")
def server(comfy_server: ComfyServer, tmp_path_factory: pytest.TempPathFactory) -> ComfyServer:
    ensure_tiny_files(comfy_server, tmp_path_factory)
    return comfy_server


def verifi_prompt(max_new_tokens: int, text: str) -> dict:
    return {
        "vlm": {"class_type": "UniFusionVLMLoader", "inputs": {"vlm": VLM, "dtype": "default", "layers": "paper"}},
        "ver": {"class_type": "UniFusionVerifiRewrite", "inputs": {
            "vlm": ["vlm", 0], "text": text, "system_prompt": "rewrite", "max_new_tokens": max_new_tokens,
            "seed": 0, "do_sample": False}},
    }


async def queue_and_interrupt(url: str, prompt: dict, node: str, after_steps: int) -> tuple[str, int]:
    """Queue `prompt` for our websocket client, interrupt once `node` reported `after_steps` steps;
    returns (prompt id, the step count seen when interrupting)."""
    client = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={client}") as ws:
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client}) as resp:
                prompt_id = (await resp.json())["prompt_id"]
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                data = event.get("data", {})
                if event["type"] == "progress" and data.get("node") == node and data["value"] >= after_steps:
                    async with session.post(f"{url}/interrupt", json={}):
                        return prompt_id, int(data["value"])
                if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    raise AssertionError("the prompt finished before it could be interrupted")
    raise AssertionError("the websocket closed before the Verifi node reported progress")


def test_cancel_during_verifi_leaves_server_ready(server: ComfyServer) -> None:
    server.run(verifi_prompt(2, "warm up"))  # load the VLM first, so the next prompt only rewrites
    total = 1500
    prompt_id, step = asyncio.run(asyncio.wait_for(
        queue_and_interrupt(server.url, verifi_prompt(total, "a long rewrite"), "ver", after_steps=2), WAIT_S))
    assert 2 <= step < total
    with pytest.raises(PromptInterrupted) as err:
        server.wait(prompt_id, timeout=WAIT_S)
    assert err.value.node_id == "ver"
    assert server.queue_state() == {"queue_running": [], "queue_pending": []}
    entry = server.run(verifi_prompt(3, "after the cancel"))
    assert entry["outputs"]["ver"]["unifusion_summary"][0].startswith("rewrite: 3 tokens")
