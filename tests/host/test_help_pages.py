"""Each help page's input list is the node's INPUT_TYPES (names, types, defaults, ranges, tooltips)."""

import pytest

from support import help_pages


@pytest.mark.parametrize("name", sorted(help_pages.DOCS.glob("*.md")), ids=lambda p: p.stem)
def test_help_page_lists_exactly_the_declared_inputs(pack, name):
    node_class = pack.nodes.NODE_CLASS_MAPPINGS[name.stem]
    expected = help_pages.input_section(node_class)
    assert help_pages.current_section(name.read_text()) == expected, (
        f"{name.name}: its input list differs from {name.stem}.INPUT_TYPES; rewrite it with "
        "`COMFYUI_PATH=... python tests/support/help_pages.py`")


def test_every_node_has_a_help_page(pack):
    assert {p.stem for p in help_pages.DOCS.glob("*.md")} == set(pack.nodes.NODE_CLASS_MAPPINGS)


def test_a_renamed_input_fails_the_check(pack, monkeypatch):
    """The check is not vacuous: renaming one input (keeping its tooltip) changes the expected section."""
    node_class = pack.nodes.NODE_CLASS_MAPPINGS["PLoRAModelPatcher"]
    original = node_class.INPUT_TYPES()
    renamed = {**original, "required": {("strength_of_style" if k == "style_bias" else k): v
                                        for k, v in original["required"].items()}}
    monkeypatch.setattr(node_class, "INPUT_TYPES", classmethod(lambda cls: renamed))
    page = help_pages.DOCS / "PLoRAModelPatcher.md"
    assert help_pages.current_section(page.read_text()) != help_pages.input_section(node_class)
