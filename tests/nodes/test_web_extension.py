"""The web extension shows node text as plain values in read-only widgets (run with Node.js
against stand-ins for the frontend's app and widget modules; skipped without Node.js)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")

APP_STUB = """
export const registered = [];
export const app = { registerExtension: (ext) => registered.push(ext) };
"""
WIDGETS_STUB = """
export const ComfyWidgets = {
  STRING(node, name, spec, app) {
    const widget = { name, value: "", options: {}, inputEl: { readOnly: false, style: {} }, spec };
    (node.widgets ??= []).push(widget);
    return { widget };
  },
};
"""
DRIVER = """
import { registered } from "../../scripts/app.js";
await import("./unifusion.js");
const ext = registered[0];
const results = {};
for (const name of ["UniFusionVerifiRewrite", "UniFusionEncode", "KSampler"]) {
  class NodeType { setDirtyCanvas() {} }
  let calls = 0;
  NodeType.prototype.onExecuted = function () { calls += 1; };
  await ext.beforeRegisterNodeDef(NodeType, { name });
  const node = new NodeType();
  const text = "<img src=x onerror=alert(1)> rewritten";
  node.onExecuted({ unifusion_text: [text], unifusion_summary: ["6 tokens, 3 condition; no images"] });
  node.onExecuted({ unifusion_text: ["second"], unifusion_summary: ["7 tokens"] });
  results[name] = { calls, widgets: (node.widgets ?? []).map((w) => ({
    name: w.name, value: w.value, readOnly: w.inputEl.readOnly, serialize: w.serialize,
    promptSerialize: w.options.serialize })) };
}
console.log(JSON.stringify({ name: ext.name, results }));
"""


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_extension_shows_text_safely(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(APP_STUB)
    (tmp_path / "scripts" / "widgets.js").write_text(WIDGETS_STUB)
    ext_dir = tmp_path / "extensions" / "ComfyUI-UniFusion"
    ext_dir.mkdir(parents=True)
    shutil.copy(ROOT / "web" / "unifusion.js", ext_dir / "unifusion.js")
    (ext_dir / "driver.mjs").write_text(DRIVER)
    (tmp_path / "package.json").write_text('{"type": "module"}')
    run = subprocess.run([NODE, str(ext_dir / "driver.mjs")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["name"] == "UniFusion.NodeText"
    verifi = out["results"]["UniFusionVerifiRewrite"]
    assert verifi["calls"] == 2  # the original onExecuted still runs
    assert [w["name"] for w in verifi["widgets"]] == ["rewritten_prompt", "summary"]  # created once, updated
    assert verifi["widgets"][0]["value"] == "second" and verifi["widgets"][1]["value"] == "7 tokens"
    for widget in verifi["widgets"]:
        assert widget["readOnly"] and widget["serialize"] is False and widget["promptSerialize"] is False
    assert [w["name"] for w in out["results"]["UniFusionEncode"]["widgets"]] == ["rewritten_prompt", "summary"]
    assert out["results"]["KSampler"]["widgets"] == []  # other nodes are left alone
    source = (ROOT / "web" / "unifusion.js").read_text()
    assert "innerHTML" not in source and "eval(" not in source
