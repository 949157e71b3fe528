"""Map a LoRA file onto a model's layers with ComfyUI's own key map, and check the fit."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..plora_core.lora_file import LoraFile, LoraFileError
from ..plora_core.lora_info import lora_family
from . import host

logger = logging.getLogger("plora")

_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1.", "te2.", "te.", "text_encoders.", "lora_prior_te")
_MODULE_NAME_ENDS = (".lora", "_lora.", ".alpha", ".hada_", ".lokr_", ".diff", ".dora_scale", ".w_norm", ".b_norm",
                     ".a1.", ".a2.", ".b1.", ".b2.", ".set_weight", ".reshape_weight", ".oft_", ".lora_")


@dataclass
class ModulePatches:
    """The patches one LoRA puts on one model layer (a fused layer may get several)."""

    path: str  # module path inside model_patcher.model, e.g. diffusion_model.input_blocks.1.1.proj_in
    weight: list = field(default_factory=list)  # [(patch, offset, function)]
    bias: list = field(default_factory=list)


@dataclass
class MappedLora:
    name: str
    modules: dict[str, ModulePatches]
    raw_patches: dict  # what comfy.lora.load_lora returned, for add_patches


def lora_module_name(key: str) -> str:
    """The module part of a LoRA tensor key ('x.lora_down.weight' -> 'x'), for counting."""
    cut = min((i for i in (key.find(end) for end in _MODULE_NAME_ENDS) if i > 0), default=len(key))
    return key[:cut]


def is_text_encoder_key(key: str) -> bool:
    return key.startswith(_TEXT_ENCODER_PREFIXES)


def matching_prefix(key: str, prefixes) -> str | None:
    """The longest key-map prefix that `key` starts with at a '.' (or '_lora.') boundary."""
    found = None
    i = key.find(".")
    while i != -1:
        if key[:i] in prefixes:
            found = key[:i]
        i = key.find(".", i + 1)
    if found is None and "_lora." in key:
        head = key.split("_lora.")[0]
        found = head if head in prefixes else None
    return found


def split_by_key_map(tensors: dict, key_map: dict) -> tuple[dict, dict]:
    """(tensors whose module is in key_map, the rest)."""
    matched, rest = {}, {}
    for key, tensor in tensors.items():
        (matched if matching_prefix(key, key_map) is not None else rest)[key] = tensor
    return matched, rest


def _target_parts(target) -> tuple[str, object, object]:
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1], (target[2] if len(target) > 2 else None)


def map_lora_onto_model(model_patcher, lora: LoraFile) -> MappedLora:
    """Every model layer this LoRA patches, with its patches; errors name the file and say what to do."""
    tensors = host.convert_lora(lora.tensors)
    key_map = host.unet_key_map(model_patcher)
    matched, rest = split_by_key_map(tensors, key_map)
    if not matched:
        raise LoraFileError(
            f"LoRA file {lora.name} matches none of this model's layers: the model is "
            f"{host.model_family(model_patcher)}, the file looks like a {lora_family(lora.tensors, lora.metadata)} "
            "LoRA. Pick a LoRA trained for this checkpoint's family, or load the matching checkpoint."
        )
    ignored = sorted({lora_module_name(k) for k in rest if not is_text_encoder_key(k)})
    if ignored:
        total = len({lora_module_name(k) for k in matched}) + len(ignored)
        logger.warning(
            "LoRA %s: %d of %d diffusion-model modules match this model; %d are ignored (e.g. %s). "
            "The LoRA may be for another variant of this family.",
            lora.name, total - len(ignored), total, len(ignored), ", ".join(ignored[:3]),
        )
    raw = host.load_lora_patches(matched, key_map)
    modules: dict[str, ModulePatches] = {}
    for target, patch in raw.items():
        key, offset, function = _target_parts(target)
        path, _, param = key.rpartition(".")
        entry = modules.setdefault(path, ModulePatches(path))
        (entry.bias if param == "bias" else entry.weight).append((patch, offset, function))
    return MappedLora(lora.name, modules, raw)
