"""Shared constants and small builders of the training tests (imported by name, like tests/comfyui/harness)."""

from __future__ import annotations

from unifusion.config import DiTConfig

VERIFI_TOKENS = 6


def tiny_dit(depth: int = 2) -> DiTConfig:
    """A 32-wide DiT on the 4-channel tiny-autoencoder latent."""
    return DiTConfig(in_channels=4, patch_size=1, hidden_size=32, depth=depth, num_heads=2, time_embed_dim=32,
                     rope_axes=(4, 6, 6))
