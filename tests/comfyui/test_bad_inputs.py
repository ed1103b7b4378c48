"""Bad inputs inside one shared ComfyUI: each case fails with a message that names the input
and the fix (or, where that is the right answer, works), the server stays up, and the next
prompt runs for real (a new seed each time, so it is not served from the cache).

test_nodes.py already covers a missing checkpoint file, a VAE picked as checkpoint, a VLM of
another width, empty UniFusion Encode text, bad gains and layers, 1x1 and strip references;
they are not repeated here. Pickled files and remote code are in test_security.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from harness import ComfyServer, PromptRejected
from test_nodes import CKPT, SEEDS, VLM, fails_then_recovers, graph, image_of, next_prompt_runs
from tiny_unifusion import TinyFiles
from ui_workflow import ui_to_api

from unifusion.checkpoint import read_checkpoint_header
from unifusion.vlm.tiny import build_tiny_vlm

def works_then_recovers(server: ComfyServer, prompt: dict) -> dict:
    entry = server.run(prompt)
    assert image_of(server, entry).std() > 2.0
    next_prompt_runs(server)
    return entry


# -- checkpoints ---------------------------------------------------------------------------------

def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _wrong_shapes(good: Path, out: Path) -> None:
    state = _tensors(good)
    state[sorted(state)[0]] = torch.zeros(3, 3)
    save_file(state, str(out), metadata=read_checkpoint_header(good).metadata)


def _damaged_config(good: Path, out: Path) -> None:
    meta = dict(read_checkpoint_header(good).metadata, unifusion_config="{not json")
    save_file(_tensors(good), str(out), metadata=meta)


CHECKPOINTS: dict[str, tuple[Callable[[Path, Path], None], tuple[str, ...]]] = {
    "empty": (lambda good, out: out.write_bytes(b""), ("is empty or truncated (0 bytes)", "save it again")),
    "truncated": (lambda good, out: out.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
                  ("is truncated", "Download or copy the file again")),
    "not_safetensors": (lambda good, out: out.write_text("just some text, not a model " * 8),
                        ("is not a safetensors file", "Only .safetensors checkpoints are supported")),
    "other_architecture": (lambda good, out: save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)},
                                                       str(out)),
                           ("not a UniFusion checkpoint", "looks like a FLUX model", "Pick a UniFusion checkpoint")),
    "wrong_shapes": (_wrong_shapes, ("does not match the model its own config describes", "wrong shape",
                                     "re-export it")),
    "damaged_config": (_damaged_config, ("unreadable UniFusion config", "damaged")),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_bad_checkpoint(server: ComfyServer, files: TinyFiles, tmp_path: Path, case: str) -> None:
    make, fragments = CHECKPOINTS[case]
    path = tmp_path / f"{case}.safetensors"
    make(files.checkpoint, path)
    link = server.link_model("diffusion_models", path)
    try:
        message = fails_then_recovers(server, graph(checkpoint=path.name), "model", *fragments)
    finally:
        link.unlink()  # other modules check the exact lists
    assert path.name in message  # the message names the file


# -- VLM folders ---------------------------------------------------------------------------------

def _replace(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def _truncate(name: str) -> Callable[[Path], None]:
    def cut(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return cut


def _remove(*names: str) -> Callable[[Path], None]:
    return lambda folder: [(folder / n).unlink() for n in names]


VLM_FOLDERS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "no_tokenizer": (_remove("tokenizer.json", "tokenizer_config.json"),
                     ("has no tokenizer files", "copy them from the model repository")),
    "no_tokenizer_json": (_remove("tokenizer.json"), ("cannot load the tokenizer", "copy the tokenizer files")),
    "no_processor": (_remove("preprocessor_config.json"),
                     ("has no image processor config", "copy it from the model repository")),
    "no_chat_template": (_remove("chat_template.jinja"), ("has no chat template", "chat_template.jinja")),
    "no_weights": (_remove("model.safetensors"), ("has no weights", "download the model folder again")),
    "truncated_weights": (_truncate("model.safetensors"),
                          ("cannot load the weights", "download the model folder again")),
    "damaged_config": (_replace("config.json", "{oops"), ("config.json is unreadable", "download the model folder")),
}


@pytest.mark.parametrize("case", sorted(VLM_FOLDERS))
def test_bad_vlm_folder(server: ComfyServer, files: TinyFiles, case: str) -> None:
    damage, fragments = VLM_FOLDERS[case]
    folder = server.models_dir / "unifusion_vlm" / f"bad_{case}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(files.vlm, folder)
    damage(folder)
    try:
        message = fails_then_recovers(server, graph(vlm=folder.name), "vlm", *fragments)
    finally:
        shutil.rmtree(folder)  # other modules check the exact lists
    assert folder.name in message  # the message names the folder


def test_vlm_of_another_architecture(server: ComfyServer, tmp_path: Path) -> None:
    """Same width and depth, other family: refused before sampling, naming both."""
    folder = build_tiny_vlm(tmp_path / "qwen", "qwen2_5_vl", seed=0, num_layers=8, hidden_size=64)
    link = server.link_model("unifusion_vlm", folder, "qwen-vlm")
    try:
        fails_then_recovers(server, graph(vlm="qwen-vlm"), "lap", "trained with a InternVLForConditionalGeneration",
                            "loaded VLM is a Qwen2_5_VLForConditionalGeneration",
                            "Load the VLM the checkpoint was trained with")
    finally:
        link.unlink()


# -- prompts -------------------------------------------------------------------------------------

def verifi_graph(text: str, max_new_tokens: int = 8, seed: int = 1) -> dict:
    prompt = graph(seed=seed)
    prompt["enc"] = {"class_type": "UniFusionVerifiRewrite", "inputs": {
        "vlm": ["vlm", 0], "text": text, "system_prompt": "rewrite", "max_new_tokens": max_new_tokens, "seed": 0,
        "do_sample": False}}
    return prompt


def text_encode_graph(text: str, verifi: bool) -> dict:
    prompt = {k: v for k, v in graph().items() if k not in ("enc", "lap")}
    prompt["lap"] = {"class_type": "UniFusionTextEncode", "inputs": {
        "vlm": ["vlm", 0], "model": ["model", 0], "text": text, "verifi": verifi, "max_new_tokens": 8}}
    return prompt


@pytest.mark.parametrize("node, prompt", [
    ("UniFusion Verifi Rewrite", verifi_graph("   ")),
    ("UniFusion Text Encode", text_encode_graph("", verifi=False)),
    ("UniFusion Text Encode", text_encode_graph("\n", verifi=True)),
], ids=["verifi", "text_encode", "text_encode_verifi"])
def test_empty_prompt_names_the_node_and_the_fix(server: ComfyServer, node: str, prompt: dict) -> None:
    failing = "enc" if "enc" in prompt else "lap"
    fails_then_recovers(server, prompt, failing, f"{node}: the text is empty", "type a prompt")


LONG_TEXT = " ".join(["red circle"] * 3000)  # ~6000 tokens; the tiny VLM's window is 2048


@pytest.mark.parametrize("verifi", [False, True], ids=["encode", "verifi"])
def test_prompt_beyond_the_vlm_window_is_cut_with_a_visible_warning(server: ComfyServer, verifi: bool) -> None:
    """The library keeps the start and drops the end of the text (documented); the node shows it."""
    prompt = verifi_graph(LONG_TEXT) if verifi else graph(text=LONG_TEXT)
    prompt["ks"]["inputs"]["steps"] = 1
    entry = works_then_recovers(server, prompt)
    summary = entry["outputs"]["enc"]["unifusion_summary"][0]
    assert summary.startswith("WARNING: prompt 0 is "), summary
    assert "over the limit of" in summary and "dropped its last" in summary
    assert "over the limit of" in server.log_text()  # and the server console says it too


# -- reference images ----------------------------------------------------------------------------

def reference_graph(images: dict, output: list, max_tiles: int = 2) -> dict:
    prompt = graph(text="make it blue", seed=next(SEEDS))
    prompt.update(images)
    prompt["ref"] = {"class_type": "UniFusionReference", "inputs": {"image": output, "max_tiles": max_tiles}}
    prompt["enc"]["inputs"]["references"] = ["ref", 0]
    return prompt


def empty_image(width: int, height: int, batch: int = 1, color: int = 0x3366CC) -> dict:
    return {"img": {"class_type": "EmptyImage",
                    "inputs": {"width": width, "height": height, "batch_size": batch, "color": color}}}


def test_sixteen_references_work_and_too_many_tiles_name_the_limit(server: ComfyServer) -> None:
    entry = works_then_recovers(server, reference_graph(empty_image(64, 64, batch=16), ["img", 0], max_tiles=1))
    assert "16 images" in entry["outputs"]["enc"]["unifusion_summary"][0]
    fails_then_recovers(server, reference_graph(empty_image(900, 700, batch=16), ["img", 0], max_tiles=12), "enc",
                        "more than the limit of 2048", "use fewer images or a smaller max_tiles")


def _png(server: ComfyServer, name: str, pixels: np.ndarray, mode: str | None = None) -> str:
    Image.fromarray(pixels, mode).save(server.input_dir / name)
    return name


IMAGES: dict[str, Callable[[ComfyServer, np.random.Generator], tuple[dict, list]]] = {
    "grayscale": lambda s, rng: ({"img": {"class_type": "LoadImage", "inputs": {"image": _png(
        s, "gray.png", rng.integers(0, 255, (40, 50), dtype=np.uint8), "L")}}}, ["img", 0]),
    "grayscale_16bit": lambda s, rng: ({"img": {"class_type": "LoadImage", "inputs": {"image": _png(
        s, "gray16.png", rng.integers(0, 65535, (40, 50)).astype(np.uint16))}}}, ["img", 0]),
    "rgba_file": lambda s, rng: ({"img": {"class_type": "LoadImage", "inputs": {"image": _png(
        s, "rgba.png", rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA")}}}, ["img", 0]),
    "rgba_tensor": lambda s, rng: ({
        "img": {"class_type": "LoadImage", "inputs": {"image": _png(
            s, "rgba.png", rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA")}},
        "alpha": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["img", 0], "alpha": ["img", 1]}},
    }, ["alpha", 0]),  # a 4-channel IMAGE
    "8000x8000": lambda s, rng: (empty_image(8000, 8000), ["img", 0]),
    "batch_of_4": lambda s, rng: (empty_image(48, 40, batch=4), ["img", 0]),
}


@pytest.mark.parametrize("case", sorted(IMAGES))
def test_odd_reference_images_work(server: ComfyServer, case: str) -> None:
    nodes, output = IMAGES[case](server, np.random.default_rng(0))
    entry = works_then_recovers(server, reference_graph(nodes, output))
    expected = "4 images" if case == "batch_of_4" else "1 image ("
    assert expected in entry["outputs"]["enc"]["unifusion_summary"][0]


# -- latents -------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, height", [(72, 64), (68, 60)])
def test_sizes_off_the_patch_grid_are_padded_and_cropped(server: ComfyServer, width: int, height: int) -> None:
    """72 px is a 9-pixel latent (patch 2); 68x60 is floored to 64x56 by EmptyLatentImage (latent 8x7)."""
    prompt = graph(seed=next(SEEDS))
    prompt["latent"]["inputs"].update(width=width, height=height)
    image = image_of(server, works_then_recovers(server, prompt))
    assert image.shape[:2] == (height // 8 * 8, width // 8 * 8)


@pytest.mark.parametrize("value, denoise", [(float("nan"), 1.0), (float("inf"), 0.5)], ids=["nan", "inf"])
def test_non_finite_latent_is_refused_before_sampling(server: ComfyServer, value: float, denoise: float) -> None:
    latent = torch.zeros(1, 4, 8, 8)
    latent[0, 1, 3, 3] = value
    name = f"poisoned_{denoise}.latent"
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, str(server.input_dir / name))
    prompt = graph(seed=next(SEEDS))
    prompt["latent"] = {"class_type": "LoadLatent", "inputs": {"latent": name}}
    prompt["ks"]["inputs"]["denoise"] = denoise
    fails_then_recovers(server, prompt, "ks", "latent_image", "NaN or Inf", "Connect a clean latent")


# -- workflows from older versions ---------------------------------------------------------------

def test_workflow_saved_by_an_older_node_version_uses_defaults(server: ComfyServer, workflows_dir: Path) -> None:
    """Widgets added later (VLM layers and trust_remote_code, LAP gains, Encode system prompt) are
    missing from the saved values; the editor keeps their defaults and the workflow runs."""
    workflow = json.loads((workflows_dir / "text_to_image.json").read_text(encoding="utf-8"))
    trimmed = {"UniFusionVLMLoader": 2, "UniFusionLAPPool": 0, "UniFusionEncode": 1}
    for node in workflow["nodes"]:
        if node["type"] in trimmed:
            node["widgets_values"] = node["widgets_values"][: trimmed[node["type"]]]
    prompt = ui_to_api(workflow, server.object_info())
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 4
    works_then_recovers(server, prompt)


def test_api_prompt_without_a_required_input_is_rejected_by_name(server: ComfyServer) -> None:
    prompt = graph(seed=next(SEEDS))
    del prompt["vlm"]["inputs"]["layers"]
    with pytest.raises(PromptRejected) as err:
        server.queue_prompt(prompt)
    assert "Required input is missing" in str(err.value) and "layers" in str(err.value)
    next_prompt_runs(server)


@pytest.mark.parametrize("node, field, value", [("vlm", "dtype", "fp64"), ("model", "weight_dtype", "int4")])
def test_unknown_option_from_a_hand_made_prompt(server: ComfyServer, node: str, field: str, value: str) -> None:
    """ComfyUI 0.3.64 does not check V3 combo values against their options: the loader does."""
    prompt = graph(seed=next(SEEDS))
    prompt[node]["inputs"][field] = value
    fails_then_recovers(server, prompt, node, f"{field} {value!r}" if field == "weight_dtype" else f"{field}: "
                        f"{value!r}", "is not one of")


def test_server_survived_every_case(server: ComfyServer) -> None:
    assert server.process.poll() is None
    assert server.queue_state() == {"queue_running": [], "queue_pending": []}
    assert VLM in server.object_info("UniFusionVLMLoader")["UniFusionVLMLoader"]["input"]["required"]["vlm"][1][
        "options"]
    assert CKPT in server.object_info("UniFusionModelLoader")["UniFusionModelLoader"]["input"]["required"][
        "checkpoint"][1]["options"]
