"""The harness itself: UI-workflow conversion, outputs, errors and interrupts, on core nodes only."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from harness import ComfyServer, PromptFailed, PromptInterrupted, PromptRejected
from ui_workflow import WorkflowConversionError, ui_to_api

RED, CYAN = 0xFF0000, (0, 255, 255)


def _node(node_id: int, node_type: str, widgets: list | None = None, inputs: list | None = None,
          mode: int = 0, outputs: list | None = None) -> dict:
    return {"id": node_id, "type": node_type, "mode": mode, "widgets_values": widgets,
            "inputs": inputs or [], "outputs": outputs or []}


def _link(link_id: int, origin: int, slot: int, target: int, target_slot: int, io_type: str) -> list:
    return [link_id, origin, slot, target, target_slot, io_type]


def _image_chain_workflow(prefix: str) -> dict:
    """Primitive -> EmptyImage(red) -> bypassed invert -> reroute -> invert -> save; plus a muted loader."""
    image_in = [{"name": "image", "type": "IMAGE", "link": None}]
    nodes = [
        _node(7, "PrimitiveNode", [24, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [1]}]),
        _node(1, "EmptyImage", [24, 16, 2, RED],
              inputs=[{"name": "width", "type": "INT", "widget": {"name": "width"}, "link": 1}]),
        _node(2, "ImageInvert", None, inputs=[dict(image_in[0], link=2)], mode=4),
        _node(3, "Reroute", None, inputs=[{"name": "", "type": "*", "link": 3}]),
        _node(4, "ImageInvert", None, inputs=[dict(image_in[0], link=4)]),
        _node(5, "SaveImage", [prefix], inputs=[{"name": "images", "type": "IMAGE", "link": 5}]),
        _node(6, "Note", ["a note is not executed"]),
        _node(8, "VAELoader", ["missing_file_would_fail.safetensors"], mode=2),
    ]
    links = [_link(1, 7, 0, 1, 0, "INT"), _link(2, 1, 0, 2, 0, "IMAGE"), _link(3, 2, 0, 3, 0, "IMAGE"),
             _link(4, 3, 0, 4, 0, "IMAGE"), _link(5, 4, 0, 5, 0, "IMAGE")]
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_ui_workflow_converts_and_runs(comfy_server: ComfyServer) -> None:
    workflow = _image_chain_workflow("harness_chain")
    prompt = ui_to_api(workflow, comfy_server.object_info())
    assert sorted(prompt) == ["1", "4", "5"]
    assert prompt["1"]["inputs"] == {"width": 24, "height": 16, "batch_size": 2, "color": RED}
    assert prompt["4"]["inputs"] == {"image": ["1", 0]}
    entry = comfy_server.run(prompt, timeout=120)
    paths = comfy_server.output_images(entry)
    assert len(paths) == 2
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape == (16, 24, 3)
        assert (pixels == np.array(CYAN, dtype=np.uint8)).all()


def test_seed_control_value_and_defaults(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    workflow = {"nodes": [
        _node(3, "KSampler", [156680208700286, "randomize", 20, 8, "euler", "normal", 1]),
        _node(9, "SaveImage", None),
    ], "links": []}
    prompt = ui_to_api(workflow, info)
    assert prompt["3"]["inputs"] == {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1}
    assert prompt["9"]["inputs"] == {"filename_prefix": "ComfyUI"}


def test_load_image_upload_widget(comfy_server: ComfyServer) -> None:
    rgb = np.zeros((8, 12, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, np.arange(12, dtype=np.uint8)[None, :] * 20
    Image.fromarray(rgb).save(comfy_server.input_dir / "harness_probe.png")
    workflow = {"nodes": [
        _node(1, "LoadImage", ["harness_probe.png", "image"]),
        _node(2, "SaveImage", ["harness_load"], inputs=[{"name": "images", "type": "IMAGE", "link": 1}]),
    ], "links": [_link(1, 1, 0, 2, 0, "IMAGE")]}
    entry = comfy_server.run_ui_workflow(workflow, timeout=120)
    (path,) = comfy_server.output_images(entry)
    assert (np.asarray(Image.open(path).convert("RGB")) == rgb).all()


def test_unknown_node_type_names_the_node(comfy_server: ComfyServer) -> None:
    workflow = {"nodes": [_node(5, "UniFusionDoesNotExist", [])], "links": []}
    with pytest.raises(WorkflowConversionError, match="node 5 has type 'UniFusionDoesNotExist'"):
        ui_to_api(workflow, comfy_server.object_info())


def test_rejected_prompt_reports_node_errors(comfy_server: ComfyServer) -> None:
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    with pytest.raises(PromptRejected) as err:
        comfy_server.queue_prompt(prompt)
    assert "1" in err.value.node_errors
    assert "width" in str(err.value)


def test_failed_prompt_raises_node_message(comfy_server: ComfyServer, tmp_path) -> None:
    from safetensors.numpy import save_file

    bogus = tmp_path / "harness_not_a_vae.safetensors"
    save_file({"not_a_vae.weight": np.zeros(2, dtype=np.float32)}, str(bogus))
    comfy_server.link_model("vae", bogus)
    prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": bogus.name}},
              "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    with pytest.raises(PromptFailed) as err:
        comfy_server.run(prompt, timeout=120)
    assert err.value.node_id == "1" and err.value.node_type == "VAELoader"
    assert "VAE is invalid" in err.value.exception_message


def test_interrupt_stops_running_prompt(comfy_server: ComfyServer) -> None:
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 4,
                                                          "color": 0x123456}}}
    previous = "1"
    for node_id in range(2, 12):
        prompt[str(node_id)] = {"class_type": "ImageBlur",
                                "inputs": {"image": [previous, 0], "blur_radius": 31, "sigma": 5.0}}
        previous = str(node_id)
    prompt["99"] = {"class_type": "PreviewImage", "inputs": {"images": [previous, 0]}}
    prompt_id = comfy_server.queue_prompt(prompt)
    while not any(item[1] == prompt_id for item in comfy_server.queue_state()["queue_running"]):
        assert prompt_id not in comfy_server.get("/history"), "the prompt ended before it could be interrupted"
        time.sleep(0.02)
    comfy_server.interrupt(prompt_id)
    with pytest.raises(PromptInterrupted):
        comfy_server.wait(prompt_id, timeout=300)
