"""Security promises of SECURITY.md, checked on the source and at run time (no ComfyUI needed).

Static: no unpickling, no network client, ``from_pretrained`` only local and (for weights)
only safetensors, ``trust_remote_code`` never on by default, no HTML/eval in the web extension.
Run time: pickled weights are refused before anything unpickles them, loading opens no
socket, and widget file names cannot leave their model folder.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pickle
import re
import shutil
import socket
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_ROOTS = (ROOT / "unifusion", ROOT / "nodes")
SOURCES = sorted(p for base in PYTHON_ROOTS for p in base.rglob("*.py")) + [ROOT / "__init__.py"]

UNPICKLING_MODULES = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
NETWORK_MODULES = {"requests", "urllib", "urllib3", "http", "httpx", "aiohttp", "socket", "ftplib", "smtplib",
                   "websocket", "websockets", "huggingface_hub", "paramiko", "telnetlib", "xmlrpc"}
UNSAFE_CALLS = {"torch.load", "torch.jit.load", "torch.hub.load", "torch.hub.load_state_dict_from_url",
                "np.load", "numpy.load", "pickle.load", "pickle.loads", "hf_hub_download", "snapshot_download"}
WEIGHT_LOADERS = re.compile(r"(Model|ForConditionalGeneration|ImageTextToText|ForCausalLM)\w*$")


def _trees() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"), str(path))) for path in SOURCES]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def test_sources_are_scanned() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert {"unifusion/checkpoint.py", "unifusion/vlm/loader.py", "nodes/loaders.py", "__init__.py"} <= names


def test_no_unpickling_and_no_network_modules() -> None:
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in UNPICKLING_MODULES | NETWORK_MODULES:
                    found.append(f"{_where(path, node)} imports {module}")
    assert not found, found


def test_no_unsafe_load_calls() -> None:
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name in UNSAFE_CALLS or name.split(".")[-1] in ("hf_hub_download", "snapshot_download"):
                    found.append(f"{_where(path, node)} calls {name}")
    assert not found, found


def _keywords(call: ast.Call, function: ast.AST) -> dict[str, ast.AST]:
    """Keyword arguments of `call`, with ``**name`` expanded when `name` is a dict built in the
    same function (``common = dict(local_files_only=True, ...)``)."""
    out = {k.arg: k.value for k in call.keywords if k.arg}
    spread = [k.value.id for k in call.keywords if k.arg is None and isinstance(k.value, ast.Name)]
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in spread:
            value = node.value
            if isinstance(value, ast.Call) and _dotted(value.func) == "dict":
                out.update({k.arg: k.value for k in value.keywords if k.arg})
            elif isinstance(value, ast.Dict):
                out.update({k.value: v for k, v in zip(value.keys, value.values) if isinstance(k, ast.Constant)})
    return out


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_from_pretrained_is_local_and_weights_are_safetensors() -> None:
    calls, problems = 0, []
    for path, tree in _trees():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "from_pretrained"):
                    continue
                calls += 1
                kwargs = _keywords(node, function)
                if not _is_true(kwargs.get("local_files_only")):
                    problems.append(f"{_where(path, node)}: no local_files_only=True")
                owner = _dotted(node.func.value)
                if WEIGHT_LOADERS.search(owner) and not _is_true(kwargs.get("use_safetensors")):
                    problems.append(f"{_where(path, node)}: {owner}.from_pretrained without use_safetensors=True")
                remote = kwargs.get("trust_remote_code")
                if remote is not None and not isinstance(remote, ast.Name):
                    problems.append(f"{_where(path, node)}: trust_remote_code must come from the caller's setting")
    assert calls >= 3, "the scan found no from_pretrained calls; is it still looking at the loader?"
    assert not problems, problems


def test_trust_remote_code_is_off_unless_asked_for() -> None:
    problems = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults)
                defaults += list(node.args.kw_defaults)
                for arg, default in zip(args, defaults):  # a required parameter is the caller's choice
                    if arg.arg == "trust_remote_code" and default is not None and not (
                            isinstance(default, ast.Constant) and default.value is False):
                        problems.append(f"{_where(path, node)}: {node.name}(trust_remote_code) must default to False")
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and _is_true(node.value):
                problems.append(f"{path.relative_to(ROOT)}: trust_remote_code=True passed literally")
    assert not problems, problems


def test_loader_node_offers_trust_remote_code_off_by_default() -> None:
    tree = ast.parse((ROOT / "nodes" / "loaders.py").read_text(encoding="utf-8"))
    inputs = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and _dotted(node.func) == "io.Boolean.Input"
              and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "trust_remote_code"]
    assert len(inputs) == 1
    keywords = {k.arg: k.value for k in inputs[0].keywords}
    assert keywords["default"].value is False and keywords["optional"].value is True


JS_FORBIDDEN = {
    "eval": re.compile(r"\beval\s*\("),
    "new Function": re.compile(r"\bnew\s+Function\s*\("),
    "innerHTML": re.compile(r"\.(innerHTML|outerHTML)\b"),
    "insertAdjacentHTML": re.compile(r"\binsertAdjacentHTML\b"),
    "document.write": re.compile(r"\bdocument\.write(ln)?\s*\("),
    "string timer": re.compile(r"\bset(Timeout|Interval)\s*\(\s*[\"'`]"),
    "remote URL": re.compile(r"\b(https?:)?//[\w.-]+\.[a-z]{2,}/", re.I),
    "fetch": re.compile(r"\b(fetch|XMLHttpRequest|WebSocket|sendBeacon)\b"),
}


def _strip_js_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"(^|[^:])//[^\n]*", r"\1", text)


def test_web_extension_never_renders_or_evaluates_text() -> None:
    scripts = sorted((ROOT / "web").rglob("*.js"))
    assert scripts, "no web extension found"
    found = []
    for script in scripts:
        code = _strip_js_comments(script.read_text(encoding="utf-8"))
        found += [f"{script.relative_to(ROOT)}: {label}" for label, rule in JS_FORBIDDEN.items() if rule.search(code)]
    assert not found, found


def test_the_js_rules_catch_what_they_should() -> None:
    bad = ("el.innerHTML = text", "eval(x)", "new Function('a', b)", "setTimeout('go()', 1)",
           "fetch('/x')", "img.src = 'https://example.com/a.png'")
    for sample in bad:
        assert any(rule.search(sample) for rule in JS_FORBIDDEN.values()), sample
    assert not any(rule.search(_strip_js_comments("widget.value = String(text); // not innerHTML"))
                   for rule in JS_FORBIDDEN.values())


# -- run time ------------------------------------------------------------------------------------

class _Trap:
    """Unpickling this creates a marker file: proof that something unpickled user data."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unifusion.vlm.tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("security") / "vlm", "internvl", seed=0, num_layers=4,
                          hidden_size=32, image_size=64)


def test_pickled_vlm_weights_are_refused_unread(tiny_vlm: Path, tmp_path: Path) -> None:
    from unifusion.vlm.loader import VLMLoadError, load_vlm

    folder = shutil.copytree(tiny_vlm, tmp_path / "bin_only")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Trap(marker)}))
    with pytest.raises(VLMLoadError, match="only pickled weights .*pytorch_model.bin.*safetensors"):
        load_vlm(folder)
    assert not marker.exists()


def test_pickled_checkpoint_and_vae_are_refused_unread(tmp_path: Path) -> None:
    from unifusion.checkpoint import read_checkpoint_header
    from unifusion.errors import CheckpointError
    from unifusion.vae import VAEFileError, load_vae

    marker = tmp_path / "unpickled"
    for name in ("model.ckpt", "model.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps({"weight": _Trap(marker)}))
        with pytest.raises(CheckpointError, match="not a safetensors file"):
            read_checkpoint_header(tmp_path / name)
        with pytest.raises(VAEFileError):
            load_vae(tmp_path / name)
    assert not marker.exists()


def test_loading_opens_no_network_connection(tiny_vlm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from unifusion.vlm.encode import encode
    from unifusion.vlm.loader import load_vlm

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is not allowed in this test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    vlm = load_vlm(tiny_vlm)
    features = encode(vlm, "a red circle")
    assert features.features.shape[0] == 1
    assert attempts == []


def _pack_module(name: str) -> ModuleType:
    """The repo loaded as a package, as ComfyUI loads it (same name as tests/nodes/conftest.py)."""
    pack = "unifusion_pack"
    if pack not in sys.modules:
        spec = importlib.util.spec_from_file_location(pack, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[pack] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{pack}.{name}")


TRAVERSALS = ["../../etc/passwd", "/etc/passwd", "models/../../../etc", "a/../../b", "..\\..\\secret", ""]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_widget_names_cannot_leave_their_folder(tmp_path: Path, name: str) -> None:
    folders = _pack_module("nodes.folders")
    errors = _pack_module("unifusion.errors")
    root = tmp_path / "models" / "unifusion_vlm"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "config.json").write_text("{}")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "config.json").write_text("{}")
    with pytest.raises(errors.InputError, match="name from the list"):
        folders.resolve_vlm_folder(name, [root], "demo", tmp_path / "missing")
    with pytest.raises(errors.InputError, match="name from the list"):
        folders.resolve_file(name, str(tmp_path / "etc" / "config.json"), "demo", tmp_path / "missing",
                             "diffusion_models")
    assert folders.resolve_vlm_folder("ok", [root], "demo", tmp_path / "missing") == root / "ok"


def test_a_symlink_loop_cannot_hang_the_vlm_list(tmp_path: Path) -> None:
    folders = _pack_module("nodes.folders")
    model = tmp_path / "vendor" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "back").symlink_to(tmp_path)  # a loop
    (tmp_path / "vendor" / "up").symlink_to(tmp_path)  # another, deeper
    (tmp_path / "alias").symlink_to(model)  # a second name for the same model stays listed
    assert folders.list_vlm_folders([tmp_path]) == ["alias", "vendor/model"]
