"""ComfyUI's memory estimate for the DiT, checked against activation memory measured by
tracking every tensor allocated during a forward pass."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from node_pack import pack_module

memory = pack_module("nodes.memory")
DiTConfig = pack_module("unifusion.config").DiTConfig
UniFusionDiT = pack_module("unifusion.dit").UniFusionDiT


class AllocationTracker(TorchDispatchMode):
    """Peak bytes of live tensor storage created inside the mode (weights exist before: excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def _release(self, key: int, size: int) -> None:
        self.live -= size
        self.seen.discard(key)


def chunked_attention(q, k, v, heads, mask=None, skip_reshape=False):
    """Query-chunked attention: no (N, N) score matrix, like flash attention on a GPU."""
    b, h, n, d = q.shape
    parts = [F.scaled_dot_product_attention(q[:, :, i:i + 64], k, v, attn_mask=mask) for i in range(0, n, 64)]
    return torch.cat(parts, dim=2).transpose(1, 2).reshape(b, n, h * d)


@pytest.mark.parametrize("width, patch, side, cond", [(256, 2, 32, 32), (256, 1, 16, 48)])
def test_estimate_covers_measured_activations_without_gross_excess(width, patch, side, cond):
    cfg = DiTConfig(in_channels=4, patch_size=patch, hidden_size=width, depth=2, num_heads=width // 64,
                    time_embed_dim=64, rope_axes=(16, 24, 24))
    torch.manual_seed(0)
    model = UniFusionDiT(cfg, dtype=torch.bfloat16, attention=chunked_attention).eval()
    batch = 2  # cond + uncond, as ComfyUI batches them
    x = torch.randn(batch, 4, side, side, dtype=torch.bfloat16)
    context = torch.randn(batch, cond, width, dtype=torch.bfloat16)
    tracker = AllocationTracker()
    with torch.inference_mode(), tracker:
        model(x, torch.rand(batch), context)
    estimate = memory.comfy_estimate_bytes(memory.memory_usage_factor(cfg), (batch, 4, side, side), cond * batch,
                                           patch, dtype_size=2)
    assert tracker.peak <= estimate <= 2 * tracker.peak, (tracker.peak, estimate)


def test_batch_scaled_cond_shapes_counts_one_condition_per_latent():
    shapes = {"c_crossattn": [[1, 1, 400], [1, 1, 400]]}
    assert memory.batch_scaled_cond_shapes([8, 16, 64, 64], shapes)["c_crossattn"] == [[4, 1, 400]] * 2
    assert memory.batch_scaled_cond_shapes([4, 16, 64, 64], {"c_crossattn": [[1, 1, 400]]}) == \
        {"c_crossattn": [[4, 1, 400]]}
    assert memory.batch_scaled_cond_shapes([2, 16, 64, 64], {}) == {}
