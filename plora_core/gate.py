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

from . import fused_gate
from .deltas import DeltaStack, LayerDelta
from .divergence import get_shift_divergence
from .recorder import GateState


def delta_divergences(base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor,
                      criterion: str, channel_dim: int,
                      finish_device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_c, d_s) per sample, Eq. 11-12, from F and the two LoRA deltas (F_hat = F + D).

    F + D is never formed: each criterion works from F and D (see `divergence`), sharing the
    work on F (the softmax over channels) between the two LoRAs. With `finish_device`, only the
    small per-token float32 parts go there for the float64 finish (devices without float64).
    """
    d_subject, d_style = get_shift_divergence(criterion)(base, (subject_delta, style_delta), channel_dim,
                                                         finish_device=finish_device)
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


# Devices without float64 (Apple's MPS): the per-token float32 parts are computed there and only
# they (a few numbers per token) go to the CPU for the float64 finish; the decision is the same.
FLOAT64_LESS_DEVICES = frozenset({"mps"})
CPU = torch.device("cpu")


@dataclass(frozen=True)
class DivergenceRule:
    """The paper's rule, Eq. 11-13: the LoRA whose output distribution moved more from F wins.

    `criterion` is kl (the paper) or another of Table 4; `style_bias` multiplies d_s (1 = paper).
    """

    criterion: str = "kl"
    style_bias: float = 1.0
    step_independent = True  # the same tensors give the same decision at every step

    def __call__(self, layer, base, subject_delta, style_delta, channel_dim):
        device = base.device
        finish_device = CPU if device.type in FLOAT64_LESS_DEVICES else None
        d_subject, d_style = delta_divergences(base, subject_delta, style_delta, self.criterion, channel_dim,
                                               finish_device)
        return choose_subject(d_subject, d_style, self.style_bias).to(device)

    def fused_gate(self, layer, base, deltas, channel_dim):
        """(F + D_chosen, [B] subject mask) through the Triton kernels, or None where they do not apply."""
        if not fused_gate.supports(base, deltas, channel_dim, self.criterion):
            return None
        out, subject_mask, _ = fused_gate.gate(base, deltas, self.criterion, self.style_bias)
        return out, subject_mask


class LayerGate:
    """F = original(x); F_hat_c = F + dW_c(x); F_hat_s = F + dW_s(x); pass on one (Eq. 9-13).

    `forward(original, x)` runs whatever the layer ran before as `original` (the host's own
    forward, with its weight casting, offloading and any merged LoRA patches), so those keep
    working. Outside the step window both deltas are added, as a direct merge would. A fused
    layer given `row_slices` is gated slice by slice, each slice recorded as `layer[name]`.
    Both deltas come from one `DeltaStack` (one down-projection GEMM); on an accelerator with
    Triton the rule's `fused_gate` (kernels of `fused_gate`) decides and adds in three launches.
    A `static_input` layer (cross-attention k/v: its input is the text context) keeps its output
    and decisions per distinct input of the run (`GateState.static_inputs`) and, while the rule's
    decision does not depend on the step, reuses them at later steps (still recording each step).
    """

    def __init__(self, layer: str, subject: LayerDelta, style: LayerDelta, state: GateState,
                 rule: SelectionRule | None = None, row_slices: tuple[RowSlice, ...] = (),
                 static_input: bool = False):
        self.layer = layer
        self.subject = subject
        self.style = style
        self.deltas = DeltaStack((subject, style))
        self.state = state
        self.rule = rule if rule is not None else DivergenceRule()
        self.channel_dim = subject.geometry.channel_dim
        self.row_slices = tuple(row_slices)
        self.static_input = static_input
        self._static: dict = {}  # (generation, input key) -> (output, [(name, mask)])

    def forward(self, original: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        gated = self.state.active and (self.state.batch is None or x.shape[0] == self.state.batch)
        key = self._static_key(x, args, kwargs) if gated else None
        if key is not None and key in self._static:
            out, records = self._static[key]
            for name, subject_mask in records:
                self.state.record(name, subject_mask)
            return out.clone()
        base = original(x, *args, **kwargs)
        differentiable = torch.is_grad_enabled() and (x.requires_grad or base.requires_grad)
        fused = (gated and not differentiable and self.channel_dim == -1 and hasattr(self.rule, "fused_gate")
                 and fused_gate.fused_available(base))
        deltas = self.deltas(x, stacked=fused)
        if not gated:
            # outside the window; or rows that are not the call's images (e.g. tokens flattened over
            # the batch): no per-image choice exists, both LoRAs act, as a direct merge
            return base + deltas[0] + deltas[1]
        records = []
        if not self.row_slices:
            out, subject_mask = self._gate(self.layer, base, deltas)
            records.append((self.layer, subject_mask))
        else:
            out = torch.empty_like(base)
            for piece in self.row_slices:
                def rows(t, piece=piece, dim=self.channel_dim):
                    return t.narrow(dim, piece.start, piece.length)
                name = f"{self.layer}[{piece.name}]"
                piece_deltas = (deltas.narrow(-1, piece.start, piece.length) if isinstance(deltas, torch.Tensor)
                                else tuple(rows(d) for d in deltas))
                gated_rows, subject_mask = self._gate(name, rows(base), piece_deltas)
                rows(out).copy_(gated_rows)
                records.append((name, subject_mask))
        for name, subject_mask in records:
            self.state.record(name, subject_mask)
        if key is not None:  # a copy: the caller may modify what it is given in place
            self._static[key] = (out.clone(), records)
        return out

    def _static_key(self, x: torch.Tensor, args, kwargs):
        """The cache key of this call's result, or None where it must be computed (see the class)."""
        if not (self.static_input and getattr(self.rule, "step_independent", False)) or args or kwargs:
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        inputs = self.state.static_inputs
        if any(generation != inputs.generation for generation, _ in self._static):
            self._static.clear()  # a new run: drop the old run's outputs
        index = inputs.key(x)
        return None if index is None else (inputs.generation, index)

    def _gate(self, name: str, base: torch.Tensor, deltas):
        """Eq. 13 on one layer (or slice). Under autograd (exact score guidance) the discrete decision
        is made on detached tensors, so the divergences build no graph; only the chosen output
        carries gradients."""
        subject_delta, style_delta = deltas[0], deltas[1]
        if not (torch.is_grad_enabled() and (base.requires_grad or subject_delta.requires_grad
                                             or style_delta.requires_grad)):
            if isinstance(deltas, torch.Tensor) and hasattr(self.rule, "fused_gate") \
                    and fused_gate.fused_available(base):
                result = self.rule.fused_gate(name, base, deltas, self.channel_dim)
                if result is not None:
                    return result
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
