"""Every numeric input of every node is checked before the node does any work (NaN, inf, range, type)."""

import inspect
import math

import pytest


class Untouchable:
    """Stands for every non-numeric input: any use of it by a node fails the test."""

    def __getattr__(self, name):
        pytest.fail(f"the node used an input ({name}) before its numbers were checked")

    def __getitem__(self, key):
        pytest.fail("the node used an input before its numbers were checked")


def numeric_inputs(pack):
    checks = pack.nodes.input_checks
    for node_name, node_class in pack.nodes.NODE_CLASS_MAPPINGS.items():
        for name, (kind, low, high) in checks.numeric_specs(node_class).items():
            yield node_name, node_class, name, kind, low, high


def valid_arguments(node_class) -> dict:
    """Every declared input: defaults for numbers, the first option of lists, Untouchable otherwise."""
    arguments = {}
    declared = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if spec[0] in ("INT", "FLOAT"):
                arguments[name] = options.get("default", options.get("min", 0))
            elif isinstance(spec[0], list):
                arguments[name] = spec[0][0] if spec[0] else "none"
            else:
                arguments[name] = Untouchable()
    return arguments


def bad_values(kind, low, high):
    values = [math.nan, math.inf, -math.inf, "1.0", [1.0], True]
    if high is not None:
        values.append(high + (1 if kind == "INT" else 0.5))
    if low is not None:
        values.append(low - (1 if kind == "INT" else 0.5))
    if kind == "INT":
        values.append(1.5)
    return values


def test_every_node_has_its_numeric_inputs_checked(pack):
    found = {(node, name) for node, _, name, *_ in numeric_inputs(pack)}
    assert ("PosteriorMetricGuidanceSampler", "guidance_scale") in found
    assert ("LoadSubjectStyleLoRA", "subject_strength") in found and ("PLoRASelectionMap", "image_index") in found
    for node_class in pack.nodes.NODE_CLASS_MAPPINGS.values():
        assert getattr(getattr(node_class, node_class.FUNCTION), "__plora_input_checks__", False)


def test_bad_numbers_are_refused_before_any_work_naming_node_and_input(pack):
    tried = 0
    for node_name, node_class, name, kind, low, high in numeric_inputs(pack):
        method = getattr(node_class(), node_class.FUNCTION)
        for value in bad_values(kind, low, high):
            arguments = valid_arguments(node_class)
            arguments[name] = value
            with pytest.raises(ValueError) as info:
                method(**arguments)
            message = str(info.value)
            assert message.startswith(f"{node_name}: input '{name}' "), message
            tried += 1
    assert tried > 100


def test_messages_say_what_is_wrong(pack):
    load = pack.nodes.LoadSubjectStyleLoRA().load
    with pytest.raises(ValueError, match=r"LoadSubjectStyleLoRA: input 'subject_strength' is nan; it must be a "
                                         r"finite number from -10.0 to 10.0\."):
        load("a.safetensors", math.nan, "b.safetensors", 1.0)  # positional, as some callers do
    with pytest.raises(ValueError, match=r"input 'style_strength' is 11.0, outside its range \(from -10.0 to 10.0\)"):
        load(subject_lora="a.safetensors", subject_strength=1.0, style_lora="b.safetensors", style_strength=11.0)
    draw = pack.nodes.PLoRASelectionMap().draw
    with pytest.raises(ValueError, match=r"input 'cell_size' is 2.5; it must be a whole number from 1 to 64"):
        draw(Untouchable(), Untouchable(), 0, "positive (cond)", 2.5)
    with pytest.raises(ValueError, match=r"input 'image_index' must be a whole number from 0 to 4096, not str"):
        draw(Untouchable(), Untouchable(), "0", "positive (cond)", 8)


def test_wrapping_keeps_the_signature_and_the_behaviour(pack):
    node_class = pack.nodes.PLoRASelectionMap
    wrapped = node_class.draw
    assert list(inspect.signature(wrapped).parameters) == ["self", "model", "samples", "image_index", "cfg_pass",
                                                           "cell_size"]
    pack.nodes.input_checks.add_input_checks(node_class)  # a second registration does not wrap twice
    assert node_class.draw is wrapped
    with pytest.raises(ValueError, match="no P-LoRA gate"):  # valid numbers: the original method runs
        node_class().draw(tiny_model(), {}, 0, "positive (cond)", 8)


def test_optional_inputs_left_out_are_not_checked(pack):
    specs = {"size": ("INT", 0, 8)}
    pack.nodes.input_checks.check_inputs("Node", specs, {})
    pack.nodes.input_checks.check_inputs("Node", specs, {"size": None})
    with pytest.raises(ValueError, match="Node: input 'size' is 9"):
        pack.nodes.input_checks.check_inputs("Node", specs, {"size": 9})


def tiny_model():
    from support.host_support import tiny_sd15

    return tiny_sd15()
