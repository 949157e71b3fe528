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
