"""ComfyUI nodes of the pack: thin glue over ``unifusion``; imported only inside ComfyUI.

``NODES`` is the list the root ``__init__.py`` hands to ComfyUI. Node modules import pack code
relatively (``from ..unifusion import ...``): ComfyUI loads the pack under a path-derived module
name, and the top-level name ``nodes`` belongs to ComfyUI's own ``nodes.py``. Outside ComfyUI
(unit tests of the pure helpers) ``NODES`` stays empty and nothing ComfyUI-specific is imported.
"""

from __future__ import annotations

import importlib.util

NODES: list[type] = []

if importlib.util.find_spec("comfy_api") is not None:
    from . import paths
    from .condition import UniFusionLAPPool, UniFusionTextEncode
    from .encode import UniFusionEncode, UniFusionReference, UniFusionVerifiRewrite
    from .guidance import UniFusionGuidanceInterval
    from .loaders import UniFusionModelLoader, UniFusionVLMLoader

    paths.register()
    NODES += [
        UniFusionVLMLoader,
        UniFusionModelLoader,
        UniFusionReference,
        UniFusionEncode,
        UniFusionVerifiRewrite,
        UniFusionLAPPool,
        UniFusionTextEncode,
        UniFusionGuidanceInterval,
    ]
