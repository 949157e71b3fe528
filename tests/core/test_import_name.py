"""Every tier imports the pack under one name: one module object per file of the pack in a run."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_plora_core_is_not_importable_on_its_own():
    assert ROOT not in [Path(entry or ".").resolve() for entry in sys.path]
    with pytest.raises(ImportError):
        __import__("plora_core")


def test_each_file_of_the_pack_is_one_module_object():
    import plora_pack.plora_core.gate  # noqa: F401
    import plora_pack.plora_core.lora_file  # noqa: F401

    objects: dict[Path, set[int]] = {}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        pack_parts = ("__init__.py", "nodes", "glue", "plora_core")
        if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in pack_parts:
            objects.setdefault(path, set()).add(id(module))
    assert ROOT / "plora_core" / "gate.py" in objects
    assert {p: len(ids) for p, ids in objects.items() if len(ids) > 1} == {}
    assert sys.modules["plora_pack"].plora_core.lora_file.LoraFileError is \
        sys.modules["plora_pack.plora_core.lora_file"].LoraFileError
