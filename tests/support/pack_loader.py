"""The pack imported once per test run, under one name, as ComfyUI imports custom_nodes/<pack>.

Every tier imports the pack as `plora_pack` (`from plora_pack.plora_core.gate import LayerGate`):
one `LORA_CACHE`, one `LoraFileError` class per run. The repo root is not on sys.path, so a bare
`import plora_core` fails instead of loading a second copy (and tests/conftest.py keeps pytest
from importing the root `__init__.py` as a test package of its own).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "plora_pack"


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
    return module
