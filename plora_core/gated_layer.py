"""A layer forward that runs the KL gate: the callable patched over `module.forward`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .deltas import LayerDelta
from .gate import gate_deltas, select_features
from .recorder import GateState


@dataclass(frozen=True)
class RowSlice:
    """Output channels [start, start + length) of a fused layer that the paper's model keeps apart.

    Flux fuses q, k and v (and, in single blocks, the MLP input) into one Linear, where the
    paper's diffusers Flux has separate layers; each slice gets its own softmax and decision.
    """

    name: str
    start: int
    length: int


class GatedForward:
    """F = original(x); F_hat_c = F + dW_c(x); F_hat_s = F + dW_s(x); pass on one (Eq. 9-13).

    `original_forward` is whatever the layer ran before (the host's own forward, with its
    weight casting, offloading and any merged LoRA patches), so those keep working.
    Outside the step window both deltas are added, as a direct merge would. A fused layer
    given `row_slices` is gated slice by slice, each slice recorded as `layer[name]`.
    """

    def __init__(self, layer: str, original_forward: Callable, subject: LayerDelta, style: LayerDelta,
                 state: GateState, criterion: str = "kl", style_bias: float = 1.0,
                 row_slices: tuple[RowSlice, ...] = ()):
        self.layer = layer
        self.original_forward = original_forward
        self.subject = subject
        self.style = style
        self.state = state
        self.criterion = criterion
        self.style_bias = style_bias
        self.channel_dim = subject.geometry.channel_dim
        self.row_slices = tuple(row_slices)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.original_forward(x, *args, **kwargs)
        subject_delta = self.subject(x)
        style_delta = self.style(x)
        if not self.state.active:
            return base + subject_delta + style_delta
        if not self.row_slices:
            out, subject_mask = self._gate(base, subject_delta, style_delta)
            self.state.record(self.layer, subject_mask)
            return out
        out = torch.empty_like(base)
        for piece in self.row_slices:
            def rows(t, piece=piece):
                return t.narrow(self.channel_dim, piece.start, piece.length)
            gated, subject_mask = self._gate(rows(base), rows(subject_delta), rows(style_delta))
            rows(out).copy_(gated)
            self.state.record(f"{self.layer}[{piece.name}]", subject_mask)
        return out

    def _gate(self, base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor):
        """Eq. 11-13 on one layer (or slice). Under autograd (exact score guidance) the discrete
        decision is made on detached tensors, so the divergences build no graph; only the chosen
        output carries gradients."""
        if not (torch.is_grad_enabled() and (base.requires_grad or subject_delta.requires_grad
                                             or style_delta.requires_grad)):
            return gate_deltas(base, subject_delta, style_delta, self.criterion, self.style_bias, self.channel_dim)
        with torch.no_grad():
            _, subject_mask = gate_deltas(base.detach(), subject_delta.detach(), style_delta.detach(),
                                          self.criterion, self.style_bias, self.channel_dim)
        return select_features(subject_delta, style_delta, subject_mask) + base, subject_mask

    def __repr__(self) -> str:
        return f"GatedForward({self.layer}, criterion={self.criterion})"
