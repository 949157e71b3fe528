"""P-LoRA for ComfyUI: training-free fusion of a subject LoRA and a style LoRA.

Importable outside ComfyUI (tools and tests import `plora_core` without the host):
the nodes are registered only when ComfyUI's `comfy` package is present.
"""

import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
