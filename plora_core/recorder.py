"""Per-step state of one gated model and the record of its decisions.

The choice of Eq. 13 depends on the input, so it changes from step to step (paper
Figure 5). The recorder keeps, for the latest sampling run, (step, layer, sample) ->
subject | style, which is what a selection map draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUBJECT = "subject"
STYLE = "style"


@dataclass
class SelectionRecorder:
    """Decisions of the latest run: {(step, layer): [B] bool mask, True = subject}."""

    decisions: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    sigmas: dict[int, float] = field(default_factory=dict)
    cond_or_uncond: dict[int, list[int]] = field(default_factory=dict)

    def clear(self) -> None:
        self.decisions.clear()
        self.sigmas.clear()
        self.cond_or_uncond.clear()

    def record(self, step: int, layer: str, subject_mask: torch.Tensor) -> None:
        self.decisions[(step, layer)] = subject_mask.detach()

    def steps(self) -> list[int]:
        return sorted({step for step, _ in self.decisions})

    def layers(self) -> list[str]:
        return sorted({layer for _, layer in self.decisions})

    def choice(self, step: int, layer: str, sample: int) -> str:
        """SUBJECT or STYLE for one (step, layer, sample)."""
        return SUBJECT if bool(self.decisions[(step, layer)][sample]) else STYLE

    def subject_fraction(self) -> float:
        """Share of all recorded (step, layer, sample) decisions that took the subject."""
        if not self.decisions:
            return float("nan")
        masks = torch.cat([m.reshape(-1).float().cpu() for m in self.decisions.values()])
        return float(masks.mean())

    def as_matrix(self, sample: int = 0) -> tuple[list[int], list[str], torch.Tensor]:
        """(steps, layers, [steps, layers] float matrix, 1 = subject) for one sample; NaN where unseen."""
        steps, layers = self.steps(), self.layers()
        matrix = torch.full((len(steps), len(layers)), float("nan"))
        step_row = {s: i for i, s in enumerate(steps)}
        layer_col = {name: j for j, name in enumerate(layers)}
        for (step, layer), mask in self.decisions.items():
            if sample < mask.shape[0]:
                matrix[step_row[step], layer_col[layer]] = float(mask[sample])
        return steps, layers, matrix


@dataclass
class GateState:
    """Shared by every gated layer of one patched model; updated once per model call.

    `begin_model_call` is called with the current sigma before the network runs. A run
    starts when sigma rises (or at the first call); the step index counts the distinct
    sigmas of the run, or is looked up in the sampler's own schedule when it is known.
    The gate is active while sigma_low <= sigma <= sigma_high (the step window).
    """

    sigma_high: float = float("inf")
    sigma_low: float = 0.0
    recorder: SelectionRecorder = field(default_factory=SelectionRecorder)
    step: int = 0
    sigma: float | None = None
    active: bool = True

    def begin_model_call(self, sigma: float, sample_sigmas: torch.Tensor | None = None,
                         cond_or_uncond: list[int] | None = None) -> None:
        if self.sigma is None or sigma > self.sigma * (1 + 1e-6) + 1e-9:
            self.recorder.clear()
            self.step = 0
        elif sigma < self.sigma * (1 - 1e-6) - 1e-9:
            self.step += 1
        if sample_sigmas is not None and len(sample_sigmas) > 0:
            self.step = int((sample_sigmas.float().cpu() > sigma * (1 + 1e-5) + 1e-9).sum())
        self.sigma = sigma
        self.active = self.sigma_low <= sigma <= self.sigma_high
        self.recorder.sigmas[self.step] = sigma
        if cond_or_uncond is not None:
            self.recorder.cond_or_uncond[self.step] = list(cond_or_uncond)

    def record(self, layer: str, subject_mask: torch.Tensor) -> None:
        self.recorder.record(self.step, layer, subject_mask)
