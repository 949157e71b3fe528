"""Posterior metric knowledge: the guided step of Eq. 20 inside a k-diffusion sampler.

Eq. 20 steps `x_{t-1} = x_{t-1}^ori - m * grad_{x_t} R(x0_hat)` with m = 10. Its units are
those of the sampler the paper ran: the paper builds on K-LoRA's code base, whose SDXL
script runs diffusers' default SDXL pipeline, i.e. `EulerDiscreteScheduler` (50 steps, as
in the paper's Figure 5). That scheduler's latent is `x = x0 + sigma * n`, exactly the `x`
ComfyUI samples eps and v-prediction models in, and Flux's flow-matching scheduler uses
ComfyUI's `x = (1 - sigma) * x0 + sigma * n`. So by default (`SAMPLER_UNITS`) the gradient is
taken with respect to the sampler's own x and x_next moves by `-m * grad_x R`, with no
conversion. The variance-preserving (DDIM) reading, `x_VP = x / sqrt(1 + sigma^2)` at both
ends of the step, is kept as `VP_UNITS` for comparison; it is about 200x stronger at SDXL's
first sigma and changes nothing for flow models.

Guidance is applied by correcting the denoised prediction D of the call that starts a step,
so every sampler keeps its own history and noise. The correction is calibrated with the
first-order coefficient of D in that sampler's update (`update_coefficient`), so that x_next
moves by exactly `-m * c * grad` for Euler and the ancestral Euler samplers, and by the
closest first-order equivalent for the others (see `SAMPLERS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLER_UNITS = "sampler"
VP_UNITS = "variance-preserving"
UNITS = (SAMPLER_UNITS, VP_UNITS)


def unit_scale(units: str, sigma: float, sigma_next: float, flow: bool) -> float:
    """c such that Eq. 20 moves x_next by -m * c * grad_x R, grad in the sampler's x.

    SAMPLER_UNITS: c = 1 (the paper's Euler latent is the sampler's x).
    VP_UNITS (eps/v models): grad_{x_VP} = sqrt(1 + s^2) grad_x, and a shift of x_VP at t-1 is
    a shift of x scaled by sqrt(1 + s_next^2), so c = sqrt(1 + s_next^2) * sqrt(1 + s^2).
    Flow models are variance-preserving already: c = 1 either way.
    """
    if units not in UNITS:
        raise ValueError(f"guidance_units must be one of {UNITS}, got {units!r}.")
    if units == SAMPLER_UNITS or flow:
        return 1.0
    return math.sqrt(1.0 + sigma_next**2) * math.sqrt(1.0 + sigma**2)


def denoiser_jacobian(sigma: float, sigma_data: float = 1.0, flow: bool = False) -> float:
    """d x0_hat / d x of the optimal denoiser for data x0 ~ N(0, sigma_data^2 I): a scalar J(sigma).

    Fast mode has only grad_{x0_hat} R; Eq. 20 wants grad_x R = J^T grad_{x0_hat} R. For Gaussian
    data the optimal denoiser E[x0 | x] is linear, so J is that linear map:

    - eps, v-prediction, EDM (ComfyUI: x = x0 + sigma * n): Cov(x0, x) = sigma_data^2,
      Var(x) = sigma_data^2 + sigma^2, so J = sigma_data^2 / (sigma_data^2 + sigma^2) (Tweedie).
      The parametrisation only changes what the network outputs, not the optimal D.
    - flow / CONST (x = (1 - sigma) * x0 + sigma * n): Cov(x0, x) = (1 - sigma) * sigma_data^2,
      Var(x) = (1 - sigma)^2 * sigma_data^2 + sigma^2, so
      J = (1 - sigma) * sigma_data^2 / ((1 - sigma)^2 * sigma_data^2 + sigma^2).

    J -> 1 as sigma -> 0 (fast = exact at the end) and J -> 0 at pure noise. sigma_data is
    the model's own (ComfyUI's v-prediction/EDM sampling objects carry it; the latent
    formats are scaled to about unit variance, so 1.0 elsewhere).
    """
    var = sigma_data**2
    if flow:
        alpha = 1.0 - sigma
        denominator = alpha**2 * var + sigma**2
        return alpha * var / denominator if denominator > 0 else 1.0
    return var / (var + sigma**2)


# How the denoised prediction D of a step's first call enters that step's x_next.
EULER = "euler"              # x_next = x + (s_next - s) * (x - D) / s                 (any ODE solver, D constant)
ANCESTRAL = "ancestral"      # Euler to ComfyUI's sigma_down, then noise up to s_next
ANCESTRAL_RF = "ancestral_rf"  # as ANCESTRAL; flow models: ComfyUI's *_RF variant, times alpha_next / alpha_down
SDE = "sde"                  # data-prediction exponential integrator with eta (DPM-Solver++ SDE, SEEDS)
X0 = "x0"                    # x_next = alpha_next * D + (terms without D): CFG++ samplers, LCM

# Model calls a step makes at later schedule sigmas (ComfyUI's k_diffusion/sampling.py).
HEUN = "heun"          # one at sigmas[i + 1] unless that is 0
HEUNPP2 = "heunpp2"    # at sigmas[i + 1] and sigmas[i + 2] unless they are the last sigma


@dataclass(frozen=True)
class SamplerStep:
    """What the guidance needs to know about one of KSampler's samplers."""

    update: str = EULER
    lookahead: str = ""      # HEUN, HEUNPP2 or "" (no evaluation at a later schedule sigma)
    snr_offset: bool = False  # flow models: ComfyUI moves a first sigma of 1 to percent_to_sigma(1e-4)


# From ComfyUI's k_diffusion/sampling.py (v0.3.64; the names added since, exp_heun_2_x0* and
# cfgpp_ud10_ab, from the newest source). Unknown names get one Euler-like call per step.
# "Closest equivalent" entries are samplers whose D enters x_next through more than one
# coefficient (multistep history, second-stage evaluations); their first-order coefficient
# is used, and their later evaluations in the step see the moved point but no correction.
SAMPLERS: dict[str, SamplerStep] = {
    # exact: a single evaluation whose D enters x_next with this coefficient
    "euler": SamplerStep(EULER),
    "ddim": SamplerStep(EULER),  # KSampler's "ddim" is euler
    "euler_ancestral": SamplerStep(ANCESTRAL_RF),
    "euler_cfg_pp": SamplerStep(X0),
    "euler_ancestral_cfg_pp": SamplerStep(X0),
    "lcm": SamplerStep(X0),
    "ddpm": SamplerStep(ANCESTRAL),  # DDPM posterior mean = ancestral eta 1 (eps models)
    # closest equivalent: second evaluations at mid sigmas (not guided) or at later schedule sigmas
    "heun": SamplerStep(EULER, HEUN),
    "heunpp2": SamplerStep(EULER, HEUNPP2),
    "exp_heun_2_x0": SamplerStep(EULER, HEUN, snr_offset=True),  # seeds_2 with r = 1: 2nd call at sigmas[i + 1]
    "exp_heun_2_x0_sde": SamplerStep(SDE, HEUN, snr_offset=True),
    "dpm_2": SamplerStep(EULER),
    "dpm_2_ancestral": SamplerStep(ANCESTRAL_RF),
    "dpmpp_2s_ancestral": SamplerStep(ANCESTRAL_RF),
    "dpmpp_2s_ancestral_cfg_pp": SamplerStep(X0),
    "dpmpp_sde": SamplerStep(SDE, snr_offset=True),
    "dpmpp_sde_gpu": SamplerStep(SDE, snr_offset=True),
    "seeds_2": SamplerStep(SDE, snr_offset=True),
    "seeds_3": SamplerStep(SDE, snr_offset=True),
    # closest equivalent: multistep history (the guided D is reused by the next steps)
    "lms": SamplerStep(EULER),
    "dpmpp_2m": SamplerStep(EULER),
    "dpmpp_2m_cfg_pp": SamplerStep(X0),
    "dpmpp_2m_sde": SamplerStep(SDE, snr_offset=True),
    "dpmpp_2m_sde_gpu": SamplerStep(SDE, snr_offset=True),
    "dpmpp_2m_sde_heun": SamplerStep(SDE, snr_offset=True),
    "dpmpp_2m_sde_heun_gpu": SamplerStep(SDE, snr_offset=True),
    "dpmpp_3m_sde": SamplerStep(SDE, snr_offset=True),
    "dpmpp_3m_sde_gpu": SamplerStep(SDE, snr_offset=True),
    "ipndm": SamplerStep(EULER),
    "ipndm_v": SamplerStep(EULER),
    "deis": SamplerStep(EULER),
    "uni_pc": SamplerStep(EULER),
    "uni_pc_bh2": SamplerStep(EULER),
    "res_multistep": SamplerStep(EULER),
    "res_multistep_cfg_pp": SamplerStep(X0),
    "res_multistep_ancestral": SamplerStep(ANCESTRAL),  # get_ancestral_step even on flow models
    "res_multistep_ancestral_cfg_pp": SamplerStep(X0),
    "gradient_estimation": SamplerStep(EULER),
    "gradient_estimation_cfg_pp": SamplerStep(X0),
    "cfgpp_ud10_ab": SamplerStep(X0),  # newest ComfyUI: CFG++ with a denoised history
    "er_sde": SamplerStep(SDE, snr_offset=True),
    # sa_solver_pece evaluates twice at sigma_i (predicted, then corrected state): the first
    # call, the one its callback reports, is guided
    "sa_solver": SamplerStep(SDE, snr_offset=True),
    "sa_solver_pece": SamplerStep(SDE, snr_offset=True),
    # dpm_fast / dpm_adaptive pick their own sigmas: only calls that land on the schedule are guided
}


def sampler_step(name: str) -> SamplerStep:
    """The table entry for a sampler; unknown names are treated as one Euler-like call per step."""
    return SAMPLERS.get(name, SamplerStep())


def ancestral_sigma_down(sigma: float, sigma_next: float, eta: float = 1.0, flow: bool = False) -> float:
    """ComfyUI's sigma_down: `get_ancestral_step` (eps), `downstep_ratio` of the *_RF samplers (flow).

    KSampler runs them with eta = 1: sigma_down = s_next^2 / s in both cases.
    """
    if sigma_next <= 0:
        return 0.0
    if not eta:
        return sigma_next
    if flow:
        return sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
    sigma_up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    return math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))


def _half_log_snr_ratio(sigma: float, sigma_next: float, flow: bool) -> float:
    """exp(-h), h = lambda_next - lambda with lambda = log(alpha / sigma) (alpha = 1, or 1 - sigma for flow)."""
    alpha, alpha_next = (1.0 - sigma, 1.0 - sigma_next) if flow else (1.0, 1.0)
    if alpha <= 0:
        return 0.0
    return (sigma_next / alpha_next) / (sigma / alpha)


def update_coefficient(update: str, sigma: float, sigma_next: float, flow: bool, eta: float = 1.0) -> float:
    """d x_next / d D for the step's first call: how much x_next moves per unit change of D.

    EULER: 1 - s_next / s, for eps and flow models alike (for a constant D every consistent ODE
    solver takes this step, so heun, dpm_2 and the multistep solvers share it to first order).
    ANCESTRAL: 1 - s_down / s. ANCESTRAL_RF on flow models: (alpha_next / alpha_down) *
    (1 - s_down / s), alpha = 1 - sigma, as in ComfyUI's euler_ancestral_RF.
    SDE: alpha_next * (1 - exp(-h * (1 + eta))), which is 1 - (s_next / s)^2 for eps models at eta 1.
    X0: alpha_next (1, or 1 - s_next for flow models).
    """
    if sigma_next <= 0:
        return 1.0
    alpha_next = 1.0 - sigma_next if flow else 1.0
    if update == EULER:
        return 1.0 - sigma_next / sigma
    if update in (ANCESTRAL, ANCESTRAL_RF):
        rf = flow and update == ANCESTRAL_RF
        down = ancestral_sigma_down(sigma, sigma_next, eta, rf)
        ratio = alpha_next / (1.0 - down) if rf and eta > 0 else 1.0
        return ratio * (1.0 - down / sigma)
    if update == SDE:
        return alpha_next * (1.0 - _half_log_snr_ratio(sigma, sigma_next, flow) ** (1.0 + eta))
    if update == X0:
        return alpha_next
    raise ValueError(f"unknown sampler update {update!r}")


def guided_denoised(denoised: torch.Tensor, grad: torch.Tensor, m: float, scale: float,
                    coefficient: float) -> torch.Tensor:
    """D' = D + (-m * c * grad) / coefficient: the step moves x_next by -m * c * grad (Eq. 20)."""
    return denoised + (grad * (-m * scale / coefficient)).to(denoised.dtype)


def shrink_latent(latent: torch.Tensor, max_side: int | None) -> torch.Tensor:
    """Area-downsample a [B, C, H, W] latent so its shorter side is at most max_side (None: as is).

    The encoders look at 224-px images, so decoding x0_hat at, say, 256 px instead of 1024 px
    changes little in the score and cuts the decoder's cost (and its backward) by up to 16x.
    The gradient flows back through the downsampling to every latent pixel.
    """
    if not max_side or min(latent.shape[-2:]) <= max_side:
        return latent
    scale = max_side / min(latent.shape[-2:])
    size = [max(1, round(side * scale)) for side in latent.shape[-2:]]
    return torch.nn.functional.interpolate(latent, size=size, mode="area")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-8)


@dataclass(frozen=True)
class GuidanceWindow:
    """Which steps of a schedule are guided: a [start, end) fraction of the steps, every n-th."""

    sigmas: tuple[float, ...]  # the sampler's schedule, last entry the final sigma (often 0)
    start: float = 0.0
    end: float = 1.0
    every: int = 1
    first_sigma_alias: float | None = None  # where a sampler evaluates step 0 instead (flow SNR offset)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def steps_at(self, sigma: float) -> list[int]:
        """Every step i whose sigmas[i] is sigma (schedules may repeat a sigma)."""
        found = [i for i, s in enumerate(self.sigmas[:-1]) if _close(s, sigma)]
        if not found and self.first_sigma_alias is not None and _close(self.first_sigma_alias, sigma):
            found = [0]
        return found

    def step_of(self, sigma: float) -> int | None:
        """Index i with sigmas[i] == sigma (relative tolerance), None for sigmas between steps."""
        found = self.steps_at(sigma)
        return found[0] if found else None

    def is_guided(self, step: int) -> bool:
        first = math.ceil(self.start * self.steps - 1e-9)
        return first <= step < self.end * self.steps - 1e-9 and (step - first) % max(self.every, 1) == 0

    def next_sigma(self, step: int) -> float:
        return self.sigmas[step + 1]


def later_schedule_calls(lookahead: str, step: int, sigmas: tuple[float, ...]) -> tuple[int, ...]:
    """Schedule indices after `step` at which that step also evaluates the model (ComfyUI's source).

    heun and exp_heun_2_x0: the corrector at sigmas[i + 1], skipped when that is 0.
    heunpp2: sigmas[i + 1] unless it is the last sigma, and sigmas[i + 2] unless that is.
    """
    last = len(sigmas) - 1
    if lookahead == HEUN:
        return (step + 1,) if step + 1 <= last and sigmas[step + 1] != 0 else ()
    if lookahead == HEUNPP2:
        end = sigmas[-1]
        if step + 1 > last or sigmas[step + 1] == end:
            return ()
        if step + 2 > last or sigmas[step + 2] == end:
            return (step + 1,)
        return (step + 1, step + 2)
    return ()


class StepCounter:
    """Tells which model call starts each step: heun's corrector for step i lands on sigmas[i + 1]
    before step i + 1's own call there, so the step-start call at a sigma is not always the first."""

    def __init__(self, window: GuidanceWindow, sampler: SamplerStep | None = None):
        self.window = window
        self.sampler = sampler or SamplerStep()
        self._before = [0] * window.steps  # calls of earlier steps at sigmas[i], from the sampler's structure
        for j in range(window.steps):
            for k in later_schedule_calls(self.sampler.lookahead, j, window.sigmas):
                if k < window.steps:
                    self._before[k] += 1
        self._seen = [0] * window.steps

    def observe(self, sigma: float) -> int | None:
        """Count one model call at sigma; the step index if it is that step's starting call, else None."""
        for step in self.window.steps_at(sigma):
            if self._seen[step] <= self._before[step]:
                self._seen[step] += 1
                return step if self._seen[step] == self._before[step] + 1 else None
        return None
