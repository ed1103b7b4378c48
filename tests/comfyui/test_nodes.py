"""The pack's nodes in a real ComfyUI: schema, clear errors that leave the server usable,
caching, dtype and LoRA support, odd reference images."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from harness import PACK_NAME, ComfyServer, PromptFailed
from tiny_unifusion import ensure_tiny_files

VLM, CKPT, VAE = "unifusion-demo-vlm", "unifusion-demo.safetensors", "unifusion-demo-vae.safetensors"
OUR_NODES = ("UniFusionVLMLoader", "UniFusionModelLoader", "UniFusionReference", "UniFusionEncode",
             "UniFusionVerifiRewrite", "UniFusionLAPPool", "UniFusionTextEncode", "UniFusionGuidanceInterval")


def graph(text: str = "a red circle", vlm: str = VLM, layers: str = "paper", gains: str = "",
          checkpoint: str = CKPT, weight_dtype: str = "default", seed: int = 1, prefix: str = "nodes") -> dict:
    """Encode -> LAP -> KSampler (4 steps) -> decode -> save."""
    return {
        "vlm": {"class_type": "UniFusionVLMLoader", "inputs": {"vlm": vlm, "dtype": "default", "layers": layers}},
        "model": {"class_type": "UniFusionModelLoader",
                  "inputs": {"checkpoint": checkpoint, "weight_dtype": weight_dtype}},
        "enc": {"class_type": "UniFusionEncode", "inputs": {"vlm": ["vlm", 0], "text": text, "system_prompt": ""}},
        "lap": {"class_type": "UniFusionLAPPool",
                "inputs": {"model": ["model", 0], "features": ["enc", 0], "layer_gains": gains}},
        **sampling("lap", seed=seed, prefix=prefix),
    }


def sampling(positive: str, model: str = "model", seed: int = 1, prefix: str = "nodes", batch: int = 1) -> dict:
    return {
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [positive, 0]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": [model, 0], "positive": [positive, 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 4, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": prefix}},
    }


def image_of(server: ComfyServer, entry: dict) -> np.ndarray:
    paths = [p for p in server.output_images(entry) if p.parent == server.output_dir]
    return np.asarray(Image.open(paths[0]).convert("RGB")).astype(np.int64)


def executed(entry: dict, prompt: dict) -> set[str]:
    cached = {n for event, data in entry["status"]["messages"] if event == "execution_cached"
              for n in data.get("nodes", [])}
    return set(prompt) - cached


SEEDS = itertools.count(1000)  # fresh seeds: ComfyUI cannot answer from its cache


def next_prompt_runs(server: ComfyServer) -> None:
    """A normal prompt with a fresh seed: the sampler really runs and saves a sane image."""
    assert image_of(server, server.run(graph(seed=next(SEEDS)))).std() > 2.0


def fails_then_recovers(server: ComfyServer, bad: dict, node: str, *fragments: str) -> str:
    """The bad prompt fails at `node` with a message holding every fragment and no traceback;
    a normal prompt then runs (`next_prompt_runs`)."""
    with pytest.raises(PromptFailed) as err:
        server.run(bad)
    assert err.value.node_id == node, err.value
    message = err.value.exception_message
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in message
    next_prompt_runs(server)
    return message


# -- schema ------------------------------------------------------------------------------------

def test_nodes_are_registered_with_tooltips_and_category(server: ComfyServer) -> None:
    info = server.object_info()
    ours = sorted(n for n, i in info.items() if i.get("python_module") == f"custom_nodes.{PACK_NAME}")
    assert ours == sorted(OUR_NODES)
    for name in OUR_NODES:
        node = info[name]
        assert node["category"] == "UniFusion" and node["display_name"] and node["description"]
        for group in ("required", "optional"):
            for input_name, spec in node["input"].get(group, {}).items():
                assert (spec[1] or {}).get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert all(node["output_tooltips"]), f"{name} has outputs without tooltips"
    assert info["UniFusionVLMLoader"]["input"]["required"]["vlm"][1]["options"] == ["other-vlm", VLM]
    assert CKPT in info["UniFusionModelLoader"]["input"]["required"]["checkpoint"][1]["options"]
    assert info["UniFusionVerifiRewrite"]["output"] == ["UNIFUSION_FEATURES", "STRING"]


# -- errors ------------------------------------------------------------------------------------

def test_vlm_checkpoint_mismatch_is_explained(server: ComfyServer) -> None:
    message = fails_then_recovers(server, graph(vlm="other-vlm"), "lap", "was trained with a",
                                  "hidden size 64", "hidden size 32", "Load the VLM the checkpoint was trained with")
    assert CKPT in message


def test_text_encode_checks_the_vlm_before_encoding(server: ComfyServer) -> None:
    bad = {
        "vlm": {"class_type": "UniFusionVLMLoader", "inputs": {"vlm": "other-vlm", "dtype": "default",
                                                               "layers": "paper"}},
        "model": {"class_type": "UniFusionModelLoader", "inputs": {"checkpoint": CKPT, "weight_dtype": "default"}},
        "te": {"class_type": "UniFusionTextEncode", "inputs": {"vlm": ["vlm", 0], "model": ["model", 0],
                                                               "text": "a cat", "verifi": False,
                                                               "max_new_tokens": 16}},
        **sampling("te"),
    }
    fails_then_recovers(server, bad, "te", "hidden size 32")


def test_missing_and_foreign_checkpoints_are_explained(server: ComfyServer, tmp_path) -> None:
    gone = tmp_path / "gone.safetensors"
    gone.write_bytes(b"")
    server.link_model("diffusion_models", gone, "gone.safetensors")
    gone.unlink()  # the listed link now points nowhere
    fails_then_recovers(server, graph(checkpoint="gone.safetensors"), "model", "'gone.safetensors' was not found",
                        "models/diffusion_models/")
    files = ensure_tiny_files(server, None)
    server.link_model("diffusion_models", files.vae, "not_unifusion.safetensors")
    fails_then_recovers(server, graph(checkpoint="not_unifusion.safetensors"), "model",
                        "not a UniFusion checkpoint", "looks like a VAE")


def test_empty_prompt_is_explained(server: ComfyServer) -> None:
    fails_then_recovers(server, graph(text="  "), "enc", "the text is empty", "UniFusion Reference")


def test_bad_layer_gains_are_explained(server: ComfyServer) -> None:
    fails_then_recovers(server, graph(gains="1, 2, 3"), "lap", "layer_gains", "3 values given", "pools 2")


def test_layer_selection_mismatch_names_the_fix(server: ComfyServer) -> None:
    fails_then_recovers(server, graph(layers="4, 5"), "lap", "Set 'layers' on Load UniFusion VLM to '4, 7'")
    server.run(graph(layers="all"))  # a superset of the checkpoint's layers works


def test_bad_layers_on_the_loader(server: ComfyServer) -> None:
    fails_then_recovers(server, graph(layers="4, 99"), "vlm", "outside 0..8")


# -- behaviour ---------------------------------------------------------------------------------

def test_gains_change_the_image_and_ones_do_not(server: ComfyServer) -> None:
    base = image_of(server, server.run(graph(seed=3)))
    ones = image_of(server, server.run(graph(seed=3, gains="1, 1")))
    dropped = image_of(server, server.run(graph(seed=3, gains="7=0")))
    assert np.array_equal(base, ones)  # sampling is deterministic, so any difference is the gains' doing
    assert np.count_nonzero(base != dropped) > 0.1 * base.size


def with_guidance_interval(prompt: dict, guidance_min_t: float, guidance_max_t: float) -> dict:
    """The prompt with UniFusion Guidance Interval between the model loader and KSampler."""
    prompt["guid"] = {"class_type": "UniFusionGuidanceInterval",
                      "inputs": {"model": ["model", 0], "guidance_min_t": guidance_min_t,
                                 "guidance_max_t": guidance_max_t}}
    prompt["ks"]["inputs"]["model"] = ["guid", 0]
    return prompt


def test_guidance_interval_changes_only_the_unguided_steps(server: ComfyServer) -> None:
    base = image_of(server, server.run(graph(seed=3)))
    every_step = image_of(server, server.run(with_guidance_interval(graph(seed=3), 0.0, 1.0)))
    limited = image_of(server, server.run(with_guidance_interval(graph(seed=3), 0.5, 0.8)))
    assert np.array_equal(base, every_step)  # (0, 1) guides every step, as KSampler alone does
    assert np.count_nonzero(base != limited) > 0.1 * base.size  # 4 steps at t 1, 0.9, 0.75, 0.5: two unguided
    plain, plain_limited = graph(seed=3), with_guidance_interval(graph(seed=3), 0.2, 0.5)
    for prompt in (plain, plain_limited):
        prompt["ks"]["inputs"]["cfg"] = 1.0
    # without CFG there is nothing to limit
    assert np.array_equal(image_of(server, server.run(plain)), image_of(server, server.run(plain_limited)))


def test_reversed_guidance_interval_is_explained(server: ComfyServer) -> None:
    fails_then_recovers(server, with_guidance_interval(graph(seed=4), 0.9, 0.8), "guid",
                        "guidance interval needs 0 <= guidance_min_t <= guidance_max_t <= 1", "got 0.9 and 0.8")


def test_odd_reference_images(server: ComfyServer) -> None:
    """A 1x1 image, an 8x2048 strip and a batch of two become four references."""
    prompt = {
        "tiny": {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 255}},
        "strip": {"class_type": "EmptyImage", "inputs": {"width": 2048, "height": 8, "batch_size": 1,
                                                         "color": 0xFF0000}},
        "pair": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 24, "batch_size": 2, "color": 0}},
        "r1": {"class_type": "UniFusionReference", "inputs": {"image": ["tiny", 0], "max_tiles": 1}},
        "r2": {"class_type": "UniFusionReference", "inputs": {"image": ["strip", 0], "max_tiles": 12,
                                                              "references": ["r1", 0]}},
        "r3": {"class_type": "UniFusionReference", "inputs": {"image": ["pair", 0], "max_tiles": 2,
                                                              "references": ["r2", 0]}},
        **{k: v for k, v in graph(text="").items() if k != "enc"},
        "enc": {"class_type": "UniFusionEncode", "inputs": {"vlm": ["vlm", 0], "text": "",
                                                            "references": ["r3", 0], "system_prompt": ""}},
    }
    entry = server.run(prompt)
    summary = entry["outputs"]["enc"]["unifusion_summary"][0]
    assert "4 images" in summary and "tiles <= 1, 12, 2, 2" in summary, summary
    assert image_of(server, entry).std() > 2.0


def test_unchanged_inputs_are_cached_changed_prompt_or_seed_rerun(server: ComfyServer) -> None:
    def verifi(system: str, seed: int) -> dict:
        return {
            "vlm": {"class_type": "UniFusionVLMLoader", "inputs": {"vlm": VLM, "dtype": "default",
                                                                   "layers": "paper"}},
            "ver": {"class_type": "UniFusionVerifiRewrite", "inputs": {
                "vlm": ["vlm", 0], "text": "two circles", "system_prompt": system, "max_new_tokens": 8,
                "seed": seed, "do_sample": True}},
        }

    first = verifi("rewrite it", 1)
    server.run(first)
    assert executed(server.run(verifi("rewrite it", 1)), first) == set()
    assert executed(server.run(verifi("rewrite it in detail", 1)), first) == {"ver"}
    assert executed(server.run(verifi("rewrite it in detail", 2)), first) == {"ver"}


def test_verifi_seed_matters_only_when_sampling(server: ComfyServer) -> None:
    def rewrite(seed: int, sample: bool) -> str:
        prompt = {
            "vlm": {"class_type": "UniFusionVLMLoader", "inputs": {"vlm": VLM, "dtype": "default",
                                                                   "layers": "paper"}},
            "ver": {"class_type": "UniFusionVerifiRewrite", "inputs": {
                "vlm": ["vlm", 0], "text": "a blue square", "system_prompt": "", "max_new_tokens": 12,
                "seed": seed, "do_sample": sample}},
        }
        return server.run(prompt)["outputs"]["ver"]["unifusion_text"][0]

    assert rewrite(1, False) == rewrite(2, False)
    sampled = {rewrite(seed, True) for seed in (11, 12, 13)}
    assert len(sampled) > 1


def test_text_encode_with_verifi_outputs_the_rewrite(server: ComfyServer) -> None:
    prompt = {
        "vlm": {"class_type": "UniFusionVLMLoader", "inputs": {"vlm": VLM, "dtype": "default", "layers": "4"}},
        "model": {"class_type": "UniFusionModelLoader", "inputs": {"checkpoint": CKPT, "weight_dtype": "default"}},
        "te": {"class_type": "UniFusionTextEncode", "inputs": {"vlm": ["vlm", 0], "model": ["model", 0],
                                                               "text": "a cat", "verifi": True,
                                                               "max_new_tokens": 10}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["te", 1]}},
        **sampling("te"),
    }
    entry = server.run(prompt)  # the loader captures only layer 4: Text Encode uses the checkpoint's layers
    assert entry["outputs"]["show"]["text"][0] == entry["outputs"]["te"]["unifusion_text"][0]
    assert entry["outputs"]["te"]["unifusion_summary"][0].startswith("rewrite: 10 tokens (cut at max_new_tokens)")


def test_fp8_storage_and_bf16_run(server: ComfyServer) -> None:
    base = image_of(server, server.run(graph(seed=9, weight_dtype="fp32")))
    for dtype in ("fp8_e4m3fn", "bf16"):
        image = image_of(server, server.run(graph(seed=9, weight_dtype=dtype)))
        assert image.std() > 2.0
        assert np.abs(image - base).mean() < 20.0  # lower precision, same picture
    assert "model weight dtype torch.float8_e4m3fn, manual cast: torch.float32" in server.log_text()


def test_vlm_fp8_storage_gives_the_same_picture(server: ComfyServer) -> None:
    base = image_of(server, server.run(graph(seed=9)))
    prompt = graph(seed=9, prefix="vlm_fp8")
    prompt["vlm"]["inputs"]["dtype"] = "fp8_e4m3fn"
    image = image_of(server, server.run(prompt))
    assert np.abs(image - base).mean() < 20.0 and not np.array_equal(image, base)
    assert "Linear layers stored in fp8" in server.log_text()


def test_lora_on_dit_keys_loads_and_changes_the_image(server: ComfyServer, tmp_path) -> None:
    key = "diffusion_model.dit.blocks.0.attn.qkv"
    gen = torch.Generator().manual_seed(0)
    lora = {f"{key}.lora_up.weight": torch.randn(192, 4, generator=gen),
            f"{key}.lora_down.weight": torch.randn(4, 64, generator=gen),
            f"{key}.alpha": torch.tensor(4.0)}
    path = tmp_path / "tiny_lora.safetensors"
    save_file(lora, str(path))
    server.link_model("loras", path)
    prompt = graph(seed=4)
    base = image_of(server, server.run(prompt))
    prompt["lora"] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": ["model", 0], "lora_name": path.name, "strength_model": 1.0}}
    prompt["lap"]["inputs"]["model"] = ["lora", 0]
    prompt["ks"]["inputs"]["model"] = ["lora", 0]
    patched = image_of(server, server.run(prompt))
    assert np.abs(patched - base).mean() > 0.5
    assert "lora key not loaded" not in server.log_text()


def test_batch_of_four_from_one_condition(server: ComfyServer) -> None:
    prompt = graph(seed=21)
    prompt.update(sampling("lap", seed=21, batch=4, prefix="batch4"))
    entry = server.run(prompt)
    paths = [p for p in server.output_images(entry) if p.parent == server.output_dir]
    images = [np.asarray(Image.open(p)) for p in paths]
    assert len(images) == 4 and len({i.tobytes() for i in images}) == 4


def test_history_outputs_are_json(server: ComfyServer) -> None:
    entry = server.run(graph(text="a green square"))
    json.dumps(entry["outputs"])
    assert entry["outputs"]["enc"]["unifusion_summary"][0].endswith("no images")


def test_concatenated_conditionings_sample(server: ComfyServer) -> None:
    """ConditioningConcat appends tokens but keeps the first mask; the model treats them as real."""
    prompt = graph(text="a red circle")
    prompt["enc2"] = {"class_type": "UniFusionEncode", "inputs": {"vlm": ["vlm", 0], "text": "on the left",
                                                                  "system_prompt": ""}}
    prompt["lap2"] = {"class_type": "UniFusionLAPPool", "inputs": {"model": ["model", 0], "features": ["enc2", 0],
                                                                   "layer_gains": ""}}
    prompt["cat"] = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["lap", 0],
                                                                     "conditioning_from": ["lap2", 0]}}
    prompt["neg"]["inputs"]["conditioning"] = ["cat", 0]
    prompt["ks"]["inputs"]["positive"] = ["cat", 0]
    assert image_of(server, server.run(prompt)).std() > 2.0
