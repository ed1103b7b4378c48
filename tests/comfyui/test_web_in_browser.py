"""The ComfyUI frontend, in headless Chromium, loads web/unifusion.js without console errors, and
the extension shows a node's reported text the way it does after a real run.

Needs Playwright for Python (``pip install playwright``) and a Chromium binary (Debian's
``chromium`` package, or $CHROMIUM); Playwright's own browser download is not used. Skips
with the reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from harness import ComfyServer

CHROMIUM_ARGS = [
    # root in a container, no GPU, and a closed network: without the networking flags Chromium
    # keeps trying to reach Google's hosts.
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
EXTENSION = "UniFusion.NodeText"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no Chromium found: install Debian's `chromium` package or set CHROMIUM=/path/to/chrome")
    return path


def _load_page(url: str, exercise: bool) -> dict[str, Any]:
    """Open the frontend at ``url`` and record console errors, uncaught exceptions and failed
    requests (as paths); with ``exercise``, also feed a Verifi node the messages a run sends."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to run the browser check")
    executable = _chromium()
    errors: list[str] = []
    failed: list[str] = []
    script_status: list[int] = []
    shown: dict[str, Any] = {}

    def on_response(response: Any) -> None:
        if response.url.endswith("/unifusion.js"):
            script_status.append(response.status)
        if response.status >= 400:
            failed.append(f"{response.status} {urllib.parse.urlsplit(response.url).path}")

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda err: errors.append(f"uncaught: {err}"))
            page.on("response", on_response)
            page.goto(url, wait_until="load", timeout=120_000)
            page.wait_for_function("() => window.app?.graph && LiteGraph.registered_node_types?.KSampler",
                                   timeout=120_000)
            page.wait_for_timeout(3_000)  # late errors of the start-up (settings, node definitions)
            extensions = page.evaluate("() => (window.app.extensions ?? []).map(e => e.name)")
            if exercise:
                shown = page.evaluate(EXERCISE)
        finally:
            browser.close()
    return {"errors": errors, "failed": failed, "script_status": script_status, "extensions": extensions,
            "shown": shown}


EXERCISE = """() => {
    const node = LiteGraph.createNode("UniFusionVerifiRewrite");
    app.graph.add(node);
    node.onExecuted({unifusion_text: ["a red circle in the center"], unifusion_summary: ["rewrite: 6 tokens"]});
    node.onExecuted({unifusion_text: ["two blue squares"]});
    const value = name => node.widgets.find(w => w.name === name)?.value;
    return {text: value("rewritten_prompt"), summary: value("summary"),
            widgets: node.widgets.filter(w => w.name === "rewritten_prompt").length};
}"""


@pytest.fixture(scope="module")
def reports(comfy_dir: Path, comfy_server: ComfyServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The page with the pack, and the same ComfyUI without any custom nodes as the baseline
    (a fresh user folder makes ComfyUI's own frontend log a few 404s, e.g. user.css)."""
    with_pack = _load_page(comfy_server.url, exercise=True)
    bare = ComfyServer(comfy_dir, REPO_ROOT, tmp_path_factory.mktemp("comfyui_bare"),
                       extra_args=("--disable-all-custom-nodes",))
    with bare:
        baseline = _load_page(bare.url, exercise=False)
    return {"pack": with_pack, "baseline": baseline}


def test_page_loads_the_extension_without_console_errors(reports: dict) -> None:
    pack, baseline = reports["pack"], reports["baseline"]
    assert EXTENSION in pack["extensions"] and EXTENSION not in baseline["extensions"]
    assert pack["script_status"] and set(pack["script_status"]) <= {200, 304}
    added_errors = Counter(pack["errors"]) - Counter(baseline["errors"])
    added_failures = Counter(pack["failed"]) - Counter(baseline["failed"])
    assert not added_errors and not added_failures, (added_errors, added_failures)


def test_extension_shows_the_rewritten_prompt_on_the_node(reports: dict) -> None:
    shown = reports["pack"]["shown"]
    assert shown["text"] == "two blue squares"  # the latest run replaces the text
    assert shown["summary"] == "rewrite: 6 tokens"
    assert shown["widgets"] == 1  # one widget, reused
