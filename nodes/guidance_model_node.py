"""PLoRAMetricGuidance: MODEL -> a MODEL that samples with CLIP/DINO score guidance (paper Eq. 14-20).

The guided MODEL works with any sampler node (KSampler, KSamplerAdvanced, SamplerCustomAdvanced
with any guider, other packs' samplers that go through ComfyUI's guider): each run's sigmas,
sampler and cfg are read when it starts (nodes/guidance.py). The widgets, their checks and the
reference embedding are shared with PosteriorMetricGuidanceSampler.
"""

from __future__ import annotations

from ..plora_core.guidance import SAMPLER_UNITS, UNITS, VP_UNITS
from ..plora_core.image_preprocess import to_nchw
from ..plora_core.scores import embed_references
from .encoder_nodes import ENCODER_TYPE
from .guidance import EXACT, FAST, GuidanceSettings, install_guidance


def guidance_inputs(zero_scale: str) -> tuple[dict, dict]:
    """(required, optional) inputs after the model/sampler ones, in the saved workflows' widget order."""
    required = {
        "vae": ("VAE", {"tooltip": "The checkpoint's VAE: decodes the predicted clean image for scoring (unless a guidance_decoder is connected)."}),
        "subject_reference": ("IMAGE", {"tooltip": "Reference image(s) of the subject, e.g. rendered by the subject LoRA alone with the subject prompt (Eq. 14). One image serves the whole batch."}),
        "style_reference": ("IMAGE", {"tooltip": "Reference image(s) of the style, e.g. rendered by the style LoRA alone with the style prompt (Eq. 15)."}),
        "clip_encoder": (ENCODER_TYPE, {"tooltip": "A CLIP image encoder (Load P-LoRA CLIP Encoder)."}),
        "guidance_scale": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip": f"m of Eq. 20 (paper: 10): each guided step moves the latent by -m * grad R, the gradient taken with respect to the sampler's own latent x, as in the paper's Euler sampler (see guidance_units). {zero_scale}"}),
        "clip_subject_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "Weight of S_CLIP(subject reference) in the score (Eq. 16, 19)."}),
        "clip_style_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "Weight of S_CLIP(style reference) in the score (Eq. 17, 19)."}),
        "dino_style_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "Weight of S_DINO(style reference) in the score (Eq. 18, 19); 0 needs no DINO encoder."}),
        "gradient_mode": ([FAST, EXACT], {"default": FAST, "tooltip": "exact: the gradient through the denoiser, as Eq. 20 is written (one more backward through the diffusion model per guided step). fast: the gradient w.r.t. the predicted clean image (decoder + encoders only) times d x0_hat / d x_t of the optimal denoiser for Gaussian data, so both modes take steps of about the same size at the same guidance_scale."}),
        "guidance_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "First guided step, as a fraction of the steps the sampler runs."}),
        "guidance_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Guidance stops at this fraction of the steps the sampler runs."}),
        "guide_every": ("INT", {"default": 1, "min": 1, "max": 100, "tooltip": "Guide every n-th step inside the window (1 = every step)."}),
    }
    optional = {
        "dino_encoder": (ENCODER_TYPE, {"tooltip": "A DINO image encoder (Load P-LoRA DINO Encoder); needed when dino_style_weight > 0."}),
        "guidance_decoder": ("VAE", {"tooltip": "Optional cheap decoder for guidance only, e.g. TAESD (Load VAE -> taesd / taesdxl / taef1). The final image still uses your VAE."}),
        "guidance_decode_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": "Decode the predicted image for scoring at most this many pixels on its shorter side (the encoders see 224 px). 0 = full resolution, as the paper; 256 makes guidance with the full VAE several times cheaper at 1024 px."}),
        "guidance_units": (list(UNITS), {"default": SAMPLER_UNITS, "advanced": True, "tooltip": f"Units of guidance_scale. {SAMPLER_UNITS}: the latent moves by -m * grad_x R in the sampler's own x (the paper's Euler sampler; no conversion). {VP_UNITS}: Eq. 20 read in DDIM's variance-preserving coordinates, i.e. scaled by sqrt(1 + sigma_next^2) * sqrt(1 + sigma^2) for eps/v models (about 200x stronger at SDXL's first step; no change for flow models). For comparison."}),
    }
    return required, optional


def check_decoder(model, vae, what: str) -> None:
    channels = model.model.latent_format.latent_channels
    vae_channels = getattr(vae, "latent_channels", channels)
    if vae_channels != channels:
        raise ValueError(f"The {what} decodes {vae_channels}-channel latents but the model makes {channels}-channel "
                         "latents; connect the VAE (or TAESD) that belongs to this checkpoint.")


def latent_side(vae, pixels: int) -> int | None:
    """The latent side that decodes to `pixels` (None for 0 = full resolution)."""
    if not pixels:
        return None
    ratio = getattr(vae, "downscale_ratio", 8)
    return max(1, -(-pixels // (ratio if isinstance(ratio, int) else 8)))


def guidance_settings(model, vae, subject_reference, style_reference, clip_encoder, guidance_scale,
                      clip_subject_weight, clip_style_weight, dino_style_weight, gradient_mode, guidance_start,
                      guidance_end, guide_every, dino_encoder=None, guidance_decoder=None, guidance_decode_size=0,
                      guidance_units=SAMPLER_UNITS) -> GuidanceSettings:
    """The widgets checked and turned into settings; the references embedded once (Eq. 14-15)."""
    if clip_subject_weight == 0 and clip_style_weight == 0 and dino_style_weight == 0:
        raise ValueError("All three score weights (clip_subject_weight, clip_style_weight, dino_style_weight) are 0, "
                         "so the score has nothing to measure and guidance would do nothing: set at least one above "
                         "0, or set guidance_scale to 0 for plain sampling.")
    if dino_style_weight > 0 and dino_encoder is None:
        raise ValueError("dino_style_weight is above 0 but no DINO encoder is connected: connect Load P-LoRA "
                         "DINO Encoder to dino_encoder, or set dino_style_weight to 0.")
    if guidance_units not in UNITS:
        raise ValueError(f"guidance_units must be one of {', '.join(UNITS)}, got {guidance_units!r}.")
    if gradient_mode not in (FAST, EXACT):
        raise ValueError(f"gradient_mode must be '{FAST}' or '{EXACT}', got {gradient_mode!r}.")
    if guidance_start > guidance_end:
        raise ValueError(f"guidance_start ({guidance_start}) must not be after guidance_end ({guidance_end}).")
    decoder_vae = guidance_decoder if guidance_decoder is not None else vae
    check_decoder(model, decoder_vae, "guidance decoder" if guidance_decoder is not None else "VAE")
    dino = dino_encoder if dino_style_weight > 0 else None
    refs = embed_references(clip_encoder, dino, to_nchw(subject_reference), to_nchw(style_reference))
    return GuidanceSettings(decoder_vae, clip_encoder, dino, refs, (clip_subject_weight, clip_style_weight,
                                                                    dino_style_weight), guidance_scale, gradient_mode,
                            guidance_start, guidance_end, guide_every, latent_side(decoder_vae, guidance_decode_size),
                            guidance_units)


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
        "sigmas and cfg are read from each run (ComfyUI with sampler wrappers; otherwise use P-LoRA Metric "
        "Guidance Sampler)."
    )

    def patch(self, model, vae, subject_reference, style_reference, clip_encoder, guidance_scale,
              clip_subject_weight, clip_style_weight, dino_style_weight, gradient_mode, guidance_start, guidance_end,
              guide_every, dino_encoder=None, guidance_decoder=None, guidance_decode_size=0,
              guidance_units=SAMPLER_UNITS):
        if guidance_scale == 0:
            return (model,)
        settings = guidance_settings(model, vae, subject_reference, style_reference, clip_encoder, guidance_scale,
                                     clip_subject_weight, clip_style_weight, dino_style_weight, gradient_mode,
                                     guidance_start, guidance_end, guide_every, dino_encoder, guidance_decoder,
                                     guidance_decode_size, guidance_units)
        guided, _ = install_guidance(model, settings)
        return (guided,)
