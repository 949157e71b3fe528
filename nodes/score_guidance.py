"""The score-guidance hook that runs inside ComfyUI's model call (paper Eq. 16-20).

It is installed as a `sampler_post_cfg_function`: after CFG combines the predictions, it
decodes x0_hat, scores it with CLIP and DINO against the references (Eq. 19), and returns
a corrected denoised prediction whose Euler step equals Eq. 20. Every sampler and
scheduler keeps working because the sampler itself is untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..plora_core.guidance import GuidanceWindow, guided_denoised, shrink_latent
from ..plora_core.scores import ReferenceEmbeddings, metric_residual
from .exact_gradient import DenoiserGradient
from .trainable_copy import frozen_normal_copy

logger = logging.getLogger("plora")

FAST = "fast"
EXACT = "exact"


def differentiable_decoder(vae) -> torch.nn.Module:
    """A normal-tensor copy of a VAE's (or TAESD's) model for backward; the VAE itself is untouched."""
    return frozen_normal_copy(vae.first_stage_model, vae.device)


@dataclass
class GuidanceRecord:
    """What guidance did: per guided step, sigma, the mean score R and its terms."""

    rows: list[tuple[int, float, float, dict[str, float]]] = field(default_factory=list)
    skipped_nan: int = 0

    def summary(self) -> str:
        lines = [f"step {step:3d}  sigma {sigma:8.4f}  R {r:.4f}  " + "  ".join(f"{k} {v:.4f}" for k, v in terms.items())
                 for step, sigma, r, terms in self.rows]
        if self.skipped_nan:
            lines.append(f"{self.skipped_nan} step(s) skipped: the score's gradient had NaN/Inf")
        return "\n".join(lines) if lines else "no step was guided"


class ScoreGuidance:
    """sampler_post_cfg_function: D -> D + correction for -m * c * grad R(decode(x0_hat))."""

    def __init__(self, decoder: torch.nn.Module, clip_encoder, dino_encoder, refs: ReferenceEmbeddings,
                 weights: tuple[float, float, float], m: float, window: GuidanceWindow, mode: str, flow: bool,
                 cfg: float, decode_latent_side: int | None = None):
        self.decoder = decoder
        self.clip_encoder = clip_encoder
        self.dino_encoder = dino_encoder
        self.refs = refs
        self.weights = weights
        self.m = m
        self.window = window
        self.flow = flow
        self.decode_latent_side = decode_latent_side
        self.record = GuidanceRecord()
        self.exact = DenoiserGradient(cfg, self.is_guided_sigma) if mode == EXACT else None

    def __deepcopy__(self, memo):  # model_options are deep-copied by clones; share this object
        return self

    def is_guided_sigma(self, sigma: float) -> bool:
        step = self.window.step_of(sigma)
        return step is not None and self.window.is_guided(step)

    def score(self, x0_model_space: torch.Tensor, base_model) -> tuple[torch.Tensor, dict]:
        """R(x0_hat) per sample, Eq. 16-19, through the decoder (differentiable, no clamp)."""
        latent = shrink_latent(base_model.process_latent_out(x0_model_space), self.decode_latent_side)
        decoder_dtype = next(self.decoder.parameters()).dtype
        pixels = self.decoder.decode(latent.to(decoder_dtype))  # [B, 3, H, W] in [-1, 1]
        images = (pixels.float() + 1.0) / 2.0
        return metric_residual(images, self.clip_encoder, self.dino_encoder, self.refs, self.weights)

    def __call__(self, args) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = float(args["sigma"].max())
        step = self.window.step_of(sigma)
        if step is None or not self.window.is_guided(step):
            return denoised
        with torch.inference_mode(False), torch.enable_grad():
            if self.exact is not None:
                grad, residual, terms = self.exact.gradient(args, lambda x0: self.score(x0, args["model"]))
            else:
                x0 = denoised.detach().clone().requires_grad_(True)
                residual, terms = self.score(x0, args["model"])
                (grad,) = torch.autograd.grad(residual.sum(), x0)
        if not torch.isfinite(grad).all():
            if not self.record.skipped_nan:
                logger.warning("P-LoRA guidance: the score's gradient has NaN/Inf at step %d; skipping that step "
                               "(warned once). Try fp32 encoders or a smaller guidance_scale.", step)
            self.record.skipped_nan += 1
            return denoised
        self.record.rows.append((step, sigma, float(residual.detach().mean()),
                                 {k: float(v.detach().mean()) for k, v in terms.items()}))
        return guided_denoised(denoised, grad.to(denoised.dtype), self.m, sigma, self.window.next_sigma(step),
                               self.flow)
