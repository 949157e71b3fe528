"""The pack imported once per test run, under one name, as ComfyUI imports custom_nodes/<pack>.

Every tier imports the pack as `plora_pack` (`from plora_pack.plora_core.gate import LayerGate`):
one `LORA_CACHE`, one `LoraFileError` class per run. The repo root is not on sys.path, so a bare
`import plora_core` fails instead of loading a second copy. pytest itself imports the root
`__init__.py` (its Package setup) under the name of the folder the repo is cloned into; that name
is bound to the same module object, so pytest finds the copy already loaded.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "plora_pack"


def _pytest_root_package_name() -> str | None:
    """The module name pytest's Package collector gives the repo root's __init__.py (prepend mode)."""
    try:
        from _pytest.pathlib import resolve_pkg_root_and_module_name
    except ImportError:
        return None
    try:
        return resolve_pkg_root_and_module_name(ROOT / "__init__.py")[1]
    except Exception:  # noqa: BLE001 - an unusual layout: pytest will then report its own mismatch
        return None


def load_pack():
    """Import the repo root as the package `plora_pack` (once) and return it."""
    module = sys.modules.get(PACK_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACK_NAME]
            raise
    alias = _pytest_root_package_name()
    if alias and alias != PACK_NAME:
        sys.modules.setdefault(alias, module)
    return module
