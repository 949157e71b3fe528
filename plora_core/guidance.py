"""Posterior metric knowledge: the guided step of Eq. 20 in a k-diffusion sampler's space.

The paper steps `x_{t-1} = x_{t-1}^ori - m * grad_{x_t} R(x0_hat)` (Eq. 20) in diffusers'
variance-preserving (VP) coordinates. ComfyUI samples eps models in variance-exploding
coordinates `x = x0 + sigma * n` (`x_VP = x / sqrt(1 + sigma^2)`), and flow models in
`x = sigma * n + (1 - sigma) * x0`, which need no rescaling. Guidance is applied by
correcting the denoised prediction inside the model call, so every sampler keeps its own
history and noise; the correction is calibrated so that with Euler the step is Eq. 20.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def step_scale(sigma: float, sigma_next: float, flow: bool) -> float:
    """c such that Eq. 20 moves x_next by -m * c * grad_x R in the sampler's coordinates.

    VP -> VE: grad_{x_VP} = sqrt(1 + s^2) grad_{x_VE}, and a VP shift at t-1 is scaled by
    sqrt(1 + s_next^2) in VE, so c = sqrt(1 + s_next^2) * sqrt(1 + s^2). Flow models: c = 1.
    """
    if flow:
        return 1.0
    return math.sqrt(1.0 + sigma_next**2) * math.sqrt(1.0 + sigma**2)


def denoised_correction(shift_next: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The change of the denoised prediction that moves an Euler step's x_next by `shift_next`.

    Euler: x_next = x + (s_next - s) * (x - D) / s, so D -> D + d moves x_next by d * (s - s_next) / s.
    """
    return shift_next * (sigma / (sigma - sigma_next))


def guided_denoised(denoised: torch.Tensor, grad: torch.Tensor, m: float, sigma: float, sigma_next: float,
                    flow: bool) -> torch.Tensor:
    """D' = D + correction for the Eq. 20 step -m * c * grad (grad in the sampler's coordinates)."""
    shift_next = grad * (-m * step_scale(sigma, sigma_next, flow))
    return denoised + denoised_correction(shift_next, sigma, sigma_next).to(denoised.dtype)


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


@dataclass(frozen=True)
class GuidanceWindow:
    """Which steps of a schedule are guided: a [start, end) fraction of the steps, every n-th."""

    sigmas: tuple[float, ...]  # the sampler's schedule, last entry the final sigma (often 0)
    start: float = 0.0
    end: float = 1.0
    every: int = 1

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def step_of(self, sigma: float) -> int | None:
        """Index i with sigmas[i] == sigma (relative tolerance), None for sigmas between steps."""
        for i, s in enumerate(self.sigmas[:-1]):
            if abs(s - sigma) <= 1e-4 * max(abs(s), 1e-8):
                return i
        return None

    def is_guided(self, step: int) -> bool:
        first = math.ceil(self.start * self.steps - 1e-9)
        return first <= step < self.end * self.steps - 1e-9 and (step - first) % max(self.every, 1) == 0

    def next_sigma(self, step: int) -> float:
        return self.sigmas[step + 1]
