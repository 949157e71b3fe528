"""AddLoRAToSet: one more LoRA in the set, with its role and bias (chained as LoraLoader nodes are)."""

from __future__ import annotations

from ..glue import host
from ..glue.lora_loading import PAIR_TYPE, STRENGTH, apply_text_encoder_parts, check_has_diffusion_part, read_lora
from ..glue.lora_pair import MAX_LORAS, ROLES, LoraChoice, LoraSet


class AddLoRAToSet:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_set": (PAIR_TYPE, {"tooltip": "The set so far: from Load Subject + Style LoRA, or from another Add LoRA to Set."}),
                "lora": (host.lora_file_list(), {"tooltip": "The LoRA to add, from models/loras: a second subject (another character), an outfit, another style, a lighting LoRA..."}),
                "role": (list(ROLES), {"default": ROLES[0], "tooltip": "subject: who or what you render (its reference takes the guidance's content term); style: how it looks (a medium, a look, lighting; its reference takes the style terms). style_bias of the Model Patcher applies to styles."}),
                "strength": ("FLOAT", {**STRENGTH, "tooltip": "How strongly this LoRA applies (its alpha/rank scale times this). 0 leaves it out."}),
                "bias": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "Multiplies this LoRA's divergence in the gate (Eq. 13 as a weighted argmax): above 1 it wins more layers, below 1 fewer. 1 = as the paper weighs its subject."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Connect the CLIP from the node before to also apply this LoRA's text-encoder weights, as LoraLoader does."}),
            },
        }

    FUNCTION = "add"
    CATEGORY = "P-LoRA"
    FILE_INPUTS = ("lora",)  # a name in models/loras: found (or refused) by the loader
    RETURN_TYPES = (PAIR_TYPE, "CLIP")
    RETURN_NAMES = ("lora_set", "clip")
    OUTPUT_TOOLTIPS = ("The set with this LoRA added; connect it to P-LoRA Model Patcher (or to another Add LoRA to "
                       "Set).", "The CLIP with this LoRA's text-encoder weights applied (empty when no CLIP was "
                       "connected).")
    DESCRIPTION = (
        "Adds one LoRA to a P-LoRA set (beyond the paper: the gate chooses among N LoRAs, per layer, sample and "
        f"step, the one whose features moved most). Chain several, as LoraLoader nodes chain; up to {MAX_LORAS} "
        "LoRAs, all for one base model. Methods k-lora and b-lora take only the subject/style pair."
    )

    def add(self, lora_set: LoraSet, lora, role, strength, bias, clip=None):
        choice = LoraChoice(read_lora(lora), float(strength), role, float(bias))
        grown = lora_set.with_lora(choice)
        check_has_diffusion_part(choice, role, "strength")
        if clip is not None:
            clip = apply_text_encoder_parts(clip, (choice,))
        return (grown, clip)
