"""LoadSubjectStyleLoRA: the subject LoRA and the style LoRA, read once and paired."""

from __future__ import annotations

import logging

from ..plora_core.lora_file import LoraFile, LoraFileError, read_lora_file
from . import host
from .input_checks import register_object_type
from .lora_pair import LoraChoice, SubjectStyleLoras
from .lora_mapping import is_text_encoder_key, split_by_key_map

logger = logging.getLogger("plora")

PAIR_TYPE = "PLORA_PAIR"
register_object_type(PAIR_TYPE, SubjectStyleLoras, "Load Subject + Style LoRA (P-LoRA)")
_STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}


def apply_text_encoder_parts(clip, pair: SubjectStyleLoras):
    """Both LoRAs' text-encoder weights on a CLIP clone, as two chained LoraLoaders would."""
    key_map = host.clip_key_map(clip)
    for choice in (pair.subject, pair.style):
        te_tensors, _ = split_by_key_map(host.convert_lora(choice.file.tensors), key_map)
        if te_tensors and choice.strength != 0:
            clip = host.apply_lora_to_clip(clip, te_tensors, choice.strength)
            logger.info("P-LoRA: text-encoder part of %s applied to CLIP (%d tensors)", choice.name, len(te_tensors))
    return clip


def read_lora(name: str) -> LoraFile:
    """A LoRA named as in models/loras (only there), read and cached; messages use that name."""
    return read_lora_file(host.resolve_lora_path(name), label=host.model_label("loras", name),
                          should_stop=host.stop_if_interrupted)


def check_has_diffusion_part(choice: LoraChoice, role: str) -> None:
    """Refuse a LoRA that holds only text-encoder weights: P-LoRA fuses diffusion-model layers, so it
    would have nothing to fuse. Checked for both LoRAs before anything is applied."""
    if choice.strength == 0:
        return
    if all(is_text_encoder_key(key) for key in host.convert_lora(choice.file.tensors)):
        raise LoraFileError(
            f"The {role} LoRA {choice.name} holds only text-encoder weights (no diffusion-model layers), so "
            "P-LoRA has nothing of it to fuse. Apply it to the CLIP with ComfyUI's Load LoRA node instead, and "
            f"pick a LoRA with diffusion-model weights as {role} LoRA here (or set {role}_strength to 0)."
        )


class LoadSubjectStyleLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        files = host.lora_file_list()
        return {
            "required": {
                "subject_lora": (files, {"tooltip": "The LoRA of your subject (a person, pet or object), from models/loras."}),
                "subject_strength": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly the subject LoRA applies (its alpha/rank scale times this). 0 leaves it out."}),
                "style_lora": (files, {"tooltip": "The LoRA of the style (a painting style, medium or look), from models/loras."}),
                "style_strength": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly the style LoRA applies. 0 leaves it out."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Connect the checkpoint's CLIP to also apply both LoRAs' text-encoder weights, as LoraLoader does."}),
            },
        }

    FILE_INPUTS = ("subject_lora", "style_lora")  # names in models/loras: found (or refused) by the loader
    RETURN_TYPES = (PAIR_TYPE, "CLIP")
    RETURN_NAMES = ("lora_pair", "clip")
    OUTPUT_TOOLTIPS = (
        "The subject and style LoRAs with their strengths; connect it to PLoRAModelPatcher.",
        "The CLIP with both LoRAs' text-encoder weights applied (empty when no CLIP was connected).",
    )
    FUNCTION = "load"
    CATEGORY = "P-LoRA"
    DESCRIPTION = (
        "Loads a subject LoRA and a style LoRA for P-LoRA fusion. Reads every format ComfyUI's LoraLoader "
        "reads (kohya, diffusers/peft, ai-toolkit, LyCORIS), from models/loras only. Files are read once and cached."
    )

    def load(self, subject_lora, subject_strength, style_lora, style_strength, clip=None):
        pair = SubjectStyleLoras(
            subject=LoraChoice(read_lora(subject_lora), float(subject_strength)),
            style=LoraChoice(read_lora(style_lora), float(style_strength)),
        )
        check_has_diffusion_part(pair.subject, "subject")
        check_has_diffusion_part(pair.style, "style")
        if clip is not None:
            clip = apply_text_encoder_parts(clip, pair)
        return (pair, clip)
