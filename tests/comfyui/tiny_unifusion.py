"""A tiny random UniFusion model (VLM folder, checkpoint, autoencoder) for the integration tests.

Built in the test process with the library, then linked into the server's model folders under
the bundled demo names, so the example workflows run unchanged. Weights are random but not
degenerate (the adaLN-Zero gates are re-drawn), so images depend on the prompt and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from unifusion.bundled import DEMO_CHECKPOINT, DEMO_VAE, DEMO_VLM
from unifusion.checkpoint import save_checkpoint
from unifusion.config import VLMIdentity, tiny_preset
from unifusion.model import UniFusionModel
from unifusion.vae import TinyAutoencoder, save_vae
from unifusion.vlm.loader import load_vlm
from unifusion.vlm.tiny import build_tiny_vlm

LATENT_CHANNELS = 4
SHIFT = 3.0


@dataclass(frozen=True)
class TinyFiles:
    vlm: Path
    other_vlm: Path  # a different VLM (other width): the checkpoint must refuse it
    checkpoint: Path
    vae: Path


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 or name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def build_tiny_files(root: Path) -> TinyFiles:
    root.mkdir(parents=True, exist_ok=True)
    vlm_dir = build_tiny_vlm(root / "vlm", "internvl", seed=0, num_layers=8, hidden_size=64, image_size=64)
    other = build_tiny_vlm(root / "other_vlm", "internvl", seed=1, num_layers=8, hidden_size=32, image_size=64)
    identity = load_vlm(vlm_dir).identity
    cfg = tiny_preset(VLMIdentity(identity.architecture, identity.num_layers, identity.hidden_size,
                                  identity.selected_layers))
    # image_positions on: the nodes must carry each reference token's place to the DiT (the demo's DiT has it)
    cfg = type(cfg)(cfg.vlm, cfg.lap, replace(cfg.dit, image_positions=True), {"sampling_shift": SHIFT, "vae": DEMO_VAE})
    torch.manual_seed(0)
    model = UniFusionModel(cfg)
    _randomize(model, seed=0)
    checkpoint = save_checkpoint(root / DEMO_CHECKPOINT, model.state_dict(), cfg)
    torch.manual_seed(0)
    autoencoder = TinyAutoencoder(LATENT_CHANNELS)
    with torch.no_grad():
        # Mid-gray images with visible contrast (std ~30/255) instead of nearly black, flat ones.
        autoencoder.taesd_decoder[-1].bias.fill_(0.5)
        autoencoder.taesd_decoder[-1].weight.mul_(10.0)
    vae = save_vae(autoencoder, root / DEMO_VAE)
    return TinyFiles(vlm_dir, other, checkpoint, vae)


def link_tiny_files(server, files: TinyFiles) -> None:
    """Put the tiny files where the server looks, under the bundled demo names."""
    server.link_model("unifusion_vlm", files.vlm, DEMO_VLM)
    server.link_model("unifusion_vlm", files.other_vlm, "other-vlm")
    server.link_model("diffusion_models", files.checkpoint, DEMO_CHECKPOINT)
    server.link_model("vae", files.vae, DEMO_VAE)


_BUILT: dict[str, TinyFiles] = {}


def ensure_tiny_files(server, tmp_path_factory) -> TinyFiles:
    """Build the tiny files once per test session and link them into ``server``."""
    if "files" not in _BUILT:
        _BUILT["files"] = build_tiny_files(tmp_path_factory.mktemp("tiny_unifusion"))
    link_tiny_files(server, _BUILT["files"])
    return _BUILT["files"]
