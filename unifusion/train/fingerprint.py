"""Fingerprints that tell whether a feature cache still matches the VLM and VAE in use.

Both are hashes of the loaded weights (not of file bytes), so a model loaded from a file and
the same model held in memory (e.g. the demo right after training it) agree. The VAE is
hashed completely (it is small); the VLM is hashed by name, shape, dtype and an evenly
strided sample of each tensor, which any retraining changes, so an 8B model is checked in
seconds. The VLM's tokenizer vocabulary and chat template are part of its fingerprint:
they change what gets encoded.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional

import torch

VLM_SAMPLE_ELEMENTS = 4096


def _tensor_bytes(t: torch.Tensor, max_elements: Optional[int]) -> bytes:
    flat = t.detach().reshape(-1)
    if max_elements is not None and flat.numel() > max_elements:
        step = flat.numel() // max_elements
        flat = flat[::step][:max_elements]
    return flat.contiguous().cpu().view(torch.uint8).numpy().tobytes()


def state_fingerprint(state: Mapping[str, torch.Tensor], max_elements: Optional[int] = None) -> str:
    """sha256 over sorted names, shapes, dtypes and tensor bytes (all, or ``max_elements`` per tensor)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(_tensor_bytes(tensor, max_elements))
    return digest.hexdigest()


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Hash of the VAE weights that make the latents (class name included: a pixel-space VAE has
    almost no weights). A TAESD-layout decoder does not change the latents, so a finetuned
    decoder (`unifusion.vae.finetune_decoder`) keeps a feature cache valid."""
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith("taesd_decoder.")}
    return hashlib.sha256(f"{type(vae).__name__}|{state_fingerprint(state)}".encode()).hexdigest()


def vlm_fingerprint(vlm: Any) -> str:
    """Hash of a `LoadedVLM`: sampled weights, vocabulary and chat template."""
    digest = hashlib.sha256()
    digest.update(state_fingerprint(vlm.model.state_dict(), VLM_SAMPLE_ELEMENTS).encode())
    tokenizer = vlm.tokenizer
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    digest.update(json.dumps(vocab).encode())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return digest.hexdigest()
