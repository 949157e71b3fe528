"""The pack inside a running ComfyUI: import, /object_info, shipped workflows over /prompt, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import server_support
from support.comfyui_checkout import find_checkout

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from workflow_api import check_links, ui_to_api  # noqa: E402

CHECKOUT = find_checkout()
WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
PACK_NODES = ("LoadSubjectStyleLoRA", "PLoRAModelPatcher", "PosteriorMetricGuidanceSampler", "LoadPLoRACLIPEncoder",
              "LoadPLoRADINOEncoder", "PLoRAEncoderFromCLIPVision", "PLoRASelectionMap", "PLoRAComparisonGrid")
# Placeholder file names in the shipped workflows -> the tiny test models.
PLACEHOLDERS = {
    "sd_xl_base_1.0.safetensors": server_support.CHECKPOINT,
    "my_subject_lora.safetensors": server_support.SUBJECT_LORA,
    "my_style_lora.safetensors": server_support.STYLE_LORA,
    "my_lighting_lora.safetensors": server_support.THIRD_LORA,
    "open_clip_vit_b_32.safetensors": server_support.CLIP_FILE,
    "ViT-B-32": "PLoRA-Tiny-ViT",
    "dino-vits16": server_support.DINO_FOLDER,
}
SMALL = {"steps": 2, "width": 64, "height": 64}


def test_quick_test_for_ci_imports_the_pack(base_directory):
    command = server_support.launcher_command(CHECKOUT, base_directory, "--quick-test-for-ci")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=CHECKOUT)
    log = result.stdout + result.stderr
    assert f"custom_nodes/{server_support.PACK_FOLDER}" in log, log[-2000:]
    pack_folder = f"custom_nodes/{server_support.PACK_FOLDER}"
    failures = [line for line in log.splitlines()
                if ("IMPORT FAILED" in line or "Cannot import" in line) and pack_folder in line]
    assert failures == [], failures


def test_object_info_lists_the_nodes_with_tooltips(object_info):
    for name in PACK_NODES:
        node = object_info[name]
        assert node["category"] == "P-LoRA" and node["description"]
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(node["output_tooltips"]) == len(node["output"])


def shipped(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def small_api_prompt(workflow: dict, object_info: dict) -> dict:
    prompt = ui_to_api(workflow, object_info)
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if isinstance(value, str) and value in PLACEHOLDERS:
                node["inputs"][key] = PLACEHOLDERS[value]
            if key in SMALL and not isinstance(value, list):
                node["inputs"][key] = SMALL[key]
        if node["class_type"] == "PLoRAModelPatcher" and node["inputs"].get("method") == "b-lora":
            node["inputs"]["method"] = "direct"  # the tiny checkpoint is SD1.5, B-LoRA SDXL-only (host tier tests it)
    return prompt


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_every_shipped_workflow_is_consistent_with_the_server(name, object_info):
    workflow = shipped(name)
    assert check_links(workflow, object_info) == []
    prompt = ui_to_api(workflow, object_info)  # raises on a missing node or a wrong widget count
    assert any(n["class_type"] == "PLoRAModelPatcher" for n in prompt.values())
    assert (WORKFLOWS / name).with_suffix(".jpg").is_file(), "each workflow ships the template browser's thumbnail"


@pytest.mark.parametrize("name", ["plora_sdxl.json", "plora_comparison.json", "plora_three_loras.json"])
def test_shipped_workflow_runs_to_an_image(name, server, object_info):
    prompt = small_api_prompt(shipped(name), object_info)
    history = server.run_prompt(prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    images = [image for output in history["outputs"].values() for image in output.get("images", [])]
    assert images, history["outputs"]
    if name in ("plora_sdxl.json", "plora_three_loras.json"):  # the selection map preview of the gate's decisions
        previews = [n for n, o in history["outputs"].items()
                    if prompt.get(n, {}).get("class_type") == "PreviewImage" and o.get("images")]
        references = 3 if name == "plora_three_loras.json" else 2
        assert len(previews) == references + 1, "a preview per reference and the selection map"
    if name == "plora_three_loras.json":  # the third LoRA is in the set and its reference in the guidance
        kinds = [n["class_type"] for n in prompt.values()]
        assert kinds.count("AddLoRAToSet") == 1 and kinds.count("PLoRAReference") == 1
    if name == "plora_comparison.json":
        saved = [o for o in history["outputs"].values() if o.get("images") and o["images"][0]["type"] == "output"]
        assert len(saved) == 1 and len(saved[0]["images"]) == 1, "the six methods as one labelled grid"
        image = server.view(saved[0]["images"][0])
        assert image.size == (3 * 64 + 2 * 4, 2 * (64 + 16) + 4), image.size  # 3 x 2 panels of 64 px, labels above


def test_bad_inputs_come_back_as_node_errors_and_the_server_keeps_serving(server, object_info):
    prompt = small_api_prompt(shipped("plora_sdxl.json"), object_info)
    loader = next(k for k, n in prompt.items() if n["class_type"] == "LoadSubjectStyleLoRA")
    patcher = next(k for k, n in prompt.items() if n["class_type"] == "PLoRAModelPatcher")
    unknown_file = json.loads(json.dumps(prompt))
    unknown_file[loader]["inputs"]["subject_lora"] = "no_such_lora.safetensors"
    status, answer = server.post("/prompt", {"prompt": unknown_file})
    assert status == 400 and loader in answer["node_errors"], answer
    assert "no_such_lora.safetensors" in json.dumps(answer["node_errors"][loader])

    wrong_type = json.loads(json.dumps(prompt))
    wrong_type[patcher]["inputs"]["lora_pair"] = [loader, 1]  # the CLIP output, not the pair
    status, answer = server.post("/prompt", {"prompt": wrong_type})
    # ComfyUI still runs the outputs that do not depend on the bad node (200), or refuses it all (400)
    assert status in (200, 400) and patcher in answer["node_errors"], answer
    assert answer["node_errors"][patcher]["errors"][0]["type"] == "return_type_mismatch"

    assert "LoadSubjectStyleLoRA" in server.get("/object_info/LoadSubjectStyleLoRA")


def test_metadata_routes(server):
    lora = server.get(f"/plora/lora_info?name={server_support.SUBJECT_LORA}")
    assert lora == {"name": server_support.SUBJECT_LORA, "family": "SD1.5", "rank": 8,
                    "trigger_words": ["sks dog", "dog", "grass"]}
    assert server.get(f"/plora/model_info?name={server_support.CHECKPOINT}")["family"] == "SD1.5"


def test_readme_command_runs_the_sdxl_workflow(server):
    """scripts/run_workflow.py, the README's main command, against the running server."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "run_workflow.py"
    command = [sys.executable, str(script), str(WORKFLOWS / "plora_sdxl.json"), "--url", server.url,
               "--checkpoint", server_support.CHECKPOINT, "--subject-lora", server_support.SUBJECT_LORA,
               "--style-lora", server_support.STYLE_LORA, "--clip-checkpoint", server_support.CLIP_FILE,
               "--clip-architecture", "PLoRA-Tiny-ViT", "--dino", server_support.DINO_FOLDER,
               "--set", "steps=2", "--set", "width=64", "--set", "height=64", "--timeout", "300"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saved: output/plora_sdxl_" in result.stderr
