"""The guidance widgets both guidance nodes share, as one object (paper Eq. 14-20).

`guidance_inputs` declares them (tooltips are their documentation); `GuidanceWidgets(**widgets)`
takes exactly those names, so a node passes them on as `**widgets` and adding a widget means one
entry in `guidance_inputs` and one field here (a test keeps the two equal). `settings()` checks
them together and embeds the references once (Eq. 14-15). Single-input checks (numbers finite and
in range, COMBO values among the choices) run before the node, from INPUT_TYPES (input_checks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..plora_core.guidance import SAMPLER_UNITS, UNITS, VP_UNITS
from ..plora_core.image_preprocess import to_nchw
from ..plora_core.scores import embed_more_references, embed_references
from .encoders import ENCODER_TYPE
from .guidance import EXACT, FAST, GuidanceSettings
from .references import REFERENCES_TYPE


def guidance_inputs(zero_scale: str) -> tuple[dict, dict]:
    """(required, optional) inputs after the model/sampler ones, in the saved workflows' widget order (new
    inputs go last: saved links name input slots by position)."""
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
        "more_references": (REFERENCES_TYPE, {"tooltip": "References of the LoRAs added with Add LoRA to Set (P-LoRA Reference nodes): one image per added LoRA, rendered by it alone with its own prompt. The score of Eq. 19 is then taken over every reference, subjects' in the content term and styles' in the style terms."}),
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


@dataclass(frozen=True)
class GuidanceWidgets:
    """The values of `guidance_inputs`' widgets and inputs, by name (defaults: the optional inputs left out)."""

    vae: object
    subject_reference: object  # IMAGE [B, H, W, C]
    style_reference: object
    clip_encoder: object
    guidance_scale: float
    clip_subject_weight: float
    clip_style_weight: float
    dino_style_weight: float
    gradient_mode: str
    guidance_start: float
    guidance_end: float
    guide_every: int
    dino_encoder: object | None = None
    guidance_decoder: object | None = None
    guidance_decode_size: int = 0
    guidance_units: str = SAMPLER_UNITS
    more_references: object | None = None  # ReferenceImages (glue/references.py)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @property
    def weights(self) -> tuple[float, float, float]:
        """(w_CLIP subject, w_CLIP style, w_DINO style) of Eq. 19."""
        return self.clip_subject_weight, self.clip_style_weight, self.dino_style_weight

    def settings(self, model) -> GuidanceSettings:
        """The widgets checked together and turned into settings; the references embedded once (Eq. 14-15)."""
        if not any(self.weights):
            raise ValueError("All three score weights (clip_subject_weight, clip_style_weight, dino_style_weight) "
                             "are 0, so the score has nothing to measure and guidance would do nothing: set at least "
                             "one above 0, or set guidance_scale to 0 for plain sampling.")
        if self.dino_style_weight > 0 and self.dino_encoder is None:
            raise ValueError("dino_style_weight is above 0 but no DINO encoder is connected: connect Load P-LoRA "
                             "DINO Encoder to dino_encoder, or set dino_style_weight to 0.")
        if self.guidance_units not in UNITS:
            raise ValueError(f"guidance_units must be one of {', '.join(UNITS)}, got {self.guidance_units!r}.")
        if self.gradient_mode not in (FAST, EXACT):
            raise ValueError(f"gradient_mode must be '{FAST}' or '{EXACT}', got {self.gradient_mode!r}.")
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start}) must not be after guidance_end "
                             f"({self.guidance_end}).")
        decoder_vae = self.guidance_decoder if self.guidance_decoder is not None else self.vae
        check_decoder(model, decoder_vae, "guidance decoder" if self.guidance_decoder is not None else "VAE")
        dino = self.dino_encoder if self.dino_style_weight > 0 else None
        refs = embed_references(self.clip_encoder, dino, to_nchw(self.subject_reference),
                                to_nchw(self.style_reference))
        if self.more_references is not None and self.more_references.entries:
            more = [(role, weight, to_nchw(image)) for role, weight, image in self.more_references.entries]
            refs = replace(refs, more=embed_more_references(self.clip_encoder, dino, more))
        return GuidanceSettings(decoder_vae, self.clip_encoder, dino, refs, self.weights, self.guidance_scale,
                                self.gradient_mode, self.guidance_start, self.guidance_end, self.guide_every,
                                latent_side(decoder_vae, self.guidance_decode_size), self.guidance_units)
