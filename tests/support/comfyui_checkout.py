"""Finding a full ComfyUI checkout and making its packages win over same-named installed packages."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# ComfyUI's top-level folders that have no __init__.py (namespace packages): a regular package of the
# same name anywhere on sys.path (`utils`, `app`, `models`, or an old `comfy` wheel) would win over them.
PACKAGES = ("comfy", "comfy_execution", "comfy_extras", "comfy_api", "comfy_api_nodes", "comfy_config", "app",
            "utils", "api_server", "middleware", "alembic_db")


def find_checkout() -> str | None:
    """COMFYUI_PATH, or the ComfyUI this pack is installed in (ComfyUI/custom_nodes/<pack>)."""
    given = os.environ.get("COMFYUI_PATH")
    if given:
        return str(Path(given).resolve())
    grandparent = ROOT.parents[1]
    return str(grandparent) if (grandparent / "comfy" / "model_patcher.py").is_file() else None


def bind_checkout_packages(checkout: str) -> None:
    """Put the checkout first on sys.path and bind its namespace folders explicitly."""
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    for name in PACKAGES:
        folder = Path(checkout) / name
        if name in sys.modules or not folder.is_dir() or (folder / "__init__.py").exists():
            continue
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
