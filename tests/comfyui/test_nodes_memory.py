"""The VLM is a model ComfyUI's memory manager can offload and that comes back intact; the MODEL's
sampling settings, latent format and preview colours.

On a GPU, ``load_models_gpu`` for sampling calls ``free_memory(needed, gpu)`` when the DiT does
not fit beside the VLM; on a CPU-only machine it never calls it (every device is the CPU). So
this test runs the pack inside ComfyUI's own interpreter, loads both models through the nodes'
code, and then makes exactly that call with ComfyUI's free-memory reading patched to a budget
the VLM does not fit in beside the DiT: deterministic, no real memory pressure needed.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from harness import find_python
from tiny_unifusion import ensure_tiny_files

REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent('''
    import importlib.util, json, sys
    comfy_dir, repo, vlm_dir, ckpt, vae = sys.argv[1:6]
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.model_management as mm
    spec = importlib.util.spec_from_file_location("unifusion_pack", repo + "/__init__.py",
                                                  submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["unifusion_pack"] = pack
    spec.loader.exec_module(pack)
    from pathlib import Path
    from unifusion_pack.nodes.encoding import encode_features
    from unifusion_pack.nodes.model import load_model_patcher
    from unifusion_pack.nodes.vlm import load_vlm_patcher

    def loaded():
        return [type(m.model.model).__name__ for m in mm.current_loaded_models]

    vlm = load_vlm_patcher(Path(vlm_dir), "default", "paper")
    dit = load_model_patcher(Path(ckpt))
    with torch.inference_mode():
        before = encode_features(vlm, "a red circle", None).features.features
    after_encode = loaded()
    vlm_size, dit_size = vlm.model_size(), dit.model_size()
    device = torch.device("cpu")
    budget = {"free": vlm_size // 2}  # the DiT needs more than is free while the VLM is loaded
    mm.get_free_memory = lambda dev=None, torch_free_too=False: (
        (budget["free"], budget["free"]) if torch_free_too else budget["free"])
    needed = dit_size + mm.minimum_inference_memory()
    unloaded = [type(m.model.model).__name__ for m in mm.free_memory(needed, device)]
    after_free = loaded()
    weight_memory = vlm.model.model_loaded_weight_memory
    mm.get_free_memory = lambda dev=None, torch_free_too=False: (1 << 40, 1 << 40) if torch_free_too else 1 << 40
    with torch.inference_mode():
        again = encode_features(vlm, "a red circle", None).features.features
    with_vae = load_model_patcher(Path(ckpt), vae_path=Path(vae)).model
    fmt = with_vae.latent_format
    settings = {"shift": float(with_vae.model_sampling.shift), "multiplier": float(with_vae.model_sampling.multiplier),
                "model_type": with_vae.model_type.name, "latent_channels": fmt.latent_channels,
                "rgb_factors": fmt.latent_rgb_factors, "rgb_factors_without_vae": dit.model.latent_format.latent_rgb_factors,
                "memory_usage_factor": with_vae.memory_usage_factor}
    import comfy.sampler_helpers
    from types import SimpleNamespace
    cond = {"cross_attn": torch.zeros(1, 40, 64)}
    estimates = [comfy.sampler_helpers.estimate_memory(SimpleNamespace(model=with_vae), (b, 4, 8, 8),
                                                       {"positive": [cond], "negative": [dict(cond)]})[0]
                 for b in (1, 4)]
    settings["estimate_batch4_over_batch1"] = estimates[1] / estimates[0]
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args
    args.preview_method = LatentPreviewMethod.Latent2RGB
    previewer = latent_preview.get_previewer(device, fmt)
    kind, preview, _ = previewer.decode_latent_to_preview_image("JPEG", torch.randn(1, 4, 8, 6))
    settings["preview"] = [type(previewer).__name__, list(preview.size)]
    from unifusion_pack.unifusion.checkpoint import load_model as library_model
    reference, _ = library_model(ckpt)  # plain torch layers and SDPA
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 64, generator=gen)
    t, mask = torch.tensor([0.7, 0.3]), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.inference_mode():
        ours = with_vae.diffusion_model.float()(x, t, context=ctx, context_mask=mask)
        theirs = reference(x, t, ctx, mask.bool())
    settings["padded_mask_max_error"] = float((ours - theirs).abs().max())
    settings["output_scale"] = float(theirs.abs().max())
    print(json.dumps({"settings": settings, "after_encode": after_encode, "unloaded": unloaded, "after_free": after_free,
                      "vlm_weight_memory_after_free": weight_memory, "reloaded": loaded(),
                      "same_features": bool(torch.equal(before, again))}))
''')


_REPORTS: dict[str, dict] = {}


def _probe(comfy_dir: Path, files) -> dict:
    """Run the probe once per session in ComfyUI's interpreter; its last output line is a JSON report."""
    if "report" not in _REPORTS:
        result = subprocess.run(
            [find_python(comfy_dir), "-c", PROBE, str(comfy_dir), str(REPO), str(files.vlm), str(files.checkpoint),
             str(files.vae)],
            capture_output=True, text=True, timeout=600, cwd=comfy_dir)
        assert result.returncode == 0, result.stderr[-4000:]
        _REPORTS["report"] = json.loads(result.stdout.strip().splitlines()[-1])
    return _REPORTS["report"]


def test_vlm_is_offloaded_for_sampling_room_and_reloads_intact(comfy_dir: Path, comfy_server,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    report = _probe(comfy_dir, ensure_tiny_files(comfy_server, tmp_path_factory))
    assert report["after_encode"] == ["VLMHolder"]
    assert report["unloaded"] == ["VLMHolder"], report
    assert report["after_free"] == []
    assert report["vlm_weight_memory_after_free"] == 0
    assert report["reloaded"] == ["VLMHolder"]
    assert report["same_features"]


def test_model_sampling_latent_format_and_preview_colours(comfy_dir: Path, comfy_server,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    files = ensure_tiny_files(comfy_server, tmp_path_factory)
    report = _probe(comfy_dir, files)["settings"]
    assert report["model_type"] == "FLOW" and report["shift"] == 3.0 and report["multiplier"] == 1.0
    assert report["latent_channels"] == 4
    fitted, gray = report["rgb_factors"], report["rgb_factors_without_vae"]
    assert len(fitted) == 4 and all(len(row) == 3 for row in fitted)
    assert gray == [[0.25] * 3] * 4 and fitted != gray  # fitted to the decoder when the VAE is known
    assert report["memory_usage_factor"] > 0
    # every latent of a batch has its own copy of the condition tokens: 4x the batch, 4x the estimate
    assert report["estimate_batch4_over_batch1"] == pytest.approx(4.0, rel=1e-6)
    assert report["padded_mask_max_error"] < 1e-4 * max(1.0, report["output_scale"])  # ComfyUI attention + mask
    assert report["preview"] == ["Latent2RGBPreviewer", [6, 8]]  # live previews during sampling work
