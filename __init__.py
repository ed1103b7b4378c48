"""ComfyUI entry point of the UniFusion pack.

ComfyUI imports this file from ``custom_nodes/<pack>/`` and registers what ``comfy_entrypoint`` returns.
It checks ``NODE_CLASS_MAPPINGS`` before ``comfy_entrypoint`` (nodes.py ``load_custom_node``), so this
module exports only the V3 entry point. Outside ComfyUI (plain import, pytest collection) ``comfy_api``
cannot be found and nothing ComfyUI-specific is imported; inside ComfyUI any import error is left to
surface as ComfyUI's "IMPORT FAILED" line instead of being hidden.
"""

from __future__ import annotations

import importlib.util

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY"]

if importlib.util.find_spec("comfy_api") is not None:
    from comfy_api.latest import ComfyExtension, io
    from typing_extensions import override

    from .nodes import NODES

    class UniFusionExtension(ComfyExtension):
        """Registers the pack's V3 nodes."""

        @override
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    async def comfy_entrypoint() -> UniFusionExtension:
        """Called once by ComfyUI when it loads the pack."""
        return UniFusionExtension()

    __all__ += ["comfy_entrypoint"]
