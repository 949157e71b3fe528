"""LoadSubjectStyleLoRA: the subject LoRA and the style LoRA, read once and paired."""

from __future__ import annotations

from ..glue import host
from ..glue.lora_loading import PAIR_TYPE, STRENGTH, apply_text_encoder_parts, check_has_diffusion_part, read_lora
from ..glue.lora_pair import LoraChoice, LoraSet, same_file


class LoadSubjectStyleLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        files = host.lora_file_list()
        return {
            "required": {
                "subject_lora": (files, {"tooltip": "The LoRA of your subject (a person, pet or object), from models/loras."}),
                "subject_strength": ("FLOAT", {**STRENGTH, "tooltip": "How strongly the subject LoRA applies (its alpha/rank scale times this). 0 leaves it out."}),
                "style_lora": (files, {"tooltip": "The LoRA of the style (a painting style, medium or look), from models/loras."}),
                "style_strength": ("FLOAT", {**STRENGTH, "tooltip": "How strongly the style LoRA applies. 0 leaves it out."}),
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
        pair = LoraSet.pair(LoraChoice(read_lora(subject_lora), float(subject_strength)),
                            LoraChoice(read_lora(style_lora), float(style_strength)))
        if same_file(pair.subject.file, pair.style.file) and pair.subject.strength and pair.style.strength:
            raise ValueError(f"The subject and the style LoRA are the same file ({pair.subject.name}): P-LoRA fuses two "
                             "different LoRAs. Pick your subject's LoRA as subject_lora and a style LoRA as style_lora.")
        check_has_diffusion_part(pair.subject, "subject")
        check_has_diffusion_part(pair.style, "style")
        if clip is not None:
            clip = apply_text_encoder_parts(clip, pair.loras)
        return (pair, clip)
