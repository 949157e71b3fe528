"""Run a shipped P-LoRA workflow on a running ComfyUI, from the command line.

    python scripts/run_workflow.py workflows/plora_sdxl.json --url http://127.0.0.1:8188 \\
        --checkpoint sd_xl_base_1.0.safetensors --subject-lora my_dog.safetensors \\
        --style-lora watercolour.safetensors --clip-checkpoint ViT-B-32.pt --dino dino-vits16

The workflow's placeholder file names are replaced by yours, it is converted to ComfyUI's API
format with the server's own /object_info, queued on /prompt, and the images it saved are
listed when it finishes. `--set input=value` overrides any widget (e.g. --set steps=20).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workflow_api import ui_to_api  # noqa: E402

logger = logging.getLogger("plora.run_workflow")
PLACEHOLDER_OPTIONS = {
    "checkpoint": ["sd_xl_base_1.0.safetensors", "flux1-dev.safetensors"],
    "subject_lora": ["my_subject_lora.safetensors", "my_flux_subject_lora.safetensors"],
    "style_lora": ["my_style_lora.safetensors", "my_flux_style_lora.safetensors"],
    "clip_checkpoint": ["open_clip_vit_b_32.safetensors"],
    "clip_architecture": ["ViT-B-32"],
    "dino": ["dino-vits16"],
}


def request(url: str, body: dict | None = None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        raise SystemExit(f"ComfyUI answered {error.code} for {url}:\n{detail}") from None


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_prompt(workflow: dict, object_info: dict, replacements: dict, overrides: dict) -> dict:
    prompt = ui_to_api(workflow, object_info)
    for node in prompt.values():
        for name, value in list(node["inputs"].items()):
            if isinstance(value, str) and value in replacements:
                node["inputs"][name] = replacements[value]
            if name in overrides and not isinstance(value, list):
                node["inputs"][name] = overrides[name]
    return prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    for option in PLACEHOLDER_OPTIONS:
        parser.add_argument(f"--{option.replace('_', '-')}", dest=option,
                            help=f"replaces {PLACEHOLDER_OPTIONS[option]}")
    parser.add_argument("--set", action="append", default=[], metavar="INPUT=VALUE", help="override a widget value")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    replacements = {old: getattr(args, option) for option, olds in PLACEHOLDER_OPTIONS.items()
                    for old in olds if getattr(args, option)}
    overrides = dict((k, parse_value(v)) for k, v in (item.split("=", 1) for item in args.set))
    url = args.url.rstrip("/")
    prompt = build_prompt(json.loads(args.workflow.read_text()), request(f"{url}/object_info"), replacements,
                          overrides)
    answer = request(f"{url}/prompt", {"prompt": prompt})
    if answer.get("node_errors"):
        raise SystemExit(f"ComfyUI refused parts of the workflow: {json.dumps(answer['node_errors'], indent=1)}")
    prompt_id = answer["prompt_id"]
    logger.info("queued %s as %s", args.workflow.name, prompt_id)
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        entry = request(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            if entry["status"].get("status_str") != "success":
                raise SystemExit(f"the workflow failed: {json.dumps(entry['status'], indent=1)}")
            for output in entry["outputs"].values():
                for image in output.get("images", []):
                    if image.get("type") == "output":
                        logger.info("saved: output/%s%s", f"{image['subfolder']}/" if image["subfolder"] else "",
                                    image["filename"])
            return
        time.sleep(1)
    raise SystemExit(f"no result after {args.timeout} s (prompt {prompt_id})")


if __name__ == "__main__":
    main()
