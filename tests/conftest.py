"""Shared test setup: the repo root and tests/ on sys.path, a full ComfyUI first if one is given."""

import os
import sys
import importlib.machinery
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

for path in (str(TESTS), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

# A full ComfyUI checkout (COMFYUI_PATH, or the pack installed in ComfyUI/custom_nodes)
# provides `comfy` ahead of any installed 2024 core.
_comfyui = os.environ.get("COMFYUI_PATH") or (
    str(ROOT.parents[1]) if (ROOT.parents[1] / "comfy" / "model_patcher.py").is_file() else None
)
if _comfyui and _comfyui not in sys.path:
    sys.path.insert(0, _comfyui)
    # ComfyUI's folders have no __init__.py; an installed regular package of the same name
    # (the 2024 core) would win over them, so bind the checkout's folders explicitly.
    for _name in ("comfy", "comfy_execution", "comfy_extras", "comfy_api", "app", "utils"):
        _folder = Path(_comfyui) / _name
        if _folder.is_dir() and not (_folder / "__init__.py").exists():
            _spec = importlib.machinery.ModuleSpec(_name, None, is_package=True)
            _spec.submodule_search_locations = [str(_folder)]
            sys.modules[_name] = importlib.util.module_from_spec(_spec)

# ComfyUI picks its device when comfy.model_management is first imported (pytest imports the
# pack's root __init__.py as a package, which imports the nodes): make that the CPU.
try:
    import comfy.cli_args
except ImportError:
    pass
else:
    comfy.cli_args.args.cpu = True
