"""Run a shipped P-LoRA workflow on a running ComfyUI, from the command line (standard library only).

    python scripts/run_workflow.py workflows/plora_sdxl.json --url http://127.0.0.1:8188 \\
        --checkpoint sd_xl_base_1.0.safetensors --subject-lora my_dog.safetensors \\
        --style-lora watercolour.safetensors --clip-checkpoint ViT-B-32.pt --dino dino-vits16 \\
        --prompt "a photo of sks dog in wtrclr watercolour style" --subject-prompt "a photo of sks dog" \\
        --style-prompt "a garden in wtrclr watercolour style"

The workflow's placeholder file names are replaced by yours, it is converted to ComfyUI's API
format with the server's own /object_info and queued on /prompt. While it runs, the server's
progress (node, step/total, ETA) is shown from its websocket; when it ends, every image it
saved is listed (outputs, and the references and selection map it previewed into temp/), or
the failing node's error is printed in one paragraph. `--set input=value` overrides any widget
of every node that has it (e.g. --set cfg=5); `--node-set ID.input=value` one node's widget.

Sets of N LoRAs (workflows/plora_three_loras.json): `--added-lora FILE`, repeated, replaces the
LoRA of each Add LoRA to Set node in node order (the first --added-lora the first such node);
its placeholder is replaced wherever else the workflow names it (that LoRA's reference branch).
`--added-prompt TEXT`, repeated, sets the prompt of the text nodes titled "Added prompt 1",
"Added prompt 2", ... (each added LoRA's reference prompt). E.g.

    python scripts/run_workflow.py workflows/plora_three_loras.json --checkpoint v1-5.safetensors \\
        --subject-lora dog.safetensors --style-lora watercolour.safetensors \\
        --added-lora golden_hour.safetensors --added-prompt "a garden at golden hour" \\
        --node-set 25.role=style --clip-checkpoint ViT-B-32.pt --dino dino-vits16
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_client import EventStream, ServerError, post_quietly, request  # noqa: E402
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
# --option -> the title prefix of the text-encode nodes it sets (the shipped workflows' titles)
PROMPT_ROLES = {"prompt": "Positive", "negative": "Negative", "subject_prompt": "Subject prompt",
                "style_prompt": "Style prompt"}
SHORTCUTS = ("width", "height", "steps")
ADDED_PROMPT = re.compile(r"^Added prompt (\d+)")  # the title of an added LoRA's reference prompt
ADD_LORA = "AddLoRAToSet"
ERROR_CHARS = 1500


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def node_labels(workflow: dict) -> dict[str, str]:
    """API node id -> 'node 17 "Title" (Type)' for messages."""
    labels = {}
    for node in workflow["nodes"]:
        title = node.get("title")
        labels[str(node["id"])] = f"node {node['id']} " + (f'"{title}" ({node["type"]})' if title else node["type"])
    return labels


def text_roles(workflow: dict) -> dict[str, str]:
    """API node id -> the --option whose text it takes, from the node titles."""
    roles = {}
    for node in workflow["nodes"]:
        title = node.get("title") or ""
        for option, prefix in PROMPT_ROLES.items():
            if title.startswith(prefix):
                roles[str(node["id"])] = option
    return roles


def added_prompt_nodes(workflow: dict) -> dict[int, str]:
    """k -> the API node id of the text node titled "Added prompt k"."""
    found = {}
    for node in workflow["nodes"]:
        match = ADDED_PROMPT.match(node.get("title") or "")
        if match:
            found[int(match.group(1))] = str(node["id"])
    return found


def replace_added_loras(prompt: dict, files: list[str], replacements: dict) -> dict:
    """Put `files` into the Add LoRA to Set nodes, in node order; returns the replacements with each of those
    nodes' placeholders mapped to its file (so that LoRA's reference branch gets it too)."""
    nodes = sorted((node_id for node_id, node in prompt.items() if node["class_type"] == ADD_LORA), key=int)
    if len(files) > len(nodes):
        raise ValueError(f"{len(files)} --added-lora given, but the workflow has {len(nodes)} Add LoRA to Set "
                         f"node(s){' (' + ', '.join(nodes) + ')' if nodes else ''}; give one per node, in node order")
    replacements = dict(replacements)
    placeholders = [prompt[node_id]["inputs"].get("lora") for node_id in nodes]
    for node_id, placeholder, file in zip(nodes, placeholders, files):
        prompt[node_id]["inputs"]["lora"] = file
        if isinstance(placeholder, str) and placeholders.count(placeholder) == 1:
            replacements.setdefault(placeholder, file)
    return replacements


def parse_node_sets(items: list[str]) -> dict[str, dict]:
    """['25.role=subject', ...] -> {'25': {'role': 'subject'}}; ValueError naming a malformed item."""
    found: dict[str, dict] = {}
    for item in items:
        target, equals, value = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not (equals and dot and node_id.strip().isdigit() and name.strip()):
            raise ValueError(f"--node-set {item!r}: write NODE_ID.input=value, e.g. --node-set 25.role=subject")
        found.setdefault(node_id.strip(), {})[name.strip()] = parse_value(value)
    return found


def build_prompt(workflow: dict, object_info: dict, replacements: dict, overrides: dict,
                 texts: dict | None = None, added_loras: list[str] = (), added_prompts: list[str] = (),
                 node_sets: dict[str, dict] | None = None) -> dict:
    """The API-format prompt with file names replaced, widget overrides and per-role texts applied; the Add
    LoRA to Set nodes' files and the added prompts set in order; per-node overrides last."""
    prompt = ui_to_api(workflow, object_info)
    if added_loras:
        replacements = replace_added_loras(prompt, list(added_loras), replacements)
    roles = text_roles(workflow)
    for node_id, node in prompt.items():
        for name, value in list(node["inputs"].items()):
            if isinstance(value, list):  # a link
                continue
            if isinstance(value, str) and value in replacements:
                node["inputs"][name] = replacements[value]
            if name in overrides:
                node["inputs"][name] = overrides[name]
        role = roles.get(node_id)
        if texts and role in texts and "text" in node["inputs"] and not isinstance(node["inputs"]["text"], list):
            node["inputs"]["text"] = texts[role]
    slots = added_prompt_nodes(workflow)
    for number, text in enumerate(added_prompts, start=1):
        if number not in slots:
            raise ValueError(f"--added-prompt number {number} given, but no text node is titled 'Added prompt "
                             f"{number}' (the workflow has {len(slots)})")
        prompt[slots[number]]["inputs"]["text"] = text
    for node_id, values in (node_sets or {}).items():
        if node_id not in prompt:
            raise ValueError(f"--node-set: the workflow has no node {node_id}")
        for name, value in values.items():
            if name not in prompt[node_id]["inputs"] or isinstance(prompt[node_id]["inputs"][name], list):
                raise ValueError(f"--node-set: node {node_id} ({prompt[node_id]['class_type']}) has no widget {name}")
            prompt[node_id]["inputs"][name] = value
    return prompt


def short_type(exception_type: str) -> str:
    """'custom_nodes/plora.plora_core.lora_file.LoraFileError' -> 'LoraFileError'."""
    return exception_type.rpartition(".")[2] or exception_type


def clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + " ..."


def describe_refusal(answer, labels: dict) -> str:
    """/prompt's 400 answer (validation errors) as a few readable lines."""
    if not isinstance(answer, dict):
        return f"ComfyUI refused the workflow: {clip(answer)}"
    lines = ["ComfyUI refused the workflow before running it:"]
    for node_id, problem in (answer.get("node_errors") or {}).items():
        for error in problem.get("errors", [])[:3]:
            detail = f": {error['details']}" if error.get("details") else ""
            lines.append(f"  {labels.get(str(node_id), 'node ' + str(node_id))}: {clip(error.get('message', ''))}"
                         f"{clip(detail)}")
    if len(lines) == 1:
        error = answer.get("error", answer)
        lines.append("  " + clip(error.get("message", error) if isinstance(error, dict) else error))
    return "\n".join(lines)


def describe_failure(data: dict, labels: dict) -> str:
    """An execution_error event (or history message) as one paragraph, no traceback or tensors."""
    node = labels.get(str(data.get("node_id")), f"node {data.get('node_id')} ({data.get('node_type')})")
    return (f"The workflow failed at {node}:\n  {short_type(data.get('exception_type', 'Error'))}: "
            f"{clip(data.get('exception_message', ''))}\n(The server's log has the full traceback.)")


def saved_files(entry: dict, labels: dict) -> list[str]:
    """Every image the run wrote: 'output/...' for saved images, 'temp/...' for previews."""
    lines = []
    for node_id, output in entry.get("outputs", {}).items():
        for image in output.get("images", []):
            folder = image.get("type", "output")
            path = "/".join(part for part in (folder, image.get("subfolder", ""), image["filename"]) if part)
            kind = "saved" if folder == "output" else "preview"
            lines.append(f"{kind}: {path}  ({labels.get(str(node_id), node_id)})")
    return lines


class ProgressReport:
    """Turns the server's events for one prompt into progress lines with an ETA."""

    def __init__(self, labels: dict, interactive: bool):
        self.labels = labels
        self.interactive = interactive
        self.node_start: dict[str, tuple[float, int]] = {}
        self.last_line = 0.0

    def executing(self, node_id) -> None:
        self._end_line()
        logger.info("running %s", self.labels.get(str(node_id), f"node {node_id}"))

    def progress(self, node_id, value: int, total: int) -> None:
        now = time.monotonic()
        start, first = self.node_start.setdefault(str(node_id), (now, value))
        eta = ""
        if value > first and total > value:
            seconds = (now - start) / (value - first) * (total - value)
            eta = f"  ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"
        line = f"  step {value}/{total}{eta}"
        if self.interactive:
            sys.stderr.write("\r" + line.ljust(40))
            sys.stderr.flush()
        elif value == total or now - self.last_line >= 1.0:
            logger.info(line)
            self.last_line = now

    def _end_line(self) -> None:
        if self.interactive and self.node_start:
            sys.stderr.write("\n")


def wait_with_events(stream: EventStream, prompt_id: str, report: ProgressReport, deadline: float | None):
    """Follow the websocket until the prompt ends; returns the execution_error data or None."""
    for event in stream.events():
        data = event.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        kind = event.get("type")
        if kind == "executing":
            if data.get("node") is None and data.get("prompt_id") == prompt_id:
                return None
            report.executing(data.get("display_node") or data.get("node"))
        elif kind == "progress":
            report.progress(data.get("node"), int(data.get("value", 0)), int(data.get("max", 0)))
        elif kind == "execution_cached" and data.get("nodes"):
            logger.info("reused from the server's cache: %d node(s)", len(data["nodes"]))
        elif kind == "execution_error":
            return data
        elif kind == "execution_interrupted":
            return {"node_id": data.get("node_id"), "node_type": data.get("node_type"),
                    "exception_type": "Interrupted", "exception_message": "the run was interrupted on the server"}
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
    return None


def wait_with_history(url: str, prompt_id: str, deadline: float | None) -> None:
    while deadline is None or time.monotonic() < deadline:
        entry = request(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return
        time.sleep(1)
    raise TimeoutError


def history_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", type=Path, help="a workflow JSON saved by the ComfyUI frontend")
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="the running ComfyUI")
    for option, olds in PLACEHOLDER_OPTIONS.items():
        parser.add_argument(f"--{option.replace('_', '-')}", dest=option, help=f"replaces {olds}")
    parser.add_argument("--prompt", help="the fused image's prompt (subject in the style, with both trigger words)")
    parser.add_argument("--negative", help="the negative prompt")
    parser.add_argument("--subject-prompt", dest="subject_prompt", help="the subject reference's prompt (Eq. 14)")
    parser.add_argument("--style-prompt", dest="style_prompt", help="the style reference's prompt (Eq. 15)")
    for name in SHORTCUTS:
        parser.add_argument(f"--{name}", type=int, help=f"set {name} on every node that has it")
    parser.add_argument("--set", action="append", default=[], metavar="INPUT=VALUE",
                        help="override a widget value on every node that has it")
    parser.add_argument("--node-set", dest="node_set", action="append", default=[], metavar="ID.INPUT=VALUE",
                        help="override one node's widget value, e.g. --node-set 25.role=subject")
    parser.add_argument("--added-lora", dest="added_lora", action="append", default=[], metavar="FILE",
                        help="the LoRA of an Add LoRA to Set node (repeat: one per node, in node order)")
    parser.add_argument("--added-prompt", dest="added_prompt", action="append", default=[], metavar="TEXT",
                        help="the reference prompt of an added LoRA (repeat: the text nodes 'Added prompt 1', 2, ...)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="give up waiting after this many seconds (default: wait until the run ends)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    replacements = {old: getattr(args, option) for option, olds in PLACEHOLDER_OPTIONS.items()
                    for old in olds if getattr(args, option)}
    overrides = dict((k, parse_value(v)) for k, v in (item.split("=", 1) for item in args.set))
    overrides.update({name: getattr(args, name) for name in SHORTCUTS if getattr(args, name) is not None})
    texts = {role: getattr(args, role) for role in PROMPT_ROLES if getattr(args, role) is not None}
    url = args.url.rstrip("/")
    workflow = json.loads(args.workflow.read_text())
    labels = node_labels(workflow)
    try:
        node_sets = parse_node_sets(args.node_set)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    try:
        prompt = build_prompt(workflow, request(f"{url}/object_info"), replacements, overrides, texts,
                              args.added_lora, args.added_prompt, node_sets)
    except (KeyError, ValueError) as error:
        logger.error("The workflow does not match this server's nodes: %s", error)
        return 1
    except OSError as error:
        logger.error("No ComfyUI answered at %s (%s). Start it first, or pass --url.", url, error)
        return 1

    client_id = uuid.uuid4().hex
    try:
        stream = EventStream(url, client_id, timeout=args.timeout)
    except OSError as error:
        logger.warning("no progress from the server's websocket (%s); waiting for the result instead", error)
        stream = None
    try:
        answer = request(f"{url}/prompt", {"prompt": prompt, "client_id": client_id})
    except ServerError as error:
        logger.error(describe_refusal(error.body, labels))
        return 1
    prompt_id = answer["prompt_id"]
    if answer.get("node_errors"):
        # ComfyUI queued the outputs that do not depend on the refused nodes; take them back off the queue
        logger.error(describe_refusal(answer, labels))
        post_quietly(f"{url}/queue", {"delete": [prompt_id]})  # answers with an empty body
        return 1
    logger.info("queued %s as %s", args.workflow.name, prompt_id)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    failure = None
    try:
        try:
            if stream is not None:
                failure = wait_with_events(stream, prompt_id, ProgressReport(labels, sys.stderr.isatty()), deadline)
        except TimeoutError:
            raise
        except OSError as error:
            logger.warning("lost the server's websocket (%s); waiting for the result instead", error)
        wait_with_history(url, prompt_id, deadline)
    except TimeoutError:
        logger.error("No result after %s s; the server goes on with prompt %s (its queue can cancel it).",
                     args.timeout, prompt_id)
        return 1
    finally:
        if stream is not None:
            stream.close()
    entry = request(f"{url}/history/{prompt_id}").get(prompt_id, {})
    failure = failure or history_error(entry)
    if failure is not None or entry.get("status", {}).get("status_str") not in (None, "success"):
        logger.error(describe_failure(failure or {}, labels))
        return 1
    files = saved_files(entry, labels)
    for line in files:
        logger.info(line)
    if not files:
        logger.info("the run saved no image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
