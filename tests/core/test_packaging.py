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
        assert workflow.with_suffix(".png").is_file()
        assert workflow.name in (ROOT / "README.md").read_text()


def test_the_pack_installs_nothing_at_import_time():
    package_files = [ROOT / "__init__.py", *(ROOT / "nodes").glob("*.py"), *(ROOT / "plora_core").glob("*.py")]
    for path in package_files:
        text = path.read_text()
        assert "subprocess" not in text and "pip install" not in text and "pip.main" not in text, path
