"""PLoRAMetricGuidance: MODEL -> a MODEL that samples with CLIP/DINO score guidance (paper Eq. 14-20).

The guided MODEL works with any sampler node (KSampler, KSamplerAdvanced, SamplerCustomAdvanced
with any guider, other packs' samplers that go through ComfyUI's guider): each run's sigmas,
sampler and cfg are read when it starts (glue/guidance.py). The widgets, their checks and the
reference embedding are shared with PosteriorMetricGuidanceSampler.
"""

from __future__ import annotations

from ..glue.guidance import install_guidance
from ..glue.guidance_widgets import GuidanceWidgets, guidance_inputs


class PLoRAMetricGuidance:
    @classmethod
    def INPUT_TYPES(cls):
        required, optional = guidance_inputs("0 returns the MODEL unchanged.")
        model = {"model": ("MODEL", {"tooltip": "The model to guide (e.g. from P-LoRA Model Patcher)."})}
        return {"required": {**model, **required}, "optional": optional}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with score guidance: sample it with KSampler, KSamplerAdvanced or "
                       "SamplerCustomAdvanced (any guider). Each run logs its guided steps and scores.",)
    FUNCTION = "patch"
    CATEGORY = "P-LoRA"
    DESCRIPTION = (
        "P-LoRA posterior metric knowledge (paper Eq. 14-20) as a MODEL patch: while any sampler node denoises "
        "with this model, the predicted clean image is decoded, scored with CLIP and DINO against the subject and "
        "style references, and each guided step moves along the gradient that raises the score. The sampler, "
        "sigmas and cfg are read from each run."
    )

    def patch(self, model, **widgets):
        guidance = GuidanceWidgets(**widgets)
        if guidance.guidance_scale == 0:
            return (model,)
        guided, _ = install_guidance(model, guidance.settings(model))
        return (guided,)
