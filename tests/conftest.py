"""Shared test setup: tests/ on sys.path, a full ComfyUI checkout first if one is found, the pack as `plora_pack`.

The repo root is deliberately not on sys.path: every tier imports the pack under one name
(`plora_pack`, see pack_loader.py), never `plora_core` as a top-level package of its own.
"""

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
# The repo root (also as '' when pytest runs from it with `python -m pytest`) would make `import plora_core`
# a second copy of the pack's core next to plora_pack.plora_core.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

from support.comfyui_checkout import bind_checkout_packages, find_checkout  # noqa: E402

# A full ComfyUI checkout (COMFYUI_PATH, or the pack installed in ComfyUI/custom_nodes) provides `comfy`.
COMFYUI = find_checkout()
if COMFYUI:
    bind_checkout_packages(COMFYUI)
    # ComfyUI picks its device when comfy.model_management is first imported (loading the pack imports
    # the nodes, which import it): make that the CPU first.
    import comfy.cli_args

    comfy.cli_args.args.cpu = True

from support.pack_loader import load_pack  # noqa: E402

load_pack()


class RootIsNotATestPackage:
    """The repo root has an __init__.py (ComfyUI loads the pack from it), so pytest would collect it as a test
    package and import it under the clone folder's name (or as a bare `__init__` module with the root put on
    sys.path, where that name is not an identifier): a second copy of the pack. Collected as a plain folder,
    it is never imported by pytest."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # a plugin, not a conftest hook: conftest hooks apply only below tests/, the root is collected before
    config.pluginmanager.register(RootIsNotATestPackage(), "plora-root-is-not-a-test-package")
