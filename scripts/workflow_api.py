"""Turn a UI-format workflow (what the frontend saves) into the API format /prompt takes."""

from __future__ import annotations

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def has_control_widget(name: str, spec) -> bool:
    """INT inputs with 'control_after_generate' get an extra saved value after them in the UI."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed"))


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        if node["type"] not in object_info:
            raise KeyError(f"node type {node['type']} (id {node['id']}) is not registered: a missing node")
        spec = object_info[node["type"]]["input"]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name, input_spec in spec.get(section, {}).items():
                if name in linked:
                    link = linked[name]
                    inputs[name] = [str(link[1]), link[2]]
                elif is_widget(input_spec):
                    if not values:
                        options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
                        if section == "optional" and "default" in options:
                            # saved before this optional widget existed: the frontend also fills its default
                            inputs[name] = options["default"]
                            continue
                        raise ValueError(f"node {node['id']} ({node['type']}) has too few widget values for {name}")
                    inputs[name] = values.pop(0)
                    if has_control_widget(name, input_spec):
                        values.pop(0)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}) has {len(values)} widget values left over")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def check_links(workflow: dict, object_info: dict) -> list[str]:
    """Problems with the workflow's links: an output type that does not match the input it feeds."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, origin, slot, target, target_slot, link_type in workflow["links"]:
        out_type = object_info[nodes[origin]["type"]]["output"][slot]
        input_name = nodes[target]["inputs"][target_slot]["name"]
        spec = object_info[nodes[target]["type"]]["input"]
        in_type = {**spec.get("required", {}), **spec.get("optional", {})}[input_name][0]
        if not (out_type == in_type == link_type):
            problems.append(f"link {link_id}: {out_type} -> {nodes[target]['type']}.{input_name} ({in_type})")
    return problems


def combo_options(spec) -> list | None:
    """The choices of a COMBO input spec (old form [[...], {...}] or new form ["COMBO", {"options": [...]}])."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return list(options.get("options", []))
    return None


class Graph:
    """An API-format prompt built node by node: `add` returns the new node's id, `link` an output of it."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def link(node_id: str, slot: int = 0) -> list:
        return [node_id, slot]

    def labels(self) -> dict[str, str]:
        """Node id -> 'node 3 PLoRAModelPatcher', for messages."""
        return {node_id: f"node {node_id} {node['class_type']}" for node_id, node in self.nodes.items()}


def fill_defaults(prompt: dict, object_info: dict) -> dict:
    """Give every required widget input a prompt leaves out the server's default (a combo: its first choice).

    So a graph built by name keeps working when a node gains a required input with a default.
    """
    for node_id, node in prompt.items():
        spec = object_info[node["class_type"]]["input"]
        for name, input_spec in spec.get("required", {}).items():
            if name in node["inputs"] or not is_widget(input_spec):
                continue
            options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
            choices = combo_options(input_spec)
            if "default" in options:
                node["inputs"][name] = options["default"]
            elif choices:
                node["inputs"][name] = choices[0]
            else:
                raise ValueError(f"node {node_id} ({node['class_type']}): required input {name} has no default")
    return prompt


def check_prompt(prompt: dict, object_info: dict) -> list[str]:
    """Problems of an API-format prompt against a server's /object_info: unknown node types or input names,
    missing required inputs, links to missing nodes or outputs, and link types that do not match."""
    problems = []
    for node_id, node in prompt.items():
        kind = node["class_type"]
        if kind not in object_info:
            problems.append(f"node {node_id}: {kind} is not registered on the server")
            continue
        spec = object_info[kind]["input"]
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        for name in spec.get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"node {node_id} ({kind}): required input {name} is missing")
        for name, value in node["inputs"].items():
            if name not in declared:
                problems.append(f"node {node_id} ({kind}): the server's {kind} has no input {name}")
                continue
            if not isinstance(value, list):
                continue
            source = prompt.get(str(value[0]))
            outputs = object_info.get(source["class_type"], {}).get("output", []) if source else []
            if source is None or not 0 <= value[1] < len(outputs):
                problems.append(f"node {node_id} ({kind}): input {name} links to a missing node or output {value}")
                continue
            wanted, given = declared[name][0], outputs[value[1]]
            if not isinstance(wanted, list) and "*" not in (wanted, given) and wanted != given:
                problems.append(f"node {node_id} ({kind}): input {name} takes {wanted}, linked to {given}")
    return problems
