"""The P-LoRA pack's ComfyUI glue: what installs `plora_core` into ComfyUI for the nodes in `nodes/`.

`host.py` is the seam, the only module that imports ComfyUI (`comfy`, `folder_paths`, `server`). The
gate and the guidance hook are each paired with their maths in `plora_core/` under the same name
(`gate.py`, `guidance.py`, `encoders.py`). Nothing here defines a node, and this `__init__` imports
nothing: `nodes/__init__.py` registers the nodes and calls the glue's registration functions.
"""
