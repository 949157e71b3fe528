"""A layer forward that runs the KL gate: the callable patched over `module.forward`."""

from __future__ import annotations

from typing import Callable

import torch

from .deltas import LayerDelta
from .gate import gate_deltas
from .recorder import GateState


class GatedForward:
    """F = original(x); F_hat_c = F + dW_c(x); F_hat_s = F + dW_s(x); pass on one (Eq. 9-13).

    `original_forward` is whatever the layer ran before (the host's own forward, with its
    weight casting, offloading and any merged LoRA patches), so those keep working.
    Outside the step window both deltas are added, as a direct merge would.
    """

    def __init__(self, layer: str, original_forward: Callable, subject: LayerDelta, style: LayerDelta,
                 state: GateState, criterion: str = "kl", style_bias: float = 1.0):
        self.layer = layer
        self.original_forward = original_forward
        self.subject = subject
        self.style = style
        self.state = state
        self.criterion = criterion
        self.style_bias = style_bias
        self.channel_dim = subject.geometry.channel_dim

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.original_forward(x, *args, **kwargs)
        subject_delta = self.subject(x)
        style_delta = self.style(x)
        if not self.state.active:
            return base + subject_delta + style_delta
        out, subject_mask = gate_deltas(base, subject_delta, style_delta, self.criterion, self.style_bias,
                                        self.channel_dim)
        self.state.record(self.layer, subject_mask)
        return out

    def __repr__(self) -> str:
        return f"GatedForward({self.layer}, criterion={self.criterion})"
