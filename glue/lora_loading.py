"""The subject and style LoRAs read from models/loras for LoadSubjectStyleLoRA: checked, and their
text-encoder parts applied to a CLIP. The PLORA_PAIR type the loader hands to the patcher is named here.
"""

from __future__ import annotations

import logging

from ..plora_core.lora_file import LoraFile, LoraFileError, read_lora_file
from . import host
from .input_checks import register_object_type
from .lora_mapping import is_text_encoder_key, split_by_key_map
from .lora_pair import LoraChoice, LoraSet

logger = logging.getLogger("plora")

PAIR_TYPE = "PLORA_PAIR"
STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}  # a LoRA's strength widget, as LoraLoader's
register_object_type(PAIR_TYPE, LoraSet, "Load Subject + Style LoRA (P-LoRA)")


def apply_text_encoder_parts(clip, choices):
    """The LoRAs' text-encoder weights on a CLIP clone, as chained LoraLoaders would."""
    key_map = host.clip_key_map(clip)
    for choice in choices:
        te_tensors, _ = split_by_key_map(host.convert_lora(choice.file.tensors), key_map)
        if te_tensors and choice.strength != 0:
            clip = host.apply_lora_to_clip(clip, te_tensors, choice.strength)
            logger.info("P-LoRA: text-encoder part of %s applied to CLIP (%d tensors)", choice.name, len(te_tensors))
    return clip


def read_lora(name: str) -> LoraFile:
    """A LoRA named as in models/loras (only there), read and cached; messages use that name."""
    return read_lora_file(host.resolve_lora_path(name), label=host.model_label("loras", name),
                          should_stop=host.stop_if_interrupted)


def check_has_diffusion_part(choice: LoraChoice, role: str, strength_input: str | None = None) -> None:
    """Refuse a LoRA that holds only text-encoder weights: P-LoRA fuses diffusion-model layers, so it
    would have nothing to fuse. Checked for both LoRAs before anything is applied."""
    if choice.strength == 0:
        return
    if all(is_text_encoder_key(key) for key in host.convert_lora(choice.file.tensors)):
        raise LoraFileError(
            f"The {role} LoRA {choice.name} holds only text-encoder weights (no diffusion-model layers), so "
            "P-LoRA has nothing of it to fuse. Apply it to the CLIP with ComfyUI's Load LoRA node instead, and "
            f"pick a LoRA with diffusion-model weights as {role} LoRA here (or set {strength_input or role + '_strength'} "
            "to 0)."
        )

