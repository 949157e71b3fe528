"""Browser tier: the real ComfyUI frontend in headless Chromium loads each shipped workflow.

Needs Debian's `chromium` and the `playwright` Python package (skipped with a reason without
them). Screenshots go to $PLORA_SCREENSHOTS (default: the pytest temp folder); with
PLORA_WRITE_THUMBNAILS=1 the shipped workflows' thumbnails in workflows/ are rewritten.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from test_server import PLACEHOLDERS, WORKFLOWS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("headless Chromium not found: `apt-get install chromium` to run the browser tier.",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="`pip install playwright` to run the browser tier.")

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(server.url)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
    page.plora_errors = errors
    yield page
    page.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = Path(os.environ.get("PLORA_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load(page, workflow: dict) -> None:
    page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
    page.keyboard.press("Escape")  # the templates dialog of a first visit
    page.wait_for_timeout(1500)


def show_whole_graph(page, workflow: dict, scale: float = 0.75) -> None:
    """Resize the page so the whole graph fits at a zoom where the frontend still draws text."""
    left = min(n["pos"][0] for n in workflow["nodes"])
    top = min(n["pos"][1] for n in workflow["nodes"])
    right = max(n["pos"][0] + n["size"][0] for n in workflow["nodes"])
    bottom = max(n["pos"][1] + n["size"][1] for n in workflow["nodes"])
    page.set_viewport_size({"width": int((right - left) * scale) + 240, "height": int((bottom - top) * scale) + 260})
    page.evaluate("""([scale, x, y]) => {
        const canvas = window.app.canvas;
        canvas.ds.scale = scale;
        canvas.ds.offset = [x, y];
        canvas.setDirty(true, true);
    }""", [scale, -left + 40, -top + 60])
    page.wait_for_timeout(1000)


def hide_overlays(page) -> None:
    """No minimap, FPS/info text or canvas menu in the pictures: only the graph."""
    page.evaluate("""async () => {
        const settings = window.app.extensionManager && window.app.extensionManager.setting;
        for (const [id, value] of [["Comfy.Minimap.Visible", false], ["Comfy.Graph.CanvasMenu", false]]) {
            try { if (settings) await settings.set(id, value); } catch (error) { /* older frontends */ }
        }
        window.app.canvas.show_info = false;
        const style = document.createElement("style");
        style.textContent = ".litegraph-minimap, .minimap-main-container, .graph-canvas-menu, "
            + ".p-buttongroup-vertical { display: none !important; }";
        document.head.appendChild(style);
        window.app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(500)


def save_thumbnail(page, path: Path) -> None:
    from PIL import Image

    hide_overlays(page)
    page.locator("#graph-canvas").screenshot(path=str(path))
    with Image.open(path) as image:
        image.thumbnail((1600, 1600))
        image.save(path, optimize=True)


def missing_nodes(page, workflow: dict) -> list[str]:
    types = sorted({n["type"] for n in workflow["nodes"] if n["type"] not in ("Note", "MarkdownNote")})
    return page.evaluate("(types) => types.filter(t => !window.LiteGraph.registered_node_types[t])", types)


def dialogs(page) -> list[str]:
    return page.evaluate("() => Array.from(document.querySelectorAll('.p-dialog')).map(e => e.textContent)")


def with_test_models(workflow: dict) -> dict:
    text = json.dumps(workflow)
    for placeholder, replacement in PLACEHOLDERS.items():
        text = text.replace(f'"{placeholder}"', f'"{replacement}"')
    return json.loads(text)


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_workflow_opens_with_no_missing_node_and_the_info_widget(name, page, screenshots):
    workflow = json.loads((WORKFLOWS / name).read_text())
    load(page, workflow)
    assert missing_nodes(page, workflow) == []
    assert not [d for d in dialogs(page) if "missing" in d.lower()]
    assert not [e for e in page.plora_errors if "plora" in e.lower()], page.plora_errors
    info = page.locator(".plora-lora-info").first
    info.wait_for(state="visible", timeout=10_000)
    assert "Subject:" in info.text_content() and "Style:" in info.text_content()
    show_whole_graph(page, workflow)
    save_thumbnail(page, screenshots / name.replace(".json", ".png"))
    if os.environ.get("PLORA_WRITE_THUMBNAILS") == "1":
        save_thumbnail(page, WORKFLOWS / name.replace(".json", ".png"))


def test_info_widget_shows_family_rank_triggers_and_warns_on_a_mismatch(page, server, base_directory, screenshots):
    from safetensors.torch import save_file
    import torch

    flux = base_directory / "models" / "loras" / "flux_style.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, str(flux))
    workflow = with_test_models(json.loads((WORKFLOWS / "plora_sdxl.json").read_text()))
    load(page, workflow)
    info = page.locator(".plora-lora-info").first
    page.wait_for_function("() => document.querySelector('.plora-lora-info').textContent.includes('rank 8')")
    assert "Subject: SD1.5 · rank 8 · triggers: sks dog, dog, grass" in info.text_content()
    assert info.get_attribute("data-warnings") == "0"
    page.evaluate("""() => {
        const node = window.app.graph._nodes.find(n => n.type === 'LoadSubjectStyleLoRA');
        const widget = node.widgets.find(w => w.name === 'style_lora');
        widget.value = 'flux_style.safetensors';
        widget.callback(widget.value);
    }""")
    page.wait_for_function("() => document.querySelector('.plora-lora-info [class=plora-warning]') !== null")
    assert "Style LoRA is for Flux, the model is SD1.5" in info.text_content()
    show_whole_graph(page, workflow, scale=1.0)
    save_thumbnail(page, screenshots / "lora_info_warning.png")
