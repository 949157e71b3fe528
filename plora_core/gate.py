"""The posterior-feature-knowledge gate (paper section 4.1, Eq. 9-13), and one layer gated by it.

The functions are Eq. 11-13 on tensors. `LayerGate` holds one layer's two LoRA deltas and
decides, per call, which one the layer passes on; the rule that decides is pluggable
(`DivergenceRule` is the paper's; other fusion rules give the same interface), so every
rule runs through one mechanism and is recorded the same way for the selection map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .deltas import LayerDelta
from .divergence import get_shift_divergence
from .recorder import GateState


def delta_divergences(base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor,
                      criterion: str, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_c, d_s) per sample, Eq. 11-12, from F and the two LoRA deltas (F_hat = F + D).

    F + D is never formed: each criterion works from F and D (see `divergence`), sharing the
    work on F (the softmax over channels) between the two LoRAs.
    """
    d_subject, d_style = get_shift_divergence(criterion)(base, (subject_delta, style_delta), channel_dim)
    return d_subject, d_style


def feature_divergences(base: torch.Tensor, subject_out: torch.Tensor, style_out: torch.Tensor,
                        criterion: str, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_c, d_s) per sample, Eq. 11-12, from materialised outputs F_hat_c and F_hat_s."""
    base32 = base.float()
    return delta_divergences(base32, subject_out.float() - base32, style_out.float() - base32, criterion,
                             channel_dim)


def choose_subject(d_subject: torch.Tensor, d_style: torch.Tensor, style_bias: float = 1.0) -> torch.Tensor:
    """Eq. 13 as a [B] bool mask: True where d_c >= style_bias * d_s (style_bias 1 = paper)."""
    return d_subject >= d_style * style_bias


def select_features(subject_out: torch.Tensor, style_out: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
    """F^{i+1} per sample: F_hat_c where the mask is True, else F_hat_s (Eq. 13)."""
    mask = subject_mask.reshape(-1, *([1] * (subject_out.ndim - 1)))
    return torch.where(mask, subject_out, style_out)


def gate_deltas(base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor, criterion: str = "kl",
                style_bias: float = 1.0, channel_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9-13 from F and the two LoRA deltas; the result of `gate(F, F + D_c, F + D_s)`.

    Only the chosen output is formed, in the model's dtype: F + D_c for samples that take the
    subject, else F + D_s. The deltas are read, never modified.
    """
    d_subject, d_style = delta_divergences(base, subject_delta, style_delta, criterion, channel_dim)
    subject_mask = choose_subject(d_subject, d_style, style_bias)
    return add_selected(base, subject_delta, style_delta, subject_mask), subject_mask


def add_selected(base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor,
                 subject_mask: torch.Tensor) -> torch.Tensor:
    """F + D_c for samples where the mask is True, else F + D_s (Eq. 13), in one pass over F."""
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (base, subject_delta, style_delta))
    if differentiable or not base.is_cpu:  # torch.where: autograd, and no host sync on accelerators
        return select_features(subject_delta, style_delta, subject_mask).add_(base)
    out = torch.empty(base.shape, dtype=torch.result_type(base, subject_delta), device=base.device)
    for sample, take_subject in enumerate(subject_mask.tolist()):
        torch.add(base[sample], (subject_delta if take_subject else style_delta)[sample], out=out[sample])
    return out


def gate(base: torch.Tensor, subject_out: torch.Tensor, style_out: torch.Tensor, criterion: str = "kl",
         style_bias: float = 1.0, channel_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11-13 for one layer: returns (selected output, [B] mask of samples that took the subject)."""
    d_subject, d_style = feature_divergences(base, subject_out, style_out, criterion, channel_dim)
    subject_mask = choose_subject(d_subject, d_style, style_bias)
    return select_features(subject_out, style_out, subject_mask), subject_mask


@dataclass(frozen=True)
class RowSlice:
    """Output channels [start, start + length) of a fused layer that the paper's model keeps apart.

    Flux fuses q, k and v (and, in single blocks, the MLP input) into one Linear, where the
    paper's diffusers Flux has separate layers; each slice gets its own softmax and decision.
    """

    name: str
    start: int
    length: int


class SelectionRule(Protocol):
    """Decides, for one layer (or slice) and one model call, which samples take the subject LoRA."""

    def __call__(self, layer: str, base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor,
                 channel_dim: int) -> torch.Tensor:
        """[B] bool mask, True = the subject's output F + D_c is passed on."""
        ...


# Devices without float64 (Apple's MPS): the divergences' per-token sums need it, so they are
# computed on the CPU from copies of the layer's outputs (slower; the decision is the same).
FLOAT64_LESS_DEVICES = frozenset({"mps"})


@dataclass(frozen=True)
class DivergenceRule:
    """The paper's rule, Eq. 11-13: the LoRA whose output distribution moved more from F wins.

    `criterion` is kl (the paper) or another of Table 4; `style_bias` multiplies d_s (1 = paper).
    """

    criterion: str = "kl"
    style_bias: float = 1.0

    def __call__(self, layer, base, subject_delta, style_delta, channel_dim):
        device = base.device
        if device.type in FLOAT64_LESS_DEVICES:  # the per-token float64 algebra runs on the CPU there
            base, subject_delta, style_delta = (t.detach().cpu() for t in (base, subject_delta, style_delta))
        d_subject, d_style = delta_divergences(base, subject_delta, style_delta, self.criterion, channel_dim)
        return choose_subject(d_subject, d_style, self.style_bias).to(device)


class LayerGate:
    """F = original(x); F_hat_c = F + dW_c(x); F_hat_s = F + dW_s(x); pass on one (Eq. 9-13).

    `forward(original, x)` runs whatever the layer ran before as `original` (the host's own
    forward, with its weight casting, offloading and any merged LoRA patches), so those keep
    working. Outside the step window both deltas are added, as a direct merge would. A fused
    layer given `row_slices` is gated slice by slice, each slice recorded as `layer[name]`.
    """

    def __init__(self, layer: str, subject: LayerDelta, style: LayerDelta, state: GateState,
                 rule: SelectionRule | None = None, row_slices: tuple[RowSlice, ...] = ()):
        self.layer = layer
        self.subject = subject
        self.style = style
        self.state = state
        self.rule = rule if rule is not None else DivergenceRule()
        self.channel_dim = subject.geometry.channel_dim
        self.row_slices = tuple(row_slices)

    def forward(self, original: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = original(x, *args, **kwargs)
        subject_delta = self.subject(x)
        style_delta = self.style(x)
        if not self.state.active or (self.state.batch is not None and x.shape[0] != self.state.batch):
            # outside the window; or rows that are not the call's images (e.g. tokens flattened over
            # the batch): no per-image choice exists, both LoRAs act, as a direct merge
            return base + subject_delta + style_delta
        if not self.row_slices:
            out, subject_mask = self._gate(self.layer, base, subject_delta, style_delta)
            self.state.record(self.layer, subject_mask)
            return out
        out = torch.empty_like(base)
        for piece in self.row_slices:
            def rows(t, piece=piece):
                return t.narrow(self.channel_dim, piece.start, piece.length)
            name = f"{self.layer}[{piece.name}]"
            gated, subject_mask = self._gate(name, rows(base), rows(subject_delta), rows(style_delta))
            rows(out).copy_(gated)
            self.state.record(name, subject_mask)
        return out

    def _gate(self, name: str, base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor):
        """Eq. 13 on one layer (or slice). Under autograd (exact score guidance) the discrete decision
        is made on detached tensors, so the divergences build no graph; only the chosen output
        carries gradients."""
        if not (torch.is_grad_enabled() and (base.requires_grad or subject_delta.requires_grad
                                             or style_delta.requires_grad)):
            subject_mask = self.rule(name, base, subject_delta, style_delta, self.channel_dim)
            return add_selected(base, subject_delta, style_delta, subject_mask), subject_mask
        with torch.no_grad():
            subject_mask = self.rule(name, base.detach(), subject_delta.detach(), style_delta.detach(),
                                     self.channel_dim)
        return select_features(subject_delta, style_delta, subject_mask) + base, subject_mask

    def bind(self, original: Callable) -> "GatedForward":
        """The callable that replaces the layer's `forward` around `original`."""
        return GatedForward(self, original)

    def __repr__(self) -> str:
        return f"LayerGate({self.layer}, {self.rule})"


class GatedForward:
    """A LayerGate bound to the forward it wraps: what is set as `module.forward`."""

    def __init__(self, gate: LayerGate, original: Callable):
        self.gate = gate
        self.original = original

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.gate.forward(self.original, x, *args, **kwargs)

    def __repr__(self) -> str:
        return f"GatedForward({self.gate.layer})"
