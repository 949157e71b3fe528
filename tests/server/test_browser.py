"""Browser tier: the real ComfyUI frontend in headless Chromium loads each shipped workflow.

Every test runs with two frontends served by the same checkout: the one its requirements install
(`bundled`; 1.27.10 for v0.3.64) and the newest `comfyui-frontend-package` from PyPI (`newest`;
scripts/run_tests.sh installs it next to the tests' venv, and the server gets `--front-end-root`).

Needs Debian's `chromium` and the `playwright` Python package (skipped with a reason without
them). Screenshots go to $PLORA_SCREENSHOTS (default: the pytest temp folder); with
PLORA_WRITE_THUMBNAILS=1 the shipped workflows' thumbnails (workflows/<name>.jpg, what the template
browser shows) are rewritten from the bundled frontend.
"""

import json
import os
import shutil
import sys
import urllib.request
from importlib import metadata
from io import BytesIO
from pathlib import Path

import pytest
from support import server_support
from support.comfyui_checkout import find_checkout
from test_server import PLACEHOLDERS, WORKFLOWS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("headless Chromium not found: `apt-get install chromium` to run the browser tier.",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="`pip install playwright` to run the browser tier.")

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
APP = "window.comfyAPI.app.app"
WORKFLOW_NAMES = sorted(p.name for p in WORKFLOWS.glob("*.json"))
THUMBNAIL_FRONTEND = "bundled"  # the newer one outlines the placeholder models as missing, in red


def newest_frontend() -> tuple[Path | None, str]:
    """(static folder, version) of the newest frontend package: $PLORA_FRONTEND_ROOT (a `pip install
    --target` folder), else the one scripts/run_tests.sh installs next to the tests' venv."""
    target = Path(os.environ.get("PLORA_FRONTEND_ROOT") or Path(sys.prefix) / "comfyui-frontend-newest")
    static = target / "comfyui_frontend_package" / "static"
    versions = [d.version for d in metadata.distributions(name="comfyui-frontend-package", path=[str(target)])]
    if not (static / "index.html").is_file() or len(versions) != 1:
        return None, ""
    return static, versions[0]


NEWEST_STATIC, NEWEST_VERSION = newest_frontend()
NO_NEWEST = ("the newest comfyui-frontend-package is not installed: `bash scripts/run_tests.sh` with COMFYUI_PATH "
             "set installs it (`pip install --target <venv>/comfyui-frontend-newest comfyui-frontend-package`), "
             "or set PLORA_FRONTEND_ROOT to such a folder.")


def skip_first_visit(server) -> None:
    """No getting-started templates dialog over the graph: the frontends open it on a user's first visit."""
    status, _ = server.post("/settings/Comfy.TutorialCompleted", True)
    assert status == 200


@pytest.fixture(scope="module", params=["bundled", "newest"])
def frontend(request, server, base_directory):
    """(name, running ComfyUI, frontend version) for the checkout's own frontend and the newest one."""
    if request.param == "bundled":
        skip_first_visit(server)
        yield request.param, server, metadata.version("comfyui-frontend-package")
        return
    if NEWEST_STATIC is None:
        pytest.skip(NO_NEWEST)
    user = base_directory / "user-newest-frontend"  # its settings apart from the bundled frontend's
    temp = base_directory / "temp-newest-frontend"  # ComfyUI empties its temp folder when it starts
    for folder in (user, temp):
        folder.mkdir(exist_ok=True)
    args = ("--front-end-root", str(NEWEST_STATIC), "--user-directory", str(user), "--temp-directory", str(temp))
    with server_support.running_server(find_checkout(), base_directory, extra_args=args,
                                       log_name="comfyui-newest-frontend.log") as running:
        skip_first_visit(running)
        yield request.param, running, NEWEST_VERSION


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield instance
        instance.close()


# Deprecation warnings the frontend raises while the pack's extension (served under /extensions/plora/) is
# on the stack: LiteGraph reports each through its onDeprecationWarning handlers (newer frontends).
WATCH_DEPRECATIONS = """() => {
    window.__ploraDeprecations = [];
    const LiteGraph = window.LiteGraph;
    if (!Array.isArray(LiteGraph.onDeprecationWarning)) return false;
    LiteGraph.alwaysRepeatWarnings = true;  // also report what the frontend's own code already used
    LiteGraph.onDeprecationWarning.push((message) => {
        const stack = new Error().stack || "";
        if (stack.includes("/extensions/plora/")) window.__ploraDeprecations.push(`${message}\\n${stack}`);
    });
    return true;
}"""


@pytest.fixture
def page(browser, frontend):
    name, server, version = frontend
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(server.url)
    # ready: node definitions registered (the core's: a missing pack node is then the pack's failure) and the
    # startup spinner gone; then a moment for the frontend to restore its own first workflow, which would
    # race ours
    page.wait_for_function(f"""() => window.comfyAPI && {APP} && {APP}.graph && window.LiteGraph
        && window.LiteGraph.registered_node_types.KSampler && {APP}.extensionManager
        && {APP}.extensionManager.spinner === false""", timeout=120_000)
    page.wait_for_timeout(1000)
    assert page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == version, name
    page.evaluate(WATCH_DEPRECATIONS)
    page.plora_errors = errors
    page.plora_frontend = name
    yield page
    deprecated = page.evaluate("() => window.__ploraDeprecations")
    page.close()
    assert deprecated == [], f"the pack's extension used deprecated frontend APIs: {deprecated}"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = Path(os.environ.get("PLORA_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load(page, workflow: dict) -> None:
    page.evaluate(f"async (workflow) => {{ await {APP}.loadGraphData(workflow); }}", workflow)
    page.keyboard.press("Escape")  # the templates dialog of a first visit
    page.wait_for_timeout(1500)


def show_whole_graph(page, workflow: dict, scale: float = 0.75) -> None:
    """Resize the page so the whole graph fits at a zoom where the frontend still draws text."""
    left = min(n["pos"][0] for n in workflow["nodes"])
    top = min(n["pos"][1] for n in workflow["nodes"])
    right = max(n["pos"][0] + n["size"][0] for n in workflow["nodes"])
    bottom = max(n["pos"][1] + n["size"][1] for n in workflow["nodes"])
    page.set_viewport_size({"width": int((right - left) * scale) + 240, "height": int((bottom - top) * scale) + 260})
    page.evaluate(f"""([scale, x, y]) => {{
        const canvas = {APP}.canvas;
        canvas.ds.scale = scale;
        canvas.ds.offset = [x, y];
        canvas.setDirty(true, true);
    }}""", [scale, -left + 40, -top + 60])
    page.wait_for_timeout(1000)


def hide_overlays(page) -> None:
    """No minimap, FPS/info text or canvas menu in the pictures: only the graph."""
    page.evaluate(f"""async () => {{
        const app = {APP};
        for (const [id, value] of [["Comfy.Minimap.Visible", false], ["Comfy.Graph.CanvasMenu", false]]) {{
            try {{ await app.extensionManager.setting.set(id, value); }} catch (error) {{ /* older frontends */ }}
        }}
        app.canvas.show_info = false;
        const style = document.createElement("style");
        style.textContent = ".litegraph-minimap, .minimap-main-container, .graph-canvas-menu, "
            + ".p-buttongroup-vertical {{ display: none !important; }}";
        document.head.appendChild(style);
        app.canvas.setDirty(true, true);
    }}""")
    page.wait_for_timeout(500)


def save_thumbnail(page, path: Path) -> None:
    """The canvas as a picture: PNG for the screenshots folder, JPEG (what the template browser loads) for
    the shipped thumbnails."""
    from PIL import Image

    hide_overlays(page)
    picture = Image.open(BytesIO(page.locator("#graph-canvas").screenshot()))
    picture.thumbnail((1600, 1600))
    if path.suffix == ".jpg":
        picture.convert("RGB").save(path, quality=85, optimize=True)
    else:
        picture.save(path, optimize=True)


def missing_nodes(page, workflow: dict) -> list[str]:
    types = sorted({n["type"] for n in workflow["nodes"] if n["type"] not in ("Note", "MarkdownNote")})
    return page.evaluate("(types) => types.filter(t => !window.LiteGraph.registered_node_types[t])", types)


def dialogs(page) -> list[str]:
    return page.evaluate("() => Array.from(document.querySelectorAll('[role=dialog]')).map(e => e.textContent)")


def with_test_models(workflow: dict) -> dict:
    text = json.dumps(workflow)
    for placeholder, replacement in PLACEHOLDERS.items():
        text = text.replace(f'"{placeholder}"', f'"{replacement}"')
    return json.loads(text)


def info_box(page):
    """The LoRA-details widget, once it has been filled (its route answers after the graph opens)."""
    info = page.locator(".plora-lora-info").first
    info.wait_for(state="visible", timeout=10_000)
    page.wait_for_function("() => (document.querySelector('.plora-lora-info')?.textContent || '').includes('Subject:')",
                           timeout=20_000)
    return info


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_opens_with_no_missing_node_and_the_info_widget(name, page, screenshots):
    workflow = json.loads((WORKFLOWS / name).read_text())
    load(page, workflow)
    assert missing_nodes(page, workflow) == []
    assert not [d for d in dialogs(page) if "missing" in d.lower() and "node" in d.lower()]
    assert not [e for e in page.plora_errors if "plora" in e.lower()], page.plora_errors
    text = info_box(page).text_content()
    assert "Subject:" in text and "Style:" in text
    show_whole_graph(page, workflow)
    save_thumbnail(page, screenshots / f"{page.plora_frontend}-{name.replace('.json', '.png')}")
    if os.environ.get("PLORA_WRITE_THUMBNAILS") == "1" and page.plora_frontend == THUMBNAIL_FRONTEND:
        save_thumbnail(page, WORKFLOWS / name.replace(".json", ".jpg"))


def test_info_widget_shows_family_rank_triggers_and_warns_on_a_mismatch(page, frontend, base_directory,
                                                                        screenshots):
    """Also the .sft path end to end: a Flux LoRA saved as .sft is in the server's LoRA list, its header is
    read by /plora/lora_info, and the widget names its family."""
    from safetensors.torch import save_file
    import torch

    _, server, _ = frontend
    flux = base_directory / "models" / "loras" / "flux_style.sft"
    if not flux.exists():
        save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
                   "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
                  str(flux))
    listed = server.get("/object_info/LoadSubjectStyleLoRA")["LoadSubjectStyleLoRA"]["input"]["required"]
    assert "flux_style.sft" in listed["style_lora"][0]
    details = server.get("/plora/lora_info?name=flux_style.sft")
    assert details["family"].startswith("Flux") and details["rank"] == 4 and details["trigger_words"] == []
    workflow = with_test_models(json.loads((WORKFLOWS / "plora_sdxl.json").read_text()))
    load(page, workflow)
    info = info_box(page)
    page.wait_for_function("() => document.querySelector('.plora-lora-info').textContent.includes('rank 8')")
    assert "Subject: SD1.5 · rank 8 · triggers: sks dog, dog, grass" in info.text_content()
    assert info.get_attribute("data-warnings") == "0"
    page.evaluate(f"""() => {{
        const node = {APP}.graph.nodes.find(n => n.type === 'LoadSubjectStyleLoRA');
        const widget = node.widgets.find(w => w.name === 'style_lora');
        widget.value = 'flux_style.sft';
        widget.callback(widget.value);
    }}""")
    page.wait_for_function("() => document.querySelector('.plora-lora-info [class=plora-warning]') !== null")
    assert f"Style: {details['family']} · rank 4" in info.text_content()
    assert f"Style LoRA is for {details['family']}, the model is SD1.5" in info.text_content()
    assert info.get_attribute("data-warnings") == "1"
    show_whole_graph(page, workflow, scale=1.0)
    save_thumbnail(page, screenshots / f"{page.plora_frontend}-lora_info_warning.png")


def test_the_setting_hides_the_info_widget(page):
    load(page, with_test_models(json.loads((WORKFLOWS / "plora_sdxl.json").read_text())))
    info_box(page)
    refresh = f"""() => {{
        const widget = {APP}.graph.nodes.find(n => n.type === 'LoadSubjectStyleLoRA').widgets
            .find(w => w.name === 'subject_lora');
        widget.callback(widget.value);
    }}"""
    try:
        page.evaluate(f"() => {APP}.extensionManager.setting.set('PLoRA.LoraInfo.Enabled', false)")
        page.evaluate(refresh)
        page.wait_for_function("() => document.querySelector('.plora-lora-info').style.display === 'none'")
    finally:  # settings are stored on the server, for every later page
        page.evaluate(f"() => {APP}.extensionManager.setting.set('PLoRA.LoraInfo.Enabled', true)")
    page.evaluate(refresh)
    page.wait_for_function("() => document.querySelector('.plora-lora-info').style.display === ''")


def test_the_template_browser_lists_the_workflows_with_their_thumbnails(page, frontend, screenshots):
    from PIL import Image

    _, server, _ = frontend
    stems = sorted(name.removesuffix(".json") for name in WORKFLOW_NAMES)
    assert sorted(server.get("/api/workflow_templates")[server_support.PACK_FOLDER]) == stems
    for stem in stems:  # the frontends load a custom node's template thumbnails as <name>.jpg
        url = f"{server.url}/api/workflow_templates/{server_support.PACK_FOLDER}/{stem}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.headers["Content-Type"] == "image/jpeg"
            with Image.open(BytesIO(response.read())) as thumbnail:
                assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 300, stem

    page.keyboard.press("Escape")
    page.evaluate(f"() => {APP}.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.locator("[role=dialog]").last
    dialog.get_by_text(server_support.PACK_FOLDER, exact=True).first.click()  # the pack's own category
    for stem in stems:
        card = dialog.locator(f"[data-testid='template-workflow-{stem}']")
        card.wait_for(state="visible", timeout=20_000)
        page.wait_for_function("(card) => { const img = card.querySelector('img'); "
                               "return img && img.complete && img.naturalWidth >= 300; }",
                               arg=card.element_handle(), timeout=20_000)
    page.screenshot(path=str(screenshots / f"{page.plora_frontend}-template_browser.png"))

    dialog.locator("[data-testid='template-workflow-plora_sdxl']").click()
    page.wait_for_function(f"() => {APP}.graph.nodes.some(n => n.type === 'PLoRAModelPatcher')", timeout=20_000)
    assert "Subject:" in info_box(page).text_content()
