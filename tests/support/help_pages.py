"""The help pages' input lists (web/docs/<Node>.md), generated from the nodes' INPUT_TYPES.

The tooltips are the one source of every input's documentation: each page's "## Inputs" section,
between the markers below, is written from the node's INPUT_TYPES (name, type, default, range,
tooltip) and checked against it by tests/host/test_help_pages.py. Edit a tooltip, then rewrite the
pages with

    COMFYUI_PATH=/path/to/ComfyUI python tests/support/help_pages.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "web" / "docs"
BEGIN = "<!-- inputs: generated from INPUT_TYPES by tests/support/help_pages.py; edit the tooltips, not this list -->"
END = "<!-- end of generated inputs -->"


def _details(spec) -> str:
    """Type, default, range. A combo's choices are listed when it declares a default (a fixed list);
    lists without one (files, folders, samplers) depend on the install and are not."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, (list, tuple)):
        parts = ["one of " + ", ".join(f"`{choice}`" for choice in kind) if "default" in options
                 else "a name from its list"]
    else:
        parts = [str(kind)]
    if "default" in options:
        parts.append(f"default `{options['default']}`")
    if "min" in options or "max" in options:
        parts.append(f"{options.get('min', '-inf')} to {options.get('max', 'inf')}")
    if options.get("advanced"):
        parts.append("advanced")
    return ", ".join(parts)


def input_section(node_class) -> str:
    """The generated "## Inputs" section of one node's page."""
    declared = node_class.INPUT_TYPES()
    lines = [BEGIN, "## Inputs"]
    for section, label in (("required", ""), ("optional", ", optional")):
        for name, spec in (declared.get(section) or {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            tooltip = options.get("tooltip", "").strip()
            lines.append(f"- **{name}** ({_details(spec)}{label}): {tooltip}")
    lines.append(END)
    return "\n".join(lines)


def page_with_inputs(text: str, section: str) -> str:
    """`text` with its generated section replaced, or inserted before the first "## " heading (or at the end)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + section + rest.split(END, 1)[1]
    lines = text.rstrip("\n").split("\n")
    first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    block = [section, ""] if first < len(lines) else ["", section]
    return "\n".join(lines[:first] + block + lines[first:]) + "\n"


def current_section(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END


def write_pages(node_classes: dict) -> list[Path]:
    written = []
    for name, node_class in node_classes.items():
        page = DOCS / f"{name}.md"
        text = page.read_text()
        updated = page_with_inputs(text, input_section(node_class))
        if updated != text:
            page.write_text(updated)
            written.append(page)
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    from support.comfyui_checkout import bind_checkout_packages, find_checkout

    checkout = find_checkout()
    if checkout is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (the nodes' INPUT_TYPES need it)")
    bind_checkout_packages(checkout)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from support.pack_loader import load_pack

    for path in write_pages(load_pack().nodes.NODE_CLASS_MAPPINGS):
        sys.stderr.write(f"wrote {path.relative_to(ROOT)}\n")
