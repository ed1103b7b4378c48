"""The example workflows in workflows/ run in a real ComfyUI and give sane, reproducible images.

They reference the bundled demo file names; the tiny random model is linked into the server's
model folders under those names (tiny_unifusion.py), so the files run unchanged. Only the step
count is lowered (20 -> 4) to keep the tests fast on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import PACK_NAME, ComfyServer
from tiny_unifusion import ensure_tiny_files
from ui_workflow import ui_to_api

WORKFLOWS = ("text_to_image", "single_reference_edit", "multi_reference_edit", "verifi_rewrite", "batch_seed_sweep")
TEST_STEPS = 4
IMAGE_SIZE = 64


def load_prompt(server: ComfyServer, workflows_dir: Path, name: str, **ksampler: object) -> dict:
    workflow = json.loads((workflows_dir / f"{name}.json").read_text(encoding="utf-8"))
    prompt = ui_to_api(workflow, server.object_info())
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"].update({"steps": TEST_STEPS, **ksampler})
    return prompt


def saved_images(server: ComfyServer, entry: dict) -> list[np.ndarray]:
    paths = [p for p in server.output_images(entry) if p.parent == server.output_dir]
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(paths)]


def executed_nodes(entry: dict, prompt: dict) -> set[str]:
    cached = set()
    for event, data in entry["status"]["messages"]:
        if event == "execution_cached":
            cached.update(data.get("nodes", []))
    return set(prompt) - cached


def node_ids(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, node in prompt.items() if node["class_type"] == class_type]


def check_image(image: np.ndarray) -> None:
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert image.std() > 2.0, "the image is blank"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_and_saves_images(server: ComfyServer, workflows_dir: Path, name: str) -> None:
    prompt = load_prompt(server, workflows_dir, name)
    entry = server.run(prompt, timeout=600)
    images = saved_images(server, entry)
    expected = 4 if name == "batch_seed_sweep" else 1
    assert len(images) == expected
    for image in images:
        check_image(image)
    if name == "batch_seed_sweep":  # four noises, four different images
        assert len({image.tobytes() for image in images}) == 4
    if name.endswith("reference_edit"):  # the generated references are shown too
        previews = [p for p in server.output_images(entry) if p.parent == server.temp_dir]
        assert len(previews) == (3 if name.startswith("multi") else 1)


def test_every_workflow_has_a_note_and_demo_names(workflows_dir: Path) -> None:
    for name in WORKFLOWS:
        workflow = json.loads((workflows_dir / f"{name}.json").read_text(encoding="utf-8"))
        types = [n["type"] for n in workflow["nodes"]]
        assert "Note" in types, f"{name}: no Note node"
        note = next(n for n in workflow["nodes"] if n["type"] == "Note")["widgets_values"][0]
        assert "real weights" in note
        values = [v for n in workflow["nodes"] for v in n.get("widgets_values", [])]
        for demo in ("unifusion-demo-vlm", "unifusion-demo.safetensors", "unifusion-demo-vae.safetensors"):
            assert demo in values, f"{name}: does not load {demo}"
        links = {link[0]: link for link in workflow["links"]}
        for node in workflow["nodes"]:  # links and node slots agree, as the editor requires
            for slot, inp in enumerate(node.get("inputs", [])):
                if inp.get("link") is not None:
                    assert links[inp["link"]][3:5] == [node["id"], slot]
            for out in node.get("outputs", []):
                for link_id in out.get("links") or []:
                    assert links[link_id][1] == node["id"]


def test_same_seed_same_pixels_other_seed_other_pixels(server: ComfyServer, workflows_dir: Path) -> None:
    first_prompt = load_prompt(server, workflows_dir, "text_to_image", seed=42)
    first = saved_images(server, server.run(first_prompt))[0]
    other = saved_images(server, server.run(load_prompt(server, workflows_dir, "text_to_image", seed=43)))[0]
    again_prompt = load_prompt(server, workflows_dir, "text_to_image", seed=42)
    entry = server.run(again_prompt)
    sampler = node_ids(again_prompt, "KSampler")[0]
    assert sampler in executed_nodes(entry, again_prompt), "the sampler should have run again"
    encoder = node_ids(again_prompt, "UniFusionEncode")[0]
    assert encoder not in executed_nodes(entry, again_prompt), "an unchanged encode must come from the cache"
    again = saved_images(server, entry)[0]
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1.0


def test_verifi_workflow_shows_the_rewrite(server: ComfyServer, workflows_dir: Path) -> None:
    prompt = load_prompt(server, workflows_dir, "verifi_rewrite")
    entry = server.run(prompt)
    verifi = node_ids(prompt, "UniFusionVerifiRewrite")[0]
    shown = entry["outputs"][verifi]
    text = shown["unifusion_text"][0]
    assert isinstance(text, str) and text.strip()
    assert shown["unifusion_summary"][0].startswith("rewrite: ")
    preview = node_ids(prompt, "PreviewAny")[0]
    assert entry["outputs"][preview]["text"][0] == text


def test_workflows_are_offered_as_templates(server: ComfyServer) -> None:
    templates = server.get("/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == sorted(WORKFLOWS)


def test_web_extension_is_served(server: ComfyServer) -> None:
    extensions = server.get("/extensions")
    ours = [e for e in extensions if e.startswith(f"/extensions/{PACK_NAME}/")]
    assert ours == [f"/extensions/{PACK_NAME}/unifusion.js"]


def test_comfyui_matches_the_library_pipeline(server: ComfyServer, workflows_dir: Path,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """Same prompt, seed, steps, CFG, shift and guidance interval (the workflow's): the native KSampler path and
    unifusion's own sampler give the same picture (up to float differences between the two torch builds)."""
    pipeline = pytest.importorskip("unifusion.pipeline")
    files = ensure_tiny_files(server, tmp_path_factory)
    prompt = load_prompt(server, workflows_dir, "text_to_image", seed=5)
    text = prompt[node_ids(prompt, "UniFusionEncode")[0]]["inputs"]["text"]
    comfy_image = saved_images(server, server.run(prompt))[0].astype(np.float64)
    pipe = pipeline.UniFusionPipeline.from_files(files.vlm, files.checkpoint, files.vae)
    node = prompt[node_ids(prompt, "UniFusionGuidanceInterval")[0]]["inputs"]
    interval = (node["guidance_min_t"], node["guidance_max_t"])

    shift = prompt[node_ids(prompt, "ModelSamplingAuraFlow")[0]]["inputs"]["shift"]  # not the tiny checkpoint's
    condition = pipe.encode(text)

    def ours(guidance: tuple[float, float]) -> np.ndarray:
        images = pipe.sample(condition, IMAGE_SIZE, IMAGE_SIZE, steps=TEST_STEPS, cfg_scale=4.0, seed=5, shift=shift,
                             guidance_min_t=guidance[0], guidance_max_t=guidance[1])
        return np.asarray(images[0].convert("RGB")).astype(np.float64)

    diff = np.abs(comfy_image - ours(interval))
    assert diff.max() <= 2.0
    # and nearer the library's picture with the workflow's interval than with guidance on every step
    assert diff.mean() < np.abs(comfy_image - ours((0.0, 1.0))).mean()


@pytest.mark.parametrize("injection", [False, True], ids=["placed", "placed+injection"])
def test_comfyui_edit_matches_the_library_pipeline(server: ComfyServer, tmp_path_factory: pytest.TempPathFactory,
                                                   injection: bool) -> None:
    """A reference edit through the nodes and the native KSampler equals the library's: the
    reference tokens reach the DiT with their places (without them the library draws another picture),
    also into a DiT with ``image_injection``."""
    from dataclasses import replace

    pipeline = pytest.importorskip("unifusion.pipeline")
    import torch
    from safetensors.torch import load_file

    from unifusion.checkpoint import read_checkpoint_header, save_checkpoint

    files = ensure_tiny_files(server, tmp_path_factory)
    # The tiny model's attention barely moves its output; sharpen it so that places show in the picture.
    weights = {k: v * (4.0 if k.endswith(("q_norm.weight", "k_norm.weight")) else 8.0 if k.endswith("attn.proj.weight")
                       else 1.0) for k, v in load_file(str(files.checkpoint)).items()}
    config = read_checkpoint_header(files.checkpoint).config
    name = "placing_injection.safetensors" if injection else "placing.safetensors"
    if injection:
        config = replace(config, dit=replace(config.dit, image_injection=True))
        width = config.dit.hidden_size
        weights["dit.image_injection.weight"] = torch.randn(width, width, generator=torch.Generator().manual_seed(3))
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("placing") / name, weights, config)
    server.link_model("diffusion_models", checkpoint)
    source = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (250, 250, 250))
    source.paste((220, 30, 30), (8, 8, 30, 30))
    server.input_dir.mkdir(parents=True, exist_ok=True)
    source.save(server.input_dir / "parity_reference.png")
    text, seed = "make the red square blue", 9
    prompt = {
        "vlm": {"class_type": "UniFusionVLMLoader", "inputs": {"vlm": "unifusion-demo-vlm", "dtype": "default",
                                                               "layers": "paper"}},
        "model": {"class_type": "UniFusionModelLoader", "inputs": {"checkpoint": name, "weight_dtype": "default"}},
        "load": {"class_type": "LoadImage", "inputs": {"image": "parity_reference.png"}},
        "ref": {"class_type": "UniFusionReference", "inputs": {"image": ["load", 0], "max_tiles": 1}},
        "enc": {"class_type": "UniFusionEncode", "inputs": {"vlm": ["vlm", 0], "text": text, "system_prompt": "",
                                                            "references": ["ref", 0]}},
        "lap": {"class_type": "UniFusionLAPPool", "inputs": {"model": ["model", 0], "features": ["enc", 0],
                                                             "layer_gains": ""}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["lap", 0]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": IMAGE_SIZE, "height": IMAGE_SIZE,
                                                                "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "positive": ["lap", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": TEST_STEPS, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "unifusion-demo-vae.safetensors"}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "parity_edit"}},
    }
    comfy_image = saved_images(server, server.run(prompt))[0].astype(np.float64)
    pipe = pipeline.UniFusionPipeline.from_files(files.vlm, checkpoint, files.vae)
    assert pipe.config.dit.image_positions and pipe.config.dit.image_injection == injection
    condition = pipe.encode(text, [source], max_tiles=1)
    # this graph has no UniFusion Guidance Interval: KSampler guides every step
    every_step = {"cfg_scale": 4.0, "seed": seed, "guidance_min_t": 0.0, "guidance_max_t": 1.0}
    ours = np.asarray(pipe.sample(condition, IMAGE_SIZE, IMAGE_SIZE, steps=TEST_STEPS, **every_step)[0]
                      .convert("RGB")).astype(np.float64)
    unplaced = np.asarray(pipe.sample(replace(condition, positions=None), IMAGE_SIZE, IMAGE_SIZE, steps=TEST_STEPS,
                                      **every_step)[0].convert("RGB")).astype(np.float64)
    assert np.abs(comfy_image - ours).max() <= 2.0
    assert np.abs(unplaced - ours).max() > 2.0, "places must matter for this check to mean anything"
    if injection:
        with torch.no_grad():
            pipe.model.dit.image_injection.weight.zero_()
        uninjected = np.asarray(pipe.sample(condition, IMAGE_SIZE, IMAGE_SIZE, steps=TEST_STEPS, **every_step)[0]
                                .convert("RGB")).astype(np.float64)
        assert np.abs(uninjected - ours).max() > 2.0, "the injection must matter for this check to mean anything"
