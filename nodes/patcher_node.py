"""PLoRAModelPatcher: MODEL + subject/style pair -> a clone whose shared layers run the KL gate
(or, with `method`, one of the paper's rival fusion rules, for comparison)."""

from __future__ import annotations

from ..glue.gate import METHODS, build_gated_model
from ..glue.lora_loading import PAIR_TYPE
from ..plora_core.divergence import DIVERGENCES
from ..plora_core.fusion_rules import KLORA_PRESETS


class PLoRAModelPatcher:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base diffusion model (SD1.5, SDXL, SD3.5, Flux, Chroma, Qwen-Image, HiDream, Wan, ...). It is not modified: a patched clone is returned."}),
                "lora_pair": (PAIR_TYPE, {"tooltip": "The subject and style LoRAs from LoadSubjectStyleLoRA, with any LoRAs added by Add LoRA to Set (P-LoRA) after it."}),
                "criterion": (list(DIVERGENCES), {"default": "kl", "tooltip": "How a LoRA's change of a layer's output is measured: kl (the paper), or the other criteria of paper Table 4: js (Jensen-Shannon), cosine (1 - cos to the base output) or dot (how much the dot product with the base output drops)."}),
                "style_bias": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Multiplies the style LoRAs' divergences before the comparison (on top of each LoRA's own bias from Add LoRA to Set). 1.0 is the paper; above 1 favours the style, below 1 the subject."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Where in the denoising the gate starts; before it both LoRAs are merged directly."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Where in the denoising the gate ends; after it both LoRAs are merged directly."}),
            },
            "optional": {
                "method": (list(METHODS), {"default": "p-lora", "tooltip": "How the LoRAs are fused. p-lora: the KL gate (paper Eq. 9-13); with more than two LoRAs it passes on, per layer, sample and step, the one whose biased divergence is largest among those touching the layer. direct: all merged, exactly as chained LoraLoaders. k-lora: K-LoRA's rule (CVPR 2025): per layer the LoRA whose Top-K |dW| sum wins, weighted by a time schedule read from this run's sigmas. b-lora: SDXL only, the subject LoRA only in the content block (output_blocks.0.1) and the style LoRA only in the style block (output_blocks.1.1). k-lora and b-lora take exactly one subject and one style LoRA. criterion and style_bias apply to p-lora only."}),
                "k_lora_preset": (sorted(KLORA_PRESETS), {"default": "s*", "tooltip": "K-LoRA's time schedule S(t), t = the run's progress from 0 to 1: s* (their default) = (1.5 t + 1.275) mod 1.5; s = 1.5 t + 0.5. The subject LoRA acts where its Top-K sum / gamma exceeds S(t) x the style's. Used by method k-lora only."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with P-LoRA fusion: connect it to a KSampler or the PosteriorMetricGuidanceSampler.",)
    FUNCTION = "patch"
    CATEGORY = "P-LoRA"
    DESCRIPTION = (
        "P-LoRA posterior feature knowledge (paper Eq. 9-13): at every layer two or more LoRAs touch, computes the "
        "base output and the output with each LoRA and passes on the one whose feature distribution moved "
        "most, per sample and per step. Layers only one LoRA touches get it merged as LoraLoader would. "
        "The method input switches to a rival rule for comparison: direct merge, K-LoRA or B-LoRA."
    )

    def patch(self, model, lora_pair, criterion, style_bias, start_percent, end_percent, method="p-lora",
              k_lora_preset="s*"):
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) must not be after end_percent ({end_percent}).")
        if k_lora_preset not in KLORA_PRESETS:
            raise ValueError(f"k_lora_preset must be one of {sorted(KLORA_PRESETS)}, got {k_lora_preset!r}.")
        return (build_gated_model(model, lora_pair, criterion, style_bias, start_percent, end_percent, method,
                                  k_lora_preset),)
