"""What the ComfyUI registry, the manager and the frontend read from the repository."""

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def requirement_names(lines):
    return sorted(re.split(r"[<>=!~ ]", line.strip())[0].lower().replace("_", "-")
                  for line in lines if line.strip() and not line.startswith(("#", "-")))


def test_dependencies_are_mirrored_and_leave_torch_to_comfyui():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = requirement_names(project["project"]["dependencies"])
    assert declared == requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    assert not {"torch", "torchvision", "torchaudio"} & set(declared)
    assert project["project"]["version"] and (ROOT / "LICENSE").is_file()
    assert {"PublisherId", "DisplayName"} <= set(project["tool"]["comfy"])


def test_every_node_has_a_help_page_and_every_workflow_a_thumbnail():
    registered = re.findall(r'^    "(\w+)": \w+,$', (ROOT / "nodes" / "__init__.py").read_text(), re.M)
    assert {"LoadSubjectStyleLoRA", "PLoRAModelPatcher", "PosteriorMetricGuidanceSampler"} <= set(registered)
    for name in registered:
        assert (ROOT / "web" / "docs" / f"{name}.md").is_file(), name
    workflows = sorted((ROOT / "workflows").glob("*.json"))
    assert len(workflows) >= 3
    for workflow in workflows:
        graph = json.loads(workflow.read_text())
        assert graph["nodes"] and graph["links"]
        assert workflow.with_suffix(".jpg").is_file()  # the template browser's thumbnail: <name>.jpg
        assert workflow.name in (ROOT / "README.md").read_text()


def test_the_pack_installs_nothing_at_import_time():
    package_files = [ROOT / "__init__.py", *(ROOT / "nodes").glob("*.py"), *(ROOT / "glue").glob("*.py"),
                     *(ROOT / "plora_core").glob("*.py")]
    for path in package_files:
        text = path.read_text()
        assert "subprocess" not in text and "pip install" not in text and "pip.main" not in text, path


def test_the_frontend_extension_uses_only_the_public_frontend_api():
    """window.comfyAPI instead of imports of the frontend's script files (deprecated paths that print
    warnings or break when moved; the pack's own files in web/js may be imported by relative path, as
    plora_chain.js is), the settings API instead of app.ui.settings, no private graph fields."""
    for script in (ROOT / "web").rglob("*.js"):
        text = script.read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
        own = [m.group(1) for m in re.finditer(r'^\s*import\s*\{[^}]*\}\s*from\s*"\./([\w.-]+\.js)";', code, re.M)]
        assert all((script.parent / name).is_file() for name in own), f"{script.name}: imports {own}"
        others = re.sub(r'^\s*import\s*\{[^}]*\}\s*from\s*"\./[\w.-]+\.js";', "", code, flags=re.M)
        assert not re.search(r"^\s*import\b|\bimport\s*\(", others, re.M), f"{script.name}: use window.comfyAPI"
        assert "scripts/app.js" not in code and "scripts/api.js" not in code, script.name
        assert "app.ui.settings" not in code and "getSettingValue" not in code and "addSetting" not in code, script.name
        assert not re.search(r"\.(_nodes|_links|_groups)\b", code), f"{script.name}: graph.nodes, node.getInputNode"
        assert not re.search(r"\.link\b", code), f"{script.name}: input.link is deprecated (node.getInputNode)"


def test_host_py_is_the_only_module_that_imports_comfyui():
    """comfy, folder_paths and server are reached only through glue/host.py (nodes and plora_core never)."""
    pattern = re.compile(r"^\s*(import|from)\s+(comfy(_extras|_api|_execution)?|folder_paths|server|nodes)\b", re.M)
    modules = [ROOT / "__init__.py"] + [path for folder in ("nodes", "glue", "plora_core")
                                        for path in sorted((ROOT / folder).glob("*.py"))]
    assert (ROOT / "glue" / "host.py") in modules and (ROOT / "nodes" / "patcher_node.py") in modules
    offenders = [str(path.relative_to(ROOT)) for path in modules
                 if path != ROOT / "glue" / "host.py" and pattern.search(path.read_text())]
    assert offenders == []


def test_nodes_holds_only_node_modules_and_glue_no_nodes():
    """nodes/: `<what>_node.py` or `<what>_nodes.py` (a family), each defining node classes (INPUT_TYPES);
    glue/ (what installs the core into ComfyUI) defines none."""
    node_modules = sorted(p for p in (ROOT / "nodes").glob("*.py") if p.name != "__init__.py")
    assert node_modules and [p.name for p in node_modules if not re.fullmatch(r"\w+_nodes?\.py", p.name)] == []
    assert [p.name for p in node_modules if "def INPUT_TYPES" not in p.read_text()] == []
    assert [p.name for p in (ROOT / "glue").glob("*.py") if "def INPUT_TYPES" in p.read_text()] == []
