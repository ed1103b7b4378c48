"""Run the pack inside a real ComfyUI server for integration tests.

The server is a subprocess started with ``--cpu`` on a free loopback port. Everything it writes (models,
input, output, temp, user, custom_nodes) lives under a temporary ``--base-directory``; the database is
in memory. The pack is made visible through a symlink in that temporary ``custom_nodes`` folder, so
the ComfyUI install is never modified and the repo is never copied. Only the standard library is used
here (the test process does not need ComfyUI's dependencies), except by `ComfyServer.queue_and_interrupt`,
which listens on the server's websocket through aiohttp.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ui_workflow import ui_to_api

log = logging.getLogger(__name__)

SKIP_REASON = "set COMFYUI_DIR=/path/to/ComfyUI to run ComfyUI integration tests"
PACK_NAME = "ComfyUI-UniFusion"
IMPORT_FAILED = "(IMPORT FAILED)"


class ComfyUINotFound(RuntimeError):
    """COMFYUI_DIR is set but does not point at a ComfyUI checkout."""


class ComfyUIStartError(RuntimeError):
    """The server exited or never answered; the message carries the end of its log."""


class PromptRejected(RuntimeError):
    """POST /prompt refused the graph (validation); ``node_errors`` is ComfyUI's per-node report."""

    def __init__(self, message: str, node_errors: dict[str, Any]):
        super().__init__(message)
        self.node_errors = node_errors


class PromptFailed(RuntimeError):
    """A node raised while the prompt ran; ``exception_message`` is the node's own message."""

    def __init__(self, message: str, node_id: str | None = None, node_type: str | None = None,
                 exception_message: str = "", traceback: str = ""):
        super().__init__(message)
        self.node_id = node_id
        self.node_type = node_type
        self.exception_message = exception_message
        self.traceback = traceback


class PromptInterrupted(PromptFailed):
    """The prompt was stopped by an interrupt before it finished."""


def find_comfyui(repo_root: Path) -> Path | None:
    """ComfyUI from $COMFYUI_DIR, else the checkout whose custom_nodes/ holds the repo, else None."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise ComfyUINotFound(
                f"COMFYUI_DIR={env} has no main.py and comfy/: point it at a ComfyUI checkout or unset it")
        return path
    parent = repo_root.resolve().parent
    if parent.name == "custom_nodes" and (parent.parent / "main.py").is_file():
        return parent.parent
    return None


def require_comfyui(repo_root: Path, skip_reason: str = SKIP_REASON) -> Path:
    """ComfyUI's folder for a test: the test fails when $COMFYUI_DIR points at something that is
    not ComfyUI, and skips with ``skip_reason`` when no ComfyUI is set up."""
    import pytest  # only tests call this; the rest of the harness is standard library

    try:
        found = find_comfyui(repo_root)
    except ComfyUINotFound as err:
        pytest.fail(str(err), pytrace=False)
    if found is None:
        pytest.skip(skip_reason)
    return found


def find_python(comfy_dir: Path) -> str:
    """The interpreter ComfyUI is installed in: $COMFYUI_PYTHON, a venv inside the checkout, or ours."""
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    for candidate in (".venv/bin/python", "venv/bin/python", "../python_embeded/python.exe"):
        path = comfy_dir / candidate
        if path.is_file():
            return str(path)
    return sys.executable


def free_port() -> int:
    """A loopback port that is free right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """One ComfyUI server process with the pack loaded; use as a context manager or start()/stop()."""

    def __init__(self, comfy_dir: Path, pack_dir: Path, work_dir: Path, python: str | None = None,
                 extra_args: tuple[str, ...] = (), startup_timeout: float = 300.0):
        self.comfy_dir = Path(comfy_dir)
        self.pack_dir = Path(pack_dir).resolve()
        self.base_dir = Path(work_dir) / "comfy_base"
        self.python = python or find_python(self.comfy_dir)
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = Path(work_dir) / "comfyui.log"
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # -- folders -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def temp_dir(self) -> Path:
        return self.base_dir / "temp"

    def link_model(self, folder: str, source: Path, name: str | None = None) -> Path:
        """Symlink a model file into models/<folder>/ (e.g. "vae", "diffusion_models"); returns the link."""
        target = self.models_dir / folder / (name or Path(source).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(Path(source).resolve())
        return target

    # -- process -------------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_NAME
        if not link.is_symlink():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        self.port = free_port()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", *self.extra_args]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        self._log_file = open(self.log_path, "wb")
        log.info("starting ComfyUI: %s", " ".join(cmd))
        self.process = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyUIStartError(
                    f"ComfyUI exited with code {self.process.returncode} during startup\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise ComfyUIStartError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT first (ComfyUI cleans its temp folder on KeyboardInterrupt), then SIGKILL."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- log -----------------------------------------------------------------------------------
    def log_text(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().splitlines()[-lines:]
        return "---- ComfyUI log (last lines) ----\n" + "\n".join(text)

    def pack_import_line(self) -> str | None:
        """ComfyUI's "N seconds: <path>" import-time line for the pack, None if it never tried."""
        for line in self.log_text().splitlines():
            if "seconds" in line and line.rstrip().endswith(f"custom_nodes{os.sep}{PACK_NAME}"):
                return line.strip()
        return None

    # -- HTTP ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, payload: Any = None, timeout: float = 60.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, payload: Any, timeout: float = 60.0) -> Any:
        return self._request("POST", path, payload, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """GET /object_info (all node classes) or /object_info/<class> (that one)."""
        path = "/object_info" if node_class is None else "/object_info/" + urllib.parse.quote(node_class)
        return self.get(path)

    # -- prompts -------------------------------------------------------------------------------
    def queue_prompt(self, api_prompt: dict[str, Any]) -> str:
        """POST /prompt; returns the prompt id or raises PromptRejected with ComfyUI's validation report."""
        try:
            return self.post("/prompt", {"prompt": api_prompt})["prompt_id"]
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
            error = body.get("error", {})
            node_errors = body.get("node_errors", {})
            details = "; ".join(
                f"node {nid} ({info.get('class_type')}): "
                + ", ".join(f"{e.get('message')}: {e.get('details')}" for e in info.get("errors", []))
                for nid, info in node_errors.items())
            raise PromptRejected(
                f"ComfyUI rejected the prompt: {error.get('message')} {error.get('details', '')} {details}".strip(),
                node_errors) from err

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """Poll /history until the prompt ends; returns its history entry or raises PromptFailed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ComfyUIStartError(f"ComfyUI exited while running {prompt_id}\n{self.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                return self._check_entry(prompt_id, entry)
            time.sleep(0.2)
        self.interrupt(prompt_id)
        self.post("/queue", {"delete": [prompt_id]})
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")

    def _check_entry(self, prompt_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        status = entry["status"]
        if status.get("status_str") == "success":
            return entry
        for event, data in status.get("messages", []):
            if event == "execution_interrupted":
                raise PromptInterrupted(f"prompt {prompt_id} was interrupted at node {data.get('node_id')}",
                                        data.get("node_id"), data.get("node_type"))
            if event == "execution_error":
                trace = "".join(data.get("traceback", []))
                raise PromptFailed(
                    f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type')}: {data.get('exception_message')}\n{trace}\n{self.log_tail()}",
                    data.get("node_id"), data.get("node_type"), data.get("exception_message", ""), trace)
        raise PromptFailed(f"prompt {prompt_id} ended with status {status}\n{self.log_tail()}")

    def run(self, api_prompt: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """queue_prompt + wait."""
        return self.wait(self.queue_prompt(api_prompt), timeout)

    def run_ui_workflow(self, workflow: dict[str, Any] | Path, timeout: float = 600.0) -> dict[str, Any]:
        """Convert a UI-format workflow (dict or .json path) with this server's object_info and run it."""
        if not isinstance(workflow, dict):
            workflow = json.loads(Path(workflow).read_text(encoding="utf-8"))
        return self.run(ui_to_api(workflow, self.object_info()), timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: stops the running prompt (only that one when prompt_id is given)."""
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def queue_and_interrupt(self, prompt: dict[str, Any], node: str, after_steps: int,
                            timeout: float = 300.0) -> tuple[str, int]:
        """Queue ``prompt`` for a websocket client of our own and interrupt once ``node`` has reported
        ``after_steps`` progress steps, so the cancel lands inside that node (no sleeps, no timing);
        returns (prompt id, the step count seen when interrupting)."""
        import asyncio
        import uuid

        try:
            import aiohttp
        except ImportError as err:
            raise RuntimeError("queue_and_interrupt needs aiohttp (pip install aiohttp; ComfyUI has it)") from err

        async def run() -> tuple[str, int]:
            client = uuid.uuid4().hex
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={client}") as ws:
                    async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client}) as resp:
                        prompt_id = (await resp.json())["prompt_id"]
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        event = json.loads(msg.data)
                        data = event.get("data", {})
                        if event["type"] == "progress" and data.get("node") == node and data["value"] >= after_steps:
                            async with session.post(f"{self.url}/interrupt", json={}):
                                return prompt_id, int(data["value"])
                        if (event["type"] == "executing" and data.get("node") is None
                                and data.get("prompt_id") == prompt_id):
                            raise AssertionError(f"the prompt finished before {node} could be interrupted")
            raise AssertionError(f"the websocket closed before {node} reported progress")

        return asyncio.run(asyncio.wait_for(run(), timeout))

    def queue_state(self) -> dict[str, list]:
        """GET /queue: {"queue_running": [...], "queue_pending": [...]}."""
        return self.get("/queue")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free: drop loaded models and cached node outputs between tests."""
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def output_images(self, entry: dict[str, Any]) -> list[Path]:
        """Files of every image a history entry lists (SaveImage -> output/, PreviewImage -> temp/)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        paths = []
        for node_output in entry.get("outputs", {}).values():
            for image in node_output.get("images", []):
                paths.append(roots[image.get("type", "output")] / image.get("subfolder", "") / image["filename"])
        return paths
