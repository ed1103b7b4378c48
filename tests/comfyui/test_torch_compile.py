"""ComfyUI's native TorchCompileModel on a UniFusion MODEL: KSampler samples through the compiled
diffusion model and draws what the eager model draws. Inductor's kernels round differently from
eager ones, so the images are compared within a few levels, not for equality. Inductor builds its
CPU kernels with a C++ compiler, so the test needs one on PATH.

Run with TORCH_LOGS=graph_breaks, dynamo reports breaks only at the NaN/Inf guard at the top of the
forward (nodes/finite.py reads the tensors to name the fix; it runs outside dynamo by design, so no
warning is printed) and, under ComfyUI's CPU default (sub-quadratic) attention, at its free-memory
query; the DiT's blocks compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from harness import ComfyServer
from test_nodes import SEEDS, fails_then_recovers, graph, image_of, sampling


@pytest.mark.needs_cpp_compiler
def test_torch_compile_model_samples_what_the_eager_model_does(server: ComfyServer) -> None:
    seed = next(SEEDS)
    eager = graph(seed=seed, prefix="compile_eager")
    compiled = graph(seed=seed, prefix="compile_inductor")
    compiled["compiled"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["model", 0], "backend": "inductor"}}
    compiled.update(sampling("lap", model="compiled", seed=seed, prefix="compile_inductor"))

    expected = image_of(server, server.run(eager))
    got = image_of(server, server.run(compiled, timeout=900))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 3, "the compiled model drew another image"


@pytest.mark.needs_cpp_compiler
def test_a_compiled_model_still_names_the_fix_for_a_nan_latent(server: ComfyServer) -> None:
    """The NaN/Inf guard runs eagerly inside the compiled forward and its error reaches the user."""
    latent = torch.zeros(1, 4, 8, 8)
    latent[0, 2, 4, 4] = float("nan")
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
              str(server.input_dir / "poisoned_compiled.latent"))
    seed = next(SEEDS)
    prompt = graph(seed=seed, prefix="compile_nan")
    prompt["compiled"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["model", 0], "backend": "inductor"}}
    prompt.update(sampling("lap", model="compiled", seed=seed, prefix="compile_nan"))
    prompt["latent"] = {"class_type": "LoadLatent", "inputs": {"latent": "poisoned_compiled.latent"}}
    fails_then_recovers(server, prompt, "ks", "latent_image", "NaN or Inf", "Connect a clean latent")
