"""Every input of every node is checked before the node does any work, by one mechanism driven from each
node's INPUT_TYPES: IMAGE, LATENT, STRING, COMBO, INT, FLOAT and the pack's own types; a wrong value of
each kind (wrong type, wrong rank, zero size, wrong channels, NaN) is refused with a ValueError that names
the node and the input, and good values still reach the node."""

import inspect
import math

import pytest
import torch

CHECKED = ("IMAGE", "LATENT", "STRING", "COMBO", "INT", "FLOAT", "PLORA_PAIR", "PLORA_ENCODER", "PLORA_REFERENCES")


class Untouchable:
    """Stands for every input of a type the pack does not check (MODEL, VAE, CLIP, CONDITIONING): any use
    of it by a node fails the test."""

    def __getattr__(self, name):
        pytest.fail(f"the node used an input ({name}) before its inputs were checked")

    def __getitem__(self, key):
        pytest.fail("the node used an input before its inputs were checked")


def checked_inputs(pack):
    checks = pack.glue.input_checks
    for node_name, node_class in pack.nodes.NODE_CLASS_MAPPINGS.items():
        for name, spec in checks.input_specs(node_class).items():
            yield node_name, node_class, name, spec


@pytest.fixture
def good_values(pack, encoders):
    from plora_pack.glue.lora_pair import LoraChoice, LoraSet
    from plora_pack.glue.references import ReferenceImages
    from plora_pack.plora_core.lora_file import LoraFile

    lora = LoraFile("unused.safetensors", {}, {})
    return {"IMAGE": torch.rand(1, 8, 8, 3), "LATENT": {"samples": torch.zeros(1, 4, 8, 8)}, "STRING": "text",
            "PLORA_ENCODER": encoders[0],
            "PLORA_PAIR": LoraSet.pair(LoraChoice(lora, 1.0), LoraChoice(lora, 1.0)),
            "PLORA_REFERENCES": ReferenceImages()}


def valid_arguments(node_class, specs, good_values) -> dict:
    """Every declared input: a valid value of each checked type, Untouchable otherwise."""
    arguments = {}
    declared = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, declaration in declared.get(section, {}).items():
            spec = specs.get(name)
            options = declaration[1] if len(declaration) > 1 else {}
            if spec is None:
                arguments[name] = Untouchable()
            elif spec.kind in ("INT", "FLOAT"):
                arguments[name] = options.get("default", options.get("min", 0))
            elif spec.kind == "COMBO":
                arguments[name] = spec.choices[0] if spec.choices else "none.safetensors"
            else:
                arguments[name] = good_values[spec.kind]
    return arguments


def nan_image():
    image = torch.rand(1, 8, 8, 3)
    image[0, 3, 4, 1] = math.nan
    return image


BAD_VALUES = {
    "IMAGE": {"a list": [[0.5]], "a string": "image.png", "a LATENT": {"samples": torch.zeros(1, 4, 8, 8)},
              "rank 3": torch.rand(8, 8, 3), "rank 5": torch.rand(1, 1, 8, 8, 3),
              "an empty batch": torch.rand(0, 8, 8, 3), "zero height": torch.rand(1, 0, 8, 3),
              "zero width": torch.rand(2, 8, 0, 3), "7 channels": torch.rand(1, 8, 8, 7),
              "2 channels": torch.rand(1, 8, 8, 2), "channels first": torch.rand(1, 3, 8, 8),
              "NaN": nan_image(), "infinity": torch.full((1, 4, 4, 3), math.inf),
              "integers": torch.zeros(1, 8, 8, 3, dtype=torch.uint8), "None": None},
    "LATENT": {"a bare tensor": torch.zeros(1, 4, 8, 8), "no samples": {}, "samples not a tensor": {"samples": [1]},
               "rank 3": {"samples": torch.zeros(4, 8, 8)}, "rank 6": {"samples": torch.zeros(1, 4, 1, 1, 8, 8)},
               "an empty batch": {"samples": torch.zeros(0, 4, 8, 8)}, "an IMAGE": torch.rand(1, 8, 8, 3),
               "a list": [1, 2], "None": None},
    "STRING": {"a list": ["a", "b"], "a number": 12, "a dict": {"text": "a"}, "None": None},
    "COMBO": {"a list": ["kl"], "a number": 1, "a float": 0.5, "not a choice": "no-such-choice", "None": None},
    "INT": {"NaN": math.nan, "infinity": math.inf, "-infinity": -math.inf, "a string": "1", "a list": [1],
            "a bool": True, "a fraction": 1.5, "a whole float": 2.0, "None": None},
    "FLOAT": {"NaN": math.nan, "infinity": math.inf, "-infinity": -math.inf, "a string": "1.0", "a list": [1.0],
              "a bool": True, "None": None},
    "PLORA_PAIR": {"a dict": {"subject": "a"}, "a string": "pair", "None": None},
    "PLORA_ENCODER": {"a dict": {}, "a string": "ViT-B-32", "a tensor": torch.zeros(3), "None": None},
    "PLORA_REFERENCES": {"an IMAGE": torch.rand(1, 8, 8, 3), "a list": [("style", 1.0)], "None": None},
}


def bad_values(spec):
    values = dict(BAD_VALUES[spec.kind])
    if spec.kind in ("INT", "FLOAT"):
        step = 1 if spec.kind == "INT" else 0.5
        if spec.high is not None:
            values["above the range"] = spec.high + step
        if spec.low is not None:
            values["below the range"] = spec.low - step
    if spec.kind == "COMBO" and spec.names_a_file:
        values.pop("not a choice")  # the loader answers ComfyUI's own "not found" (tests/host/test_safety_*)
    if not spec.required:
        values.pop("None")  # an optional input left out
    return values


def test_every_input_of_a_checked_type_is_covered(pack):
    found = {(node, name): spec.kind for node, _, name, spec in checked_inputs(pack)}
    for node_class in pack.nodes.NODE_CLASS_MAPPINGS.values():
        assert getattr(getattr(node_class, node_class.FUNCTION), "__plora_input_checks__", False)
        for section in ("required", "optional"):
            for name, declaration in node_class.INPUT_TYPES().get(section, {}).items():
                kind = "COMBO" if isinstance(declaration[0], list) else declaration[0]
                assert (kind in CHECKED) == ((node_class.__name__, name) in found), (node_class.__name__, name)
    assert found[("PLoRAComparisonGrid", "images")] == "IMAGE" and found[("PLoRAScore", "images")] == "IMAGE"
    assert found[("PLoRASelectionMap", "samples")] == "LATENT"
    assert found[("PosteriorMetricGuidanceSampler", "latent_image")] == "LATENT"
    assert found[("PLoRAModelPatcher", "criterion")] == "COMBO" and found[("PLoRAComparisonGrid", "labels")] == "STRING"
    assert found[("LoadPLoRACLIPEncoder", "architecture")] == "COMBO"
    assert found[("PLoRAModelPatcher", "lora_pair")] == "PLORA_PAIR"
    assert set(found.values()) == set(CHECKED)


def test_wrong_values_of_every_kind_are_refused_before_any_work_naming_node_and_input(pack, good_values):
    tried, calls = set(), 0
    for node_name, node_class, name, spec in checked_inputs(pack):
        specs = pack.glue.input_checks.input_specs(node_class)
        method = getattr(node_class(), node_class.FUNCTION)
        for what, value in bad_values(spec).items():
            arguments = valid_arguments(node_class, specs, good_values)
            arguments[name] = value
            with pytest.raises(ValueError) as info:
                method(**arguments)
            message = str(info.value)
            assert message.startswith(f"{node_name}: input '{name}' "), (what, message)
            assert "connect" in message or "pick" in message or "range" in message or "finite" in message \
                or "whole number" in message, (what, message)
            tried.add((spec.kind, what))
            calls += 1
    assert {what for kind, what in tried if kind == "IMAGE"} == set(BAD_VALUES["IMAGE"])
    assert {kind for kind, _ in tried} == set(CHECKED) and calls > 300


def test_messages_say_what_is_wrong_and_what_to_connect(pack, good_values):
    grid = pack.nodes.PLoRAComparisonGrid().draw
    cases = [
        (torch.rand(0, 8, 8, 3), "input 'images' is an empty batch"),
        (torch.rand(8, 8, 3), r"input 'images' has shape \(8, 8, 3\) \(3 dimensions\); an IMAGE is \[batch, "
                              r"height, width, channels\]"),
        (torch.rand(1, 8, 8, 7), "input 'images' has 7 channels"),
        (nan_image(), "input 'images' holds NaN or infinite pixel values"),
        (torch.rand(1, 0, 4, 3), "input 'images' has images of size 0 x 4 pixels"),
    ]
    for images, expected in cases:
        with pytest.raises(ValueError, match=expected):
            grid(images, "a", 0)
    with pytest.raises(ValueError, match=r"input 'columns' is 2.0; it must be a whole number from 0 to 64 \(an INT"):
        grid(torch.rand(2, 8, 8, 3), "a", 2.0)
    with pytest.raises(ValueError, match=r"input 'labels' must be text \(a STRING\), not list"):
        grid(torch.rand(2, 8, 8, 3), ["a"], 0)
    patch = pack.nodes.PLoRAModelPatcher().patch
    with pytest.raises(ValueError, match=r"PLoRAModelPatcher: input 'criterion' is 'kld', which is not one of its "
                                         r"choices \('kl', "):
        patch(Untouchable(), good_values["PLORA_PAIR"], "kld", 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"input 'criterion' must be one of its list's names, not list \['kl'\]"):
        patch(Untouchable(), good_values["PLORA_PAIR"], ["kl"], 1.0, 0.0, 1.0)
    load = pack.nodes.LoadPLoRACLIPEncoder().load
    with pytest.raises(ValueError, match=r"LoadPLoRACLIPEncoder: input 'architecture' must be one of its list's "
                                         r"names, not list"):
        load("tiny_clip.safetensors", ["ViT-B-32"], "fp32")
    with pytest.raises(ValueError, match=r"LoadPLoRADINOEncoder: input 'model_folder' must be one of its list's "
                                         r"names, not list"):
        pack.nodes.LoadPLoRADINOEncoder().load(["dino"], "fp32")
    score = pack.nodes.PLoRAScore().score
    with pytest.raises(ValueError, match=r"PLoRAScore: input 'clip_encoder' must be a PLORA_ENCODER, not str "
                                         r"'ViT-B-32'; connect the PLORA_ENCODER output of Load P-LoRA CLIP"):
        score(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 8, 3), torch.rand(1, 8, 8, 3), "ViT-B-32",
              good_values["PLORA_ENCODER"])
    load_pair = pack.nodes.LoadSubjectStyleLoRA().load
    with pytest.raises(ValueError, match=r"LoadSubjectStyleLoRA: input 'subject_strength' is nan; it must be a "
                                         r"finite number from -10.0 to 10.0\."):
        load_pair("a.safetensors", math.nan, "b.safetensors", 1.0)  # positional, as some callers do
    with pytest.raises(ValueError, match=r"input 'style_strength' is 11.0, outside its range \(from -10.0 to 10.0\)"):
        load_pair(subject_lora="a.safetensors", subject_strength=1.0, style_lora="b.safetensors", style_strength=11.0)
    draw = pack.nodes.PLoRASelectionMap().draw
    with pytest.raises(ValueError, match=r"input 'image_index' must be a whole number from 0 to 4096, not str"):
        draw(Untouchable(), good_values["LATENT"], "0", "positive (cond)", 8)


def test_good_values_still_reach_the_nodes(pack, good_values):
    images = torch.rand(3, 8, 8, 3)
    (grid,) = pack.nodes.PLoRAComparisonGrid().draw(images, "a\nb\nc", 2)
    assert grid.shape[0] == 1 and grid.shape[-1] == 3
    for channels in (1, 4):  # every IMAGE channel count ComfyUI makes
        assert pack.nodes.PLoRAComparisonGrid().draw(torch.rand(1, 8, 8, channels), "", 0)[0].shape[-1] == channels
    import numpy as np

    pack.nodes.PLoRAComparisonGrid().draw(images, "a", np.int64(1))  # an integer from numpy is an int
    pack.nodes.PLoRAComparisonGrid().draw(images.double(), "a", 0)
    clip, dino = good_values["PLORA_ENCODER"], good_values["PLORA_ENCODER"]
    out = pack.nodes.PLoRAScore().score(images, images[:1], images[1:], clip, dino)
    assert len(out["ui"]["plora_scores"]) == 3
    with pytest.raises(ValueError, match="no P-LoRA gate"):  # valid inputs: the original method runs
        pack.nodes.PLoRASelectionMap().draw(tiny_model(), {"samples": torch.zeros(1, 4, 1, 8, 8)}, 0,
                                            "positive (cond)", 8)


def test_a_combo_among_choices_that_appeared_after_the_first_call_is_accepted(pack, monkeypatch):
    node_class = pack.nodes.PLoRAModelPatcher
    checks = pack.glue.input_checks
    specs = checks.input_specs(node_class)
    fresh = {**specs, "criterion": checks.InputSpec("COMBO", choices=(*specs["criterion"].choices, "new"))}
    checks.check_inputs("PLoRAModelPatcher", specs, {"criterion": "new"}, lambda: fresh)
    with pytest.raises(ValueError, match="input 'criterion' is 'newer'"):
        checks.check_inputs("PLoRAModelPatcher", specs, {"criterion": "newer"}, lambda: fresh)


def test_wrapping_keeps_the_signature_and_the_behaviour(pack):
    node_class = pack.nodes.PLoRASelectionMap
    wrapped = node_class.draw
    assert list(inspect.signature(wrapped).parameters) == ["self", "model", "samples", "image_index", "cfg_pass",
                                                           "cell_size"]
    pack.glue.input_checks.add_input_checks(node_class)  # a second registration does not wrap twice
    assert node_class.draw is wrapped


def test_optional_inputs_left_out_are_not_checked(pack):
    specs = {"size": ("INT", 0, 8)}
    pack.glue.input_checks.check_inputs("Node", specs, {})
    pack.glue.input_checks.check_inputs("Node", specs, {"size": None})
    with pytest.raises(ValueError, match="Node: input 'size' is 9"):
        pack.glue.input_checks.check_inputs("Node", specs, {"size": 9})
    grid = pack.nodes.PLoRAComparisonGrid()
    with pytest.raises(ValueError, match="PLoRAComparisonGrid: input 'images' is empty"):
        grid.draw(None, "a", 0)  # a required input that arrives as None (through a link)


def tiny_model():
    from support.host_support import tiny_sd15

    return tiny_sd15()
