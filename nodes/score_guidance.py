"""The score-guidance hook that runs inside ComfyUI's model call (paper Eq. 16-20).

It is installed as a `sampler_post_cfg_function`: on the model call that starts a guided
step, after CFG combines the predictions, it decodes x0_hat, scores it with CLIP and DINO
against the references (Eq. 19), and returns a corrected denoised prediction that moves the
step's x_next by -m * grad_x R (Eq. 20). Every sampler and scheduler keeps working because
the sampler itself is untouched. The exact mode's model-call wrapper and this hook share
one object, built by `ScoreGuidance.install`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..plora_core.guidance import (SAMPLER_UNITS, GuidanceWindow, StepCounter, denoiser_jacobian, guided_denoised,
                                   sampler_step, shrink_latent, unit_scale, update_coefficient)
from ..plora_core.scores import ReferenceEmbeddings, metric_residual
from .exact_gradient import DenoiserGradient, enable_denoiser_backward
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
    fast_fallbacks: int = 0

    def summary(self) -> str:
        lines = [f"step {step:3d}  sigma {sigma:8.4f}  R {r:.4f}  " + "  ".join(f"{k} {v:.4f}" for k, v in terms.items())
                 for step, sigma, r, terms in self.rows]
        if self.skipped_nan:
            lines.append(f"{self.skipped_nan} step(s) skipped: the score's gradient had NaN/Inf")
        if self.fast_fallbacks:
            lines.append(f"{self.fast_fallbacks} step(s) used the fast gradient: the sampler's prediction could not "
                         "be rebuilt with autograd")
        return "\n".join(lines) if lines else "no step was guided"


class ScoreGuidance:
    """sampler_post_cfg_function: D -> D + correction for -m * c * grad R(decode(x0_hat))."""

    is_plora_score_guidance = True  # exact mode rebuilds the post-CFG chain up to this hook

    def __init__(self, decoder: torch.nn.Module, clip_encoder, dino_encoder, refs: ReferenceEmbeddings,
                 weights: tuple[float, float, float], m: float, window: GuidanceWindow, mode: str, flow: bool,
                 cfg: float, decode_latent_side: int | None = None, *, units: str = SAMPLER_UNITS,
                 sampler: str = "euler", sigma_data: float = 1.0):
        self.decoder = decoder
        self.clip_encoder = clip_encoder
        self.dino_encoder = dino_encoder
        self.refs = refs
        self.weights = weights
        self.m = m
        self.window = window
        self.flow = flow
        self.units = units
        self.sigma_data = sigma_data
        self.sampler = sampler_step(sampler)
        self.decode_latent_side = decode_latent_side
        self.record = GuidanceRecord()
        self.counter = StepCounter(window, self.sampler)
        self._open_sigma: float | None = None  # the sampler's model call in progress, classified once
        self._open_step: int | None = None
        self.exact = DenoiserGradient(cfg, lambda sigma: self.starts_guided_step(sigma) is not None) \
            if mode == EXACT else None

    def __deepcopy__(self, memo):  # model_options are deep-copied by clones; share this object
        return self

    def install(self, model):
        """A clone of the MODEL with this hook (and, in exact mode, the differentiable model call)."""
        guided = model.clone()
        if self.exact is not None:
            enable_denoiser_backward(guided)
            previous = guided.model_options.get("model_function_wrapper")
            guided.set_model_unet_function_wrapper(self.exact.model_call_wrapper(previous))
        guided.set_model_sampler_post_cfg_function(self)
        return guided

    def starts_guided_step(self, sigma: float) -> int | None:
        """The step index if the sampler's current model call starts a guided step, else None.

        The exact mode's wrapper asks at the call's first apply_model, this hook at its end; the
        call is counted once (StepCounter), so heun's corrector at sigmas[i + 1] is not step i + 1.
        """
        if self._open_sigma != sigma:
            self._open_sigma = sigma
            self._open_step = self.counter.observe(sigma)
        step = self._open_step
        return step if step is not None and self.window.is_guided(step) else None

    def score(self, x0_model_space: torch.Tensor, base_model) -> tuple[torch.Tensor, dict]:
        """R(x0_hat) per sample, Eq. 16-19, through the decoder (differentiable, no clamp)."""
        latent = shrink_latent(base_model.process_latent_out(x0_model_space), self.decode_latent_side)
        decoder_dtype = next(self.decoder.parameters()).dtype
        pixels = self.decoder.decode(latent.to(decoder_dtype))  # [B, 3, H, W] in [-1, 1]
        images = (pixels.float() + 1.0) / 2.0
        return metric_residual(images, self.clip_encoder, self.dino_encoder, self.refs, self.weights)

    def fast_gradient(self, denoised: torch.Tensor, sigma: float, base_model):
        """J(sigma) * grad_{x0_hat} R: grad_x R for the optimal denoiser of Gaussian data (no denoiser backward)."""
        x0 = denoised.detach().clone().requires_grad_(True)
        residual, terms = self.score(x0, base_model)
        (grad,) = torch.autograd.grad(residual.sum(), x0)
        return grad * denoiser_jacobian(sigma, self.sigma_data, self.flow), residual, terms

    def __call__(self, args) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = float(args["sigma"].max())
        step = self.starts_guided_step(sigma)
        self._open_sigma = None  # the sampler's model call ends with this hook
        if step is None:
            if self.exact is not None:
                self.exact.discard()
            return denoised
        def score(x0):
            return self.score(x0, args["model"])

        with torch.inference_mode(False), torch.enable_grad():
            result = self.exact.gradient(args, score) if self.exact is not None else None
            if self.exact is not None and result is None:
                if not self.record.fast_fallbacks:
                    logger.warning("P-LoRA exact guidance: the sampler's prediction at step %d could not be rebuilt "
                                   "with autograd (a stochastic or unsupported CFG function?); using the fast "
                                   "gradient there (warned once).", step)
                self.record.fast_fallbacks += 1
            if result is None:
                result = self.fast_gradient(denoised, sigma, args["model"])
        grad, residual, terms = result
        if not torch.isfinite(grad).all():
            if not self.record.skipped_nan:
                logger.warning("P-LoRA guidance: the score's gradient has NaN/Inf at step %d; skipping that step "
                               "(warned once). Try fp32 encoders or a smaller guidance_scale.", step)
            self.record.skipped_nan += 1
            return denoised
        sigma_next = self.window.next_sigma(step)
        coefficient = update_coefficient(self.sampler.update, sigma, sigma_next, self.flow)
        if coefficient <= 0:  # the step does not depend on D (a repeated sigma): nothing to steer
            return denoised
        self.record.rows.append((step, sigma, float(residual.detach().mean()),
                                 {k: float(v.detach().mean()) for k, v in terms.items()}))
        scale = unit_scale(self.units, sigma, sigma_next, self.flow)
        return guided_denoised(denoised, grad.to(denoised.dtype), self.m, scale, coefficient)
