"""Shared test setup: the repo root and tests/ on sys.path, a full ComfyUI first if one is given."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

for path in (str(TESTS), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

from comfyui_checkout import bind_checkout_packages, find_checkout  # noqa: E402

# A full ComfyUI checkout (COMFYUI_PATH, or the pack installed in ComfyUI/custom_nodes)
# provides `comfy` ahead of any installed 2024 core.
COMFYUI = find_checkout()
if COMFYUI:
    bind_checkout_packages(COMFYUI)

# ComfyUI picks its device when comfy.model_management is first imported (pytest imports the
# pack's root __init__.py as a package, which imports the nodes): make that the CPU.
try:
    import comfy.cli_args
except ImportError:
    pass
else:
    comfy.cli_args.args.cpu = True
