"""PosteriorMetricGuidanceSampler: KSampler plus CLIP/DINO score guidance (paper Eq. 14-20), one node.

The same guided model as PLoRAMetricGuidance, with the run configured explicitly from the
node's own sampler, scheduler, steps and cfg (no OUTER_SAMPLE wrapper needed). Inputs and widget order are those of saved workflows: do not reorder.
"""

from __future__ import annotations

import logging

from ..glue import host
from ..glue.guidance import install_guidance
from ..glue.guidance_widgets import GuidanceWidgets, guidance_inputs
from ..glue.model_kind import check_image_latent

logger = logging.getLogger("plora")


class PosteriorMetricGuidanceSampler:
    @classmethod
    def INPUT_TYPES(cls):
        required, optional = guidance_inputs("0 samples exactly like KSampler.")
        return {"required": {**host.ksampler_inputs(), **required}, "optional": optional}

    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("LATENT", "guidance_log")
    OUTPUT_TOOLTIPS = ("The denoised latent, as from KSampler.",
                       "Per guided step: sigma, the score R (lower is better) and its three similarity terms.")
    FUNCTION = "sample"
    CATEGORY = "P-LoRA"
    DESCRIPTION = (
        "P-LoRA posterior metric knowledge (paper Eq. 14-20): KSampler that, while denoising, decodes the "
        "predicted clean image, scores it with CLIP and DINO against the subject and style references, and "
        "steps along the gradient that raises the score. Works with every sampler and scheduler. "
        "P-LoRA Metric Guidance does the same as a MODEL patch for any sampler node."
    )

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               **widgets):
        guidance = GuidanceWidgets(**widgets)
        if guidance.guidance_scale == 0:
            return (host.run_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                      latent_image, denoise), "guidance_scale is 0: plain sampling")
        check_image_latent(model, latent_image["samples"], "P-LoRA Metric Guidance Sampler")
        guided, hooks = install_guidance(model, guidance.settings(model), at_run_time=False)
        sigmas = host.schedule_sigmas(model, steps, sampler_name, scheduler, denoise)
        with hooks.run(guided, sigmas, sampler_name, cfg) as run:
            latent = host.run_ksampler(guided, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                       latent_image, denoise)
        log = run.record.summary()
        logger.info("P-LoRA guidance:\n%s", log)
        return (latent, log)
