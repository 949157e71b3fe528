"""PLoRAModelPatcher: MODEL + subject/style pair -> a clone whose shared layers run the KL gate."""

from __future__ import annotations

from ..plora_core.divergence import DIVERGENCES
from .gate import build_gated_model
from .load_pair import PAIR_TYPE


class PLoRAModelPatcher:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base diffusion model (SD1.5, SDXL or Flux). It is not modified: a patched clone is returned."}),
                "lora_pair": (PAIR_TYPE, {"tooltip": "The subject and style LoRAs from LoadSubjectStyleLoRA."}),
                "criterion": (list(DIVERGENCES), {"default": "kl", "tooltip": "How a LoRA's change of a layer's output is measured: kl (the paper), or the other criteria of paper Table 4: js (Jensen-Shannon), cosine (1 - cos to the base output) or dot (how much the dot product with the base output drops)."}),
                "style_bias": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Multiplies the style LoRA's divergence before the comparison. 1.0 is the paper; above 1 favours the style, below 1 the subject."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Where in the denoising the gate starts; before it both LoRAs are merged directly."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Where in the denoising the gate ends; after it both LoRAs are merged directly."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with P-LoRA fusion: connect it to a KSampler or the PosteriorMetricGuidanceSampler.",)
    FUNCTION = "patch"
    CATEGORY = "P-LoRA"
    DESCRIPTION = (
        "P-LoRA posterior feature knowledge (paper Eq. 9-13): at every layer both LoRAs touch, computes the "
        "base output and the output with each LoRA and passes on the one whose feature distribution moved "
        "more, per sample and per step. Layers only one LoRA touches get it merged as LoraLoader would."
    )

    def patch(self, model, lora_pair, criterion, style_bias, start_percent, end_percent):
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) must not be after end_percent ({end_percent}).")
        return (build_gated_model(model, lora_pair, criterion, style_bias, start_percent, end_percent),)
