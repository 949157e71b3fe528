"""Installing the guidance of `plora_core/guidance.py` into ComfyUI's sampling (paper Eq. 16-20).

`install_guidance` patches a clone of the MODEL with the methods of one `GuidanceHooks`, which
share one small state object (the run in progress):

- a `sampler_post_cfg_function`: on the model call that starts a guided step, after CFG
  combined the predictions, it decodes x0_hat, scores it with CLIP and DINO against the
  references (Eq. 19) and returns a corrected denoised prediction that moves the step's
  x_next by -m * grad_x R (Eq. 20). The sampler itself is untouched, so every sampler keeps
  its own history and noise;
- in exact mode, a model-call wrapper that keeps the graph of the guided steps' calls, so
  grad_x R through the denoiser costs one backward and no second forward;
- an OUTER_SAMPLE wrapper that sets up each run from what the sampler node
  actually runs: the sigma schedule (the guidance window), the k-diffusion sampler function
  (the per-sampler update coefficient of the core's SAMPLERS table), the guider's cfg, the
  model's sampling type, and a differentiable copy of the decoder for that run only.

PosteriorMetricGuidanceSampler, which runs KSampler's path itself, configures its run
explicitly instead (`GuidanceHooks.run`) from its own widgets.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from ..plora_core.guidance import (SAMPLER_UNITS, SAMPLERS, GuidanceWindow, SamplerStep, StepCounter,
                                   denoiser_jacobian, guided_denoised, sampler_step, shrink_latent, unit_scale,
                                   update_coefficient)
from ..plora_core.scores import ReferenceEmbeddings, metric_residual
from . import host
from .model_kind import check_image_latent
from .denoiser_gradient import call_model, enable_denoiser_backward, exact_gradient, normal_tensors, options_before
from .trainable_copy import copy_tensors_as_saved, frozen_normal_copy

logger = logging.getLogger("plora")

FAST = "fast"
EXACT = "exact"
WRAPPER_KEY = "plora_metric_guidance"


@dataclass(frozen=True)
class GuidanceSettings:
    """What the guidance nodes' widgets and inputs fix; the same for every run of the guided MODEL."""

    decoder_vae: object  # a ComfyUI VAE (or TAESD): its first_stage_model decodes x0_hat, copied per run
    clip_encoder: object
    dino_encoder: object | None
    refs: ReferenceEmbeddings
    weights: tuple[float, float, float]
    m: float
    mode: str = FAST
    start: float = 0.0
    end: float = 1.0
    every: int = 1
    decode_latent_side: int | None = None
    units: str = SAMPLER_UNITS


@dataclass
class GuidanceRecord:
    """What guidance did in one run: per guided step, sigma, the mean score R and its terms."""

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


@dataclass
class GuidanceRun:
    """Everything that belongs to one sampling run; made by the wrapper (or the sampler node) per run."""

    sampler_name: str
    sampler: SamplerStep
    eta: float
    window: GuidanceWindow
    flow: bool
    sigma_data: float
    cfg: float  # the guider's cfg, where the post-CFG args lack cond_scale
    decoder: torch.nn.Module
    counter: StepCounter
    record: GuidanceRecord = field(default_factory=GuidanceRecord)
    open_sigma: float | None = None  # the sampler's model call in progress, classified once
    open_step: int | None = None
    kept: list = field(default_factory=list)  # exact mode: (cond_or_uncond, input, output) of the open call
    busy: bool = False  # exact mode rebuilding: the model-call wrapper passes calls through


# ---------------------------------------------------------------- what a run is

# k-diffusion sampler functions whose name is not "sample_<SAMPLERS name>"
_FUNCTION_NAMES = {"sample_unipc": "uni_pc", "sample_unipc_bh2": "uni_pc_bh2", "dpm_fast_function": "dpm_fast",
                   "dpm_adaptive_function": "dpm_adaptive", "sample_euler_pp": "euler_cfg_pp",
                   "sample_lcm_upscale": "lcm"}
_SAMPLER_MODULES = ("comfy.k_diffusion.sampling", "comfy.extra_samplers.uni_pc", "comfy.samplers",
                    "comfy_extras.nodes_advanced_samplers")
_OWN_SIGMAS = ("dpm_fast", "dpm_adaptive")  # known, pick their own sigmas: only calls on the schedule are guided
_warned_functions: set[str] = set()


def sampler_name(sampler) -> str:
    """The SAMPLERS name of the k-diffusion function a KSAMPLER runs; Euler (warned once) when unknown."""
    function = getattr(sampler, "sampler_function", None)
    module, name = getattr(function, "__module__", None) or "", getattr(function, "__name__", None) or ""
    if module in _SAMPLER_MODULES:
        name = _FUNCTION_NAMES.get(name, name.removeprefix("sample_").removesuffix("_RF"))
        if name in SAMPLERS or name in _OWN_SIGMAS:
            return name
    label = f"{module}.{name}" if name else type(sampler).__name__
    if label not in _warned_functions:
        _warned_functions.add(label)
        logger.warning("P-LoRA guidance: unknown sampler function %s; its steps are calibrated as Euler's "
                       "(warned once).", label)
    return "euler"


def sampling_parameters(model, sigmas, name: str) -> tuple[bool, float, float | None]:
    """(flow model?, sigma_data, where the sampler evaluates step 0 if not at sigmas[0]) for the guidance."""
    model_sampling = model.get_model_object("model_sampling")
    flow = host.is_flow_model(model)
    sigma_data = float(getattr(model_sampling, "sigma_data", 1.0))
    alias = None
    if flow and sampler_step(name).snr_offset and len(sigmas) > 1 and float(sigmas[0]) >= 1.0:
        alias = float(model_sampling.percent_to_sigma(1e-4))  # ComfyUI's offset_first_sigma_for_snr
    return flow, sigma_data, alias


def differentiable_decoder(vae) -> torch.nn.Module:
    """A normal-tensor copy of a VAE's (or TAESD's) model for backward; the VAE itself is untouched."""
    return frozen_normal_copy(vae.first_stage_model, vae.device)


def start_run(settings: GuidanceSettings, model, sigmas, name: str, cfg: float, eta: float = 1.0) -> GuidanceRun:
    """A run of `model` over `sigmas` with KSampler's sampler `name`."""
    schedule = tuple(float(s) for s in torch.as_tensor(sigmas).detach().cpu().tolist())
    flow, sigma_data, alias = sampling_parameters(model, schedule, name)
    window = GuidanceWindow(schedule, settings.start, settings.end, settings.every, alias)
    step = sampler_step(name)
    return GuidanceRun(name, step, eta, window, flow, sigma_data, cfg, differentiable_decoder(settings.decoder_vae),
                       StepCounter(window, step))


def starts_guided_step(run: GuidanceRun, sigma: float) -> int | None:
    """The step index if the sampler's current model call starts a guided step, else None.

    Exact mode's wrapper asks at the call's first apply_model, the post-CFG hook at its end; the
    call is counted once (StepCounter), so heun's corrector at sigmas[i + 1] is not step i + 1.
    """
    if run.open_sigma != sigma:
        run.open_sigma = sigma
        run.open_step = run.counter.observe(sigma)
    step = run.open_step
    return step if step is not None and run.window.is_guided(step) else None


# ---------------------------------------------------------------- the score and its fast gradient

def score(settings: GuidanceSettings, run: GuidanceRun, x0_model_space: torch.Tensor, base_model):
    """R(x0_hat) per sample, Eq. 16-19, through the decoder (differentiable, no clamp)."""
    latent = shrink_latent(base_model.process_latent_out(x0_model_space), settings.decode_latent_side)
    decoder_dtype = next(run.decoder.parameters()).dtype
    pixels = run.decoder.decode(latent.to(decoder_dtype))  # [B, 3, H, W] in [-1, 1]
    images = (pixels.float() + 1.0) / 2.0
    return metric_residual(images, settings.clip_encoder, settings.dino_encoder, settings.refs, settings.weights)


def fast_gradient(settings, run, denoised: torch.Tensor, sigma: float, base_model):
    """J(sigma) * grad_{x0_hat} R: grad_x R for the optimal denoiser of Gaussian data (no denoiser backward)."""
    x0 = denoised.detach().clone().requires_grad_(True)
    residual, terms = score(settings, run, x0, base_model)
    (grad,) = torch.autograd.grad(residual.sum(), x0)
    return grad * denoiser_jacobian(sigma, run.sigma_data, run.flow), residual, terms


@dataclass
class HookState:
    """The one state the hooks of a guided MODEL share: the run in progress and what exact mode learned."""

    run: GuidanceRun | None = None
    copy_saved_tensors: bool = False  # set once the host's blocks turn out to modify saved tensors in place
    reuse_forward: bool = True  # exact mode keeps the sampler's own forward (False: always recompute)

    def saving(self):
        return copy_tensors_as_saved() if self.copy_saved_tensors else contextlib.nullcontext()

    def learn_inplace(self, error: RuntimeError) -> bool:
        """True (once) when backward failed because the host's blocks modify saved tensors in place."""
        if "inplace operation" not in str(error) or self.copy_saved_tensors:
            return False
        logger.info("P-LoRA exact guidance: the model modifies tensors in place; copying saved tensors.")
        self.copy_saved_tensors = True
        return True


# ---------------------------------------------------------------- the hooks, built together

NO_RUN = ("The P-LoRA guided MODEL was called outside a sampling run it knows: this sampler does not go through "
          "ComfyUI's sampler wrappers (CFGGuider.sample). Sample it with KSampler, KSamplerAdvanced or "
          "SamplerCustomAdvanced, or use P-LoRA Metric Guidance Sampler.")


class GuidanceHooks:
    """The guided MODEL's hooks: methods over one HookState, for one GuidanceSettings.

    `post_cfg` is the sampler_post_cfg_function; `model_call(previous)` (exact mode) makes the
    model_function_wrapper; `outer_sample` is the OUTER_SAMPLE wrapper that sets up each run;
    `run(...)` sets up a run explicitly (PosteriorMetricGuidanceSampler).
    """

    def __init__(self, settings: GuidanceSettings):
        self.settings = settings
        self.state = HookState()
        self.exact = settings.mode == EXACT

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options (and with them these bound methods) for some runs: every copy
        # must share this one state, as closures over it would
        return self

    def __copy__(self):
        return self

    @contextlib.contextmanager
    def active(self, run: GuidanceRun):
        previous, self.state.run = self.state.run, run
        try:
            yield run
        finally:
            self.state.run = previous

    @contextlib.contextmanager
    def run(self, model, sigmas, name: str, cfg: float, eta: float = 1.0):
        """An explicitly configured run of `model` over `sigmas` with KSampler's sampler `name`."""
        with self.active(start_run(self.settings, model, sigmas, name, cfg, eta)) as current:
            yield current

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        """WrappersMP.OUTER_SAMPLE: one run per sampler call; the guider is executor.class_obj."""
        guider = executor.class_obj
        check_image_latent(guider.model_patcher, noise, "P-LoRA Metric Guidance")
        name = sampler_name(sampler)
        eta = (getattr(sampler, "extra_options", None) or {}).get("eta", 1.0)
        current = start_run(self.settings, guider.model_patcher, sigmas, name, float(getattr(guider, "cfg", 1.0)),
                            float(eta) if isinstance(eta, (int, float)) else 1.0)
        with self.active(current):
            out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        log_run(current)
        return out

    def model_call(self, previous):
        """A model_function_wrapper that runs guided steps' calls with autograd (chains `previous`)."""
        state = self.state

        def plora_differentiable_call(apply_model, args):
            current = state.run
            if current is None or current.busy or not state.reuse_forward or \
                    starts_guided_step(current, float(args["timestep"].max())) is None:
                return call_model(previous, apply_model, args)
            with torch.inference_mode(False), torch.enable_grad(), state.saving():
                x_in = args["input"].detach().clone().requires_grad_(True)
                call_args = {**args, "input": x_in, "timestep": normal_tensors(args["timestep"]),
                             "c": normal_tensors(args["c"])}
                out = call_model(previous, apply_model, call_args)
            current.kept.append((list(args["cond_or_uncond"]), x_in, out))
            return out.detach()
        return plora_differentiable_call

    def post_cfg(self, args) -> torch.Tensor:
        """sampler_post_cfg_function: D -> D + correction for -m * c * grad R(decode(x0_hat))."""
        current = self.state.run
        if current is None:
            raise RuntimeError(NO_RUN)
        denoised = args["denoised"]
        sigma = float(args["sigma"].max())
        step = starts_guided_step(current, sigma)
        current.open_sigma = None  # the sampler's model call ends with this hook
        kept, current.kept = current.kept, []
        if step is None:
            return denoised
        with torch.inference_mode(False), torch.enable_grad():
            result = self._exact_gradient(current, args, kept, step) if self.exact else None
            if result is None:
                result = fast_gradient(self.settings, current, denoised, sigma, args["model"])
        grad, residual, terms = result
        return corrected(self.settings, current, step, sigma, denoised, grad, residual, terms)

    def _exact_gradient(self, current: GuidanceRun, args, kept, step: int):
        """grad_x R through the denoiser (Eq. 20 as written), or None (recorded, warned once) to use fast mode."""
        def score_of(x0):
            return score(self.settings, current, x0, args["model"])

        current.busy = True
        try:
            result = exact_gradient(self.state, args, options_before(args["model_options"], self.post_cfg),
                                    current.cfg, kept, score_of)
        finally:
            current.busy = False
        if result is None:
            if not current.record.fast_fallbacks:
                logger.warning("P-LoRA exact guidance: the sampler's prediction at step %d could not be rebuilt "
                               "with autograd (a stochastic or unsupported CFG function?); using the fast gradient "
                               "there (warned once per run).", step)
            current.record.fast_fallbacks += 1
        return result


def corrected(settings, run: GuidanceRun, step: int, sigma: float, denoised, grad, residual, terms) -> torch.Tensor:
    """The guided step's D' (Eq. 20), recorded; D itself where the step cannot or need not be steered."""
    if not torch.isfinite(grad).all():
        if not run.record.skipped_nan:
            logger.warning("P-LoRA guidance: the score's gradient has NaN/Inf at step %d; skipping that step "
                           "(warned once per run). Try fp32 encoders or a smaller guidance_scale.", step)
        run.record.skipped_nan += 1
        return denoised
    sigma_next = run.window.next_sigma(step)
    coefficient = update_coefficient(run.sampler.update, sigma, sigma_next, run.flow, run.eta)
    if coefficient <= 0:  # the step does not depend on D (a repeated sigma): nothing to steer
        return denoised
    run.record.rows.append((step, sigma, float(residual.detach().mean()),
                            {k: float(v.detach().mean()) for k, v in terms.items()}))
    scale = unit_scale(settings.units, sigma, sigma_next, run.flow)
    return guided_denoised(denoised, grad.to(denoised.dtype), settings.m, scale, coefficient)


def log_run(run: GuidanceRun) -> None:
    logger.info("P-LoRA guidance (%s, %d steps):\n%s", run.sampler_name, run.window.steps, run.record.summary())


def install_guidance(model, settings: GuidanceSettings, *, at_run_time: bool = True):
    """(a guided clone of `model`, its hooks). The MODEL received is not modified.

    at_run_time: each sampling run is set up by an OUTER_SAMPLE wrapper (any sampler node). False:
    the caller configures every run with `hooks.run(...)` (PosteriorMetricGuidanceSampler).
    """
    hooks = GuidanceHooks(settings)
    guided = model.clone()
    if at_run_time:
        host.add_outer_sample_wrapper(guided, WRAPPER_KEY, hooks.outer_sample)
    if hooks.exact:
        enable_denoiser_backward(guided)
        guided.set_model_unet_function_wrapper(hooks.model_call(guided.model_options.get("model_function_wrapper")))
    guided.set_model_sampler_post_cfg_function(hooks.post_cfg)
    return guided, hooks
