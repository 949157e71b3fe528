"""PLoRAReference: one more reference image for the metric guidance, for a LoRA beyond the pair."""

from __future__ import annotations

from ..glue.references import REFERENCES_TYPE, ReferenceImages
from ..plora_core.scores import ROLES


class PLoRAReference:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The reference of one LoRA added with Add LoRA to Set: an image rendered by that LoRA alone with its own prompt (as Eq. 14-15 make the pair's references). Several images in a batch are averaged."}),
                "role": (list(ROLES), {"default": ROLES[0], "tooltip": "subject: the guidance's CLIP content term is measured against it (Eq. 16); style: the CLIP and DINO style terms (Eq. 17-18). Use the role its LoRA has in the set."}),
                "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "a_r of the extended Eq. 19: how much this reference counts beside the pair's two (which count 1 each). 0 leaves it out."}),
            },
            "optional": {
                "references": (REFERENCES_TYPE, {"tooltip": "References from another P-LoRA Reference node, to chain one per added LoRA."}),
            },
        }

    RETURN_TYPES = (REFERENCES_TYPE,)
    RETURN_NAMES = ("references",)
    OUTPUT_TOOLTIPS = ("The references so far; connect to more_references of a P-LoRA guidance node (or to the "
                       "next P-LoRA Reference).",)
    FUNCTION = "add"
    CATEGORY = "P-LoRA"
    DESCRIPTION = (
        "A reference image for a LoRA beyond the subject/style pair, with its role and weight, for the metric "
        "guidance (Eq. 19 extended over every LoRA's reference: subjects take the content term, styles the "
        "style terms)."
    )

    def add(self, image, role, weight, references=None):
        return ((references or ReferenceImages()).with_reference(image, role, weight),)
