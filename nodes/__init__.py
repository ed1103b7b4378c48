"""ComfyUI nodes of the pack: thin glue over ``unifusion``; imported only inside ComfyUI.

``NODES`` is the list the root ``__init__.py`` hands to ComfyUI. Node modules import pack code
relatively (``from ..unifusion import ...``): ComfyUI loads the pack under a path-derived module
name, and the top-level name ``nodes`` belongs to ComfyUI's own ``nodes.py``.
"""

from __future__ import annotations

NODES: list[type] = []
