"""Browser tier, the artist's path: drop the workflow file on the canvas, pick every file in its combo
menus, make the run small, press Run, and see the saved image and the selection map in their nodes.

Runs on both frontends of tests/server/test_browser.py (its fixtures). Everything goes through the UI
as a person does it: a drop event carrying a File (a drag from the desktop), mouse clicks on the canvas
widgets, the entries of LiteGraph's context menu, the number prompt, the Run button. The server's
history is the independent check that the clicks reached the prompt. The finished graph's screenshot
goes to $PLORA_SCREENSHOTS (default: the pytest temp folder), and also to $PLORA_SCREENSHOT_DIR if set.
"""

import json
import os
import re
import shutil
from pathlib import Path

from support import server_support
import test_browser
from test_browser import APP, hide_overlays
from test_server import PLACEHOLDERS, WORKFLOWS

# test_browser's fixtures (both frontends, the page with its checks, the screenshots folder); assigned, not
# imported by name, as the tests' parameters take the same names
browser, frontend, page = test_browser.browser, test_browser.frontend, test_browser.page
screenshots = test_browser.screenshots
WORKFLOW = "plora_sdxl.json"
RUN_TIMEOUT_MS = 300_000  # two reference renders and the guided run, 64 px and 2 steps each, on the CPU
# (node type, widget) -> the entry picked in its combo menu: the tiny server-tier models stand in for the
# workflow's placeholder files (the checkpoint is SD1.5; the workflow's nodes are all family-neutral)
FILE_COMBOS = {
    ("CheckpointLoaderSimple", "ckpt_name"): server_support.CHECKPOINT,
    ("LoadSubjectStyleLoRA", "subject_lora"): server_support.SUBJECT_LORA,
    ("LoadSubjectStyleLoRA", "style_lora"): server_support.STYLE_LORA,
    ("LoadPLoRACLIPEncoder", "checkpoint"): server_support.CLIP_FILE,
    ("LoadPLoRACLIPEncoder", "architecture"): PLACEHOLDERS["ViT-B-32"],
    ("LoadPLoRADINOEncoder", "model_folder"): server_support.DINO_FOLDER,
}
# the reference branches' LoRA loaders, by node id (two nodes of one type)
REFERENCE_LORAS = {7: server_support.SUBJECT_LORA, 11: server_support.STYLE_LORA}
SMALL = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2},
         "PosteriorMetricGuidanceSampler": {"steps": 2}}


def drop_file(page, name: str, text: str) -> None:
    """What a drag from the desktop gives: dragenter, dragover and drop on the canvas, over empty space,
    with a DataTransfer holding the file."""
    page.evaluate("""([name, text]) => {
        const canvas = document.querySelector('#graph-canvas');
        const rect = canvas.getBoundingClientRect();
        const data = new DataTransfer();
        data.items.add(new File([text], name, {type: 'application/json'}));
        const at = {clientX: rect.left + 20, clientY: rect.bottom - 20, bubbles: true, cancelable: true,
                    dataTransfer: data};
        for (const type of ['dragenter', 'dragover', 'drop']) canvas.dispatchEvent(new DragEvent(type, at));
    }""", [name, text])


def show_graph(page, workflow: dict, scale: float = 0.75, margin: int = 110) -> None:
    """The whole graph in the page at a zoom where the frontend draws widgets, with a margin wide enough
    for the side bar and top bar the newer frontends lay over the canvas (no widget is clicked under them)."""
    title = 30  # LiteGraph's title bar, above a node's pos
    left = min(n["pos"][0] for n in workflow["nodes"])
    top = min(n["pos"][1] for n in workflow["nodes"]) - title
    right = max(n["pos"][0] + n["size"][0] for n in workflow["nodes"])
    bottom = max(n["pos"][1] + n["size"][1] for n in workflow["nodes"])
    page.set_viewport_size({"width": int((right - left) * scale) + 2 * margin,
                            "height": int((bottom - top) * scale) + 2 * margin})
    page.evaluate(f"""([scale, x, y]) => {{
        const canvas = {APP}.canvas;
        canvas.ds.scale = scale;
        canvas.ds.offset = [x, y];
        canvas.setDirty(true, true);
    }}""", [scale, -left + margin / scale, -top + margin / scale])
    page.wait_for_timeout(1000)


def widget_point(page, node_id: int, name: str) -> tuple[float, float]:
    """The page coordinates of the middle of a canvas widget (away from a combo's or number's arrows)."""
    return tuple(page.evaluate(f"""([id, name]) => {{
        const canvas = {APP}.canvas;
        const node = {APP}.graph.getNodeById(id);
        const widget = node.widgets.find(w => w.name === name);
        const height = widget.computedHeight || window.LiteGraph.NODE_WIDGET_HEIGHT;
        const [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2,
                                                        node.pos[1] + widget.y + height / 2]);
        const rect = canvas.canvas.getBoundingClientRect();
        return [rect.left + x * rect.width / canvas.canvas.width, rect.top + y * rect.height / canvas.canvas.height];
    }}""", [node_id, name]))


def widget_value(page, node_id: int, name: str):
    return page.evaluate(f"([id, name]) => {APP}.graph.getNodeById(id).widgets.find(w => w.name === name).value",
                         [node_id, name])


def pick(page, node_id: int, name: str, entry: str) -> None:
    """Click a combo widget, then the entry in the context menu it opens."""
    page.mouse.click(*widget_point(page, node_id, name))
    menu = page.locator(".litecontextmenu").last
    menu.wait_for(state="visible", timeout=10_000)
    menu.locator(".litemenu-entry").filter(has_text=re.compile(f"^{re.escape(entry)}$")).first.click()
    menu.wait_for(state="detached", timeout=10_000)
    assert widget_value(page, node_id, name) == entry, (node_id, name)


def type_number(page, node_id: int, name: str, value: int) -> None:
    """Click a number widget, type the value into the prompt it opens, Enter."""
    page.mouse.click(*widget_point(page, node_id, name))
    field = page.locator(".graphdialog input").last
    field.wait_for(state="visible", timeout=10_000)
    field.fill(str(value))
    field.press("Enter")
    assert widget_value(page, node_id, name) == value, (node_id, name)


def node_ids(page, node_type: str) -> list[int]:
    return page.evaluate(f"(type) => {APP}.graph.nodes.filter(n => n.type === type).map(n => Number(n.id))",
                         node_type)


def shown_images(page, node_id: int) -> list[str]:
    """The image URLs a node shows once they have loaded (its imgs, what the canvas draws)."""
    return page.evaluate(f"""(id) => {{
        const imgs = {APP}.graph.getNodeById(id).imgs || [];
        return imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.map(i => i.src) : [];
    }}""", node_id)


def test_artist_drops_the_workflow_picks_the_files_and_runs_it(page, frontend, screenshots, tmp_path):
    name, server, _ = frontend
    text = (WORKFLOWS / WORKFLOW).read_text()
    workflow = json.loads(text)
    drop_file(page, WORKFLOW, text)
    page.wait_for_function(f"() => {APP}.graph.nodes.some(n => n.type === 'PLoRASelectionMap')", timeout=20_000)
    page.keyboard.press("Escape")
    show_graph(page, workflow)

    for (node_type, widget), entry in FILE_COMBOS.items():
        (node_id,) = node_ids(page, node_type)
        pick(page, node_id, widget, entry)
    for node_id, entry in REFERENCE_LORAS.items():
        pick(page, node_id, "lora_name", entry)
    for node_type, values in SMALL.items():
        for node_id in node_ids(page, node_type):
            for widget, value in values.items():
                type_number(page, node_id, widget, value)

    (save,) = node_ids(page, "SaveImage")
    (selection,) = node_ids(page, "PLoRASelectionMap")
    (selection_preview,) = page.evaluate(f"""(id) => {APP}.graph.nodes.filter(n => n.type === 'PreviewImage'
        && n.getInputNode(0) && Number(n.getInputNode(0).id) === id).map(n => Number(n.id))""", selection)
    assert shown_images(page, save) == [] and shown_images(page, selection_preview) == []
    page.locator("[data-testid='queue-button']").first.click()
    page.wait_for_function(f"""([a, b]) => [a, b].every(id => {{
        const imgs = {APP}.graph.getNodeById(id).imgs || [];
        return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0);
    }})""", arg=[save, selection_preview], timeout=RUN_TIMEOUT_MS, polling=500)

    # the server's record of that run: the picked files and small sizes reached the prompt, and the images
    # the nodes show are the ones it saved
    (prompt_id, entry), = server.get("/history?max_items=1").items()
    assert entry["status"]["status_str"] == "success", entry["status"]
    inputs = {node_id: node["inputs"] for node_id, node in entry["prompt"][2].items()}
    ids = {n["type"]: str(n["id"]) for n in workflow["nodes"]}
    for (node_type, widget), picked in FILE_COMBOS.items():
        assert inputs[ids[node_type]][widget] == picked, (node_type, widget)
    for node_id, picked in REFERENCE_LORAS.items():
        assert inputs[str(node_id)]["lora_name"] == picked
    assert inputs[ids["EmptyLatentImage"]]["width"] == 64 and inputs[ids["EmptyLatentImage"]]["height"] == 64
    assert [inputs[str(n["id"])]["steps"] for n in workflow["nodes"] if "steps" in SMALL.get(n["type"], {})] \
        == [2, 2, 2]
    for node_id, kind in ((save, "output"), (selection_preview, "temp")):
        (image,) = entry["outputs"][str(node_id)]["images"]
        assert image["type"] == kind
        (src,) = shown_images(page, node_id)
        assert f"filename={image['filename']}" in src, (src, image)
    assert server.view(entry["outputs"][str(save)]["images"][0]).size == (64, 64)
    assert not [e for e in page.plora_errors if "plora" in e.lower()], page.plora_errors

    hide_overlays(page)
    shot = tmp_path / f"{name}-artist_run.png"
    page.screenshot(path=str(shot))
    for folder in (screenshots, os.environ.get("PLORA_SCREENSHOT_DIR")):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(folder) / shot.name)
