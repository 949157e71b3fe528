"""scripts/run_workflow.py, the README's main-job command, against a real ComfyUI server."""

import re
import subprocess
import sys
from pathlib import Path

from support import server_support

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run_workflow.py"
FILES = ["--checkpoint", server_support.CHECKPOINT, "--subject-lora", server_support.SUBJECT_LORA,
         "--style-lora", server_support.STYLE_LORA, "--clip-checkpoint", server_support.CLIP_FILE,
         "--clip-architecture", "PLoRA-Tiny-ViT", "--dino", server_support.DINO_FOLDER]
SMALL = ["--steps", "2", "--width", "64", "--height", "64"]


def run_script(server, workflow: str, *extra: str):
    command = [sys.executable, str(SCRIPT), str(ROOT / "workflows" / workflow), "--url", server.url, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_progress_saved_files_and_separate_prompts(server):
    texts = {"prompt": "fused sks dog in wtrclr", "negative": "ugly blur", "subject-prompt": "just sks dog",
             "style-prompt": "just wtrclr style"}
    prompts = [arg for role, text in texts.items() for arg in (f"--{role}", text)]
    result = run_script(server, "plora_sdxl.json", *FILES, *SMALL, *prompts)
    log = result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "running node 17 PosteriorMetricGuidanceSampler" in log, log
    assert re.search(r"^  step 2/2", log, re.MULTILINE), log  # the server's progress, per sampler
    saved = [line for line in log.splitlines() if line.startswith(("saved:", "preview:"))]
    assert any(line.startswith("saved: output/plora_sdxl_") for line in saved), saved
    previews = [line for line in saved if line.startswith("preview: temp/")]
    assert len(previews) == 3, saved  # subject reference, style reference, selection map
    assert any('"Selection map' in line for line in previews)

    prompt_id = re.search(r"queued plora_sdxl.json as (\S+)", log).group(1)
    sent = server.get(f"/history/{prompt_id}")[prompt_id]["prompt"][2]
    assert sent["4"]["inputs"]["text"] == texts["prompt"]
    assert sent["5"]["inputs"]["text"] == texts["negative"]
    assert sent["8"]["inputs"]["text"] == texts["subject-prompt"]
    assert sent["12"]["inputs"]["text"] == texts["style-prompt"]
    assert sent["6"]["inputs"]["width"] == 64 and sent["17"]["inputs"]["steps"] == 2


def test_a_failing_node_is_reported_in_a_few_readable_lines(server):
    # valid values one by one, refused by the node when it runs: an execution error, not a validation one
    result = run_script(server, "plora_sdxl.json", *FILES, *SMALL, "--set", "guidance_start=0.9",
                        "--set", "guidance_end=0.1")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) < 40, result.stderr
    assert "The workflow failed at node 17 PosteriorMetricGuidanceSampler:" in lines, result.stderr
    failed = lines.index("The workflow failed at node 17 PosteriorMetricGuidanceSampler:")
    assert "guidance_start (0.9) must not be after guidance_end (0.1)" in lines[failed + 1]
    assert "Traceback" not in result.stderr and "tensor(" not in result.stderr


def test_a_refused_workflow_names_the_node_and_input(server):
    result = run_script(server, "plora_sdxl.json", *FILES, *SMALL, "--set", "guidance_scale=-3")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) < 40 and "refused the workflow before running it" in result.stderr
    assert any("node 17" in line and "guidance_scale" in line for line in lines), lines


def test_the_three_lora_workflow_takes_the_added_lora_and_its_prompt(server):
    result = run_script(server, "plora_three_loras.json", *FILES, *SMALL, "--added-lora", server_support.THIRD_LORA,
                        "--added-prompt", "just the third LoRA", "--node-set", "25.role=subject")
    log = result.stderr
    assert result.returncode == 0, log[-3000:]
    previews = [line for line in log.splitlines() if line.startswith("preview: temp/")]
    assert len(previews) == 4, log  # three references and the selection map
    prompt_id = re.search(r"queued plora_three_loras.json as (\S+)", log).group(1)
    sent = server.get(f"/history/{prompt_id}")[prompt_id]["prompt"][2]
    assert sent["25"]["inputs"]["lora"] == server_support.THIRD_LORA and sent["25"]["inputs"]["role"] == "subject"
    assert sent["26"]["inputs"]["lora_name"] == server_support.THIRD_LORA  # its reference branch follows
    assert sent["27"]["inputs"]["text"] == "just the third LoRA"


def test_more_added_loras_than_the_workflow_has_are_refused(server):
    result = run_script(server, "plora_three_loras.json", *FILES, "--added-lora", "a.safetensors",
                        "--added-lora", "b.safetensors")
    assert result.returncode == 1
    assert "2 --added-lora given, but the workflow has 1 Add LoRA to Set node(s) (25)" in result.stderr, result.stderr
