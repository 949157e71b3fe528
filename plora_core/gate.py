"""The posterior-feature-knowledge gate (paper section 4.1, Eq. 9-13), and one layer gated by it.

The functions are Eq. 11-13 on tensors. `LayerGate` holds one layer's LoRA deltas (two in the
paper: subject and style; any N >= 2 here) and decides, per call, which one the layer passes on;
the rule that decides is pluggable (`DivergenceRule` is the paper's; other fusion rules give the
same interface), so every rule runs through one mechanism and is recorded the same way for the
selection map.

Over N LoRAs, Eq. 13 is an argmax: the output F + D_k of the first k maximising w_k d_k passes on,
where d_k is LoRA k's divergence (Eq. 11-12) and w_k its weight (1 for the paper's subject,
`style_bias` for its style). With two LoRAs and w = (1, style_bias) this is exactly
`d_c >= style_bias * d_s -> subject`.
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


def shift_divergences(base: torch.Tensor, deltas, criterion: str, channel_dim: int,
                      finish_device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """(d_1, ..., d_N) per sample, Eq. 11-12 for each of N LoRA deltas (the work on F shared)."""
    return tuple(get_shift_divergence(criterion)(base, tuple(deltas), channel_dim, finish_device=finish_device))


def weighted_choice(divergences, weights) -> torch.Tensor:
    """Eq. 13 over N LoRAs: per sample, the first k maximising w_k d_k; [B] int64.

    With two LoRAs and w = (1, style_bias): 0 (the subject) exactly where d_c >= style_bias * d_s.
    """
    best = divergences[0] * weights[0] if weights[0] != 1.0 else divergences[0]
    index = None
    last = len(divergences) - 1
    for k in range(1, last + 1):
        weighted = divergences[k] * weights[k]
        better = weighted > best
        index = better.long() if index is None else torch.where(better, k, index)
        if k < last:
            best = torch.where(better, weighted, best)
    return index


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
    return select_chosen((subject_out, style_out), pair_choice(subject_mask))


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
    return add_chosen(base, (subject_delta, style_delta), pair_choice(subject_mask))


def pair_choice(subject_mask: torch.Tensor) -> torch.Tensor:
    """The pair's subject mask as LoRA indices: 0 (subject) where True, 1 (style) elsewhere."""
    return (~subject_mask.bool()).long()


def select_chosen(outputs, choice: torch.Tensor) -> torch.Tensor:
    """Per sample b, outputs[choice[b]] (Eq. 13 over N LoRAs); differentiable in the chosen outputs."""
    shape = (-1, *([1] * (outputs[0].ndim - 1)))
    picked = outputs[-1]
    for k in range(len(outputs) - 2, -1, -1):
        picked = torch.where((choice == k).reshape(shape), outputs[k], picked)
    return picked


def add_chosen(base: torch.Tensor, deltas, choice: torch.Tensor) -> torch.Tensor:
    """F + D_choice[b] per sample b (Eq. 13 over N LoRAs), in one pass over F.

    On the CPU one add per sample (the choice is on the host anyway); elsewhere, and under
    autograd, a select on the device (no host sync)."""
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (base, *deltas))
    if differentiable or not base.is_cpu:  # torch.where: autograd, and no host sync on accelerators
        return select_chosen(deltas, choice).add_(base)
    out = torch.empty(base.shape, dtype=torch.result_type(base, deltas[0]), device=base.device)
    for sample, k in enumerate(choice.tolist()):
        torch.add(base[sample], deltas[k][sample], out=out[sample])
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
    """Decides, for one layer (or slice) and one model call, which LoRA each sample passes on."""

    def choose(self, layer: str, base: torch.Tensor, deltas, channel_dim: int,
               members: tuple[int, ...]) -> torch.Tensor:
        """[B] int64: per sample, the index (into `deltas`) of the LoRA whose output F + D_k is passed on.

        `members` are the positions of those LoRAs in the LoRA set (a rule may weigh them by it)."""
        ...


# Devices without float64 (Apple's MPS): the per-token float32 parts are computed there and only
# they (a few numbers per token) go to the CPU for the float64 finish; the decision is the same.
FLOAT64_LESS_DEVICES = frozenset({"mps"})
CPU = torch.device("cpu")
PAIR = (0, 1)  # the members of a subject/style pair


@dataclass(frozen=True)
class DivergenceRule:
    """The paper's rule, Eq. 11-13: the LoRA whose output distribution moved most from F wins.

    `criterion` is kl (the paper) or another of Table 4. `weights[m]` multiplies the divergence of
    the set's LoRA m (None: the paper's pair, (1, style_bias), and 1 for any further LoRA).
    """

    criterion: str = "kl"
    style_bias: float = 1.0
    weights: tuple[float, ...] | None = None
    step_independent = True  # the same tensors give the same decision at every step

    def weights_of(self, members: tuple[int, ...]) -> tuple[float, ...]:
        if self.weights is not None:
            return tuple(float(self.weights[m]) for m in members)
        return tuple(float(self.style_bias) if m == 1 else 1.0 for m in members)

    def choose(self, layer, base, deltas, channel_dim, members=PAIR):
        device = base.device
        finish_device = CPU if device.type in FLOAT64_LESS_DEVICES else None
        divergences = shift_divergences(base, deltas, self.criterion, channel_dim, finish_device)
        return weighted_choice(divergences, self.weights_of(members)).to(device)

    def __call__(self, layer, base, subject_delta, style_delta, channel_dim):
        """The pair form: [B] bool mask, True where the subject's F + D_c is passed on."""
        return self.choose(layer, base, (subject_delta, style_delta), channel_dim) == 0

    def fused(self, base, deltas, members, factors=None, x=None, hidden=None):
        """(F + D_chosen, [B] int32 choice, hidden) through the Triton kernels of `fused_gate`, or None where
        they do not apply. `deltas`: the stacked [N, ...] deltas (hidden None); or None with `factors` =
        (down [N R, in], up^T [N, R, C]) of plain LoRAs and `x` the layer's input, to form the deltas inside
        the kernels: the down projection there too (`gate_from_input`, two launches) where x's rows allow,
        else by F.linear here (`gate_factored`). `hidden` (x @ down^T, as returned for an earlier slice of
        the same output) skips the down projection; the hidden used is returned for the next slice."""
        criterion = self.criterion
        weights = self.weights_of(members)
        if factors is None:
            if not fused_gate.supports(base, deltas, -1, criterion):
                return None
            out, choice, _ = fused_gate.gate(base, deltas, criterion, weights)
            return out, choice, None
        down, up_t = factors
        if hidden is None:
            if fused_gate.supports_from_input(base, x, down, up_t, criterion):
                out, choice, _, hidden = fused_gate.gate_from_input_and_hidden(base, x, down, up_t, criterion,
                                                                               weights)
                return out, choice, hidden
            hidden = torch.nn.functional.linear(x, down)  # e.g. x's rows not flattenable: one GEMM first
        if not fused_gate.supports_factored(base, hidden, up_t, criterion):
            return None
        out, choice, _ = fused_gate.gate_factored(base, hidden, up_t, criterion, weights)
        return out, choice, hidden


class LayerGate:
    """F = original(x); F_hat_k = F + dW_k(x) for each LoRA k on the layer; pass one on (Eq. 9-13).

    `forward(original, x)` runs whatever the layer ran before as `original` (the host's own
    forward, with its weight casting, offloading and any merged LoRA patches), so those keep
    working. Outside the step window all deltas are added, as a direct merge would. A fused
    layer given `row_slices` is gated slice by slice, each slice recorded as `layer[name]`.
    The deltas are `subject, style` (the paper's pair) or `deltas=` (N of them); `members` are
    their positions in the LoRA set (default 0..N-1), recorded with each choice.
    All deltas come from one `DeltaStack` (one down-projection GEMM); on an accelerator with
    Triton the rule's `fused` (kernels of `fused_gate`) forms the deltas (for plain LoRAs the
    down projection too), decides and adds in two launches. A `static_input` layer
    (cross-attention k/v: its input is the text context) keeps its output and decisions per
    distinct input of the run (`GateState.static_inputs`) and, while the rule's decision does not
    depend on the step, reuses them at later steps (recording each step).
    """

    def __init__(self, layer: str, subject: LayerDelta | None = None, style: LayerDelta | None = None,
                 state: GateState | None = None, rule: SelectionRule | None = None,
                 row_slices: tuple[RowSlice, ...] = (), static_input: bool = False, *,
                 deltas=None, members: tuple[int, ...] | None = None):
        loras = tuple(deltas) if deltas is not None else (subject, style)
        if len(loras) < 2 or any(d is None for d in loras) or state is None:
            raise ValueError(f"LayerGate {layer}: needs a GateState and two or more LoRA deltas "
                             "(subject and style, or deltas=[...]).")
        self.layer = layer
        self.loras = loras
        self.subject, self.style = loras[0], loras[1]
        self.members = tuple(members) if members is not None else tuple(range(len(loras)))
        if len(self.members) != len(loras):
            raise ValueError(f"LayerGate {layer}: {len(loras)} deltas but {len(self.members)} members.")
        self.deltas = DeltaStack(loras)
        self.state = state
        self.rule = rule if rule is not None else DivergenceRule()
        self.channel_dim = loras[0].geometry.channel_dim
        self.row_slices = tuple(row_slices)
        self.static_input = static_input
        self._static: dict = {}  # (generation, input key) -> (output, [(name, choice)])
        self._rule_fuses = self.channel_dim == -1 and hasattr(self.rule, "fused")  # channels last, a fusable rule
        self._slice_factors: dict = {}  # (slice, device, dtype) -> up^T columns of the slice, contiguous

    def forward(self, original: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.state
        if not (state.active and (state.batch is None or x.shape[0] == state.batch)):
            # outside the window; or rows that are not the call's images (e.g. tokens flattened over
            # the batch): no per-image choice exists, every LoRA acts, as a direct merge
            return self.deltas.added_to(original(x, *args, **kwargs), x)
        key = self._static_key(x, args, kwargs) if self.static_input else None
        if key is not None and key in self._static:
            out, records = self._static[key]
            for name, choice in records:
                state.record(name, choice, self.members)
            return out.clone()
        base = original(x, *args, **kwargs)
        if torch.is_grad_enabled() and (x.requires_grad or base.requires_grad):
            out, records = self._gated(base, self.deltas(x), self._choose_detached)
        elif self._fusable(base):
            out, records = self._gated_fused(base, x)
        else:
            out, records = self._gated(base, self.deltas(x), self._choose)
        for name, choice in records:
            state.record(name, choice, self.members)
        if key is not None:  # a copy: the caller may modify what it is given in place
            self._static[key] = (out.clone(), records)
        return out

    def _slices(self):
        """(recorded name, slice or None) of each part of the output that decides on its own."""
        if not self.row_slices:
            return ((self.layer, None),)
        return tuple((f"{self.layer}[{piece.name}]", piece) for piece in self.row_slices)

    def _gated(self, base, deltas, choose):
        """Eq. 13 on every slice, the deltas materialised: (output, [(name, choice)])."""
        if not self.row_slices:
            choice = choose(self.layer, base, deltas)
            return add_chosen(base, deltas, choice), [(self.layer, choice)]
        out = torch.empty_like(base)
        dim = self.channel_dim
        records = []
        for name, piece in self._slices():
            rows = base.narrow(dim, piece.start, piece.length)
            piece_deltas = tuple(d.narrow(dim, piece.start, piece.length) for d in deltas)
            choice = choose(name, rows, piece_deltas)
            out.narrow(dim, piece.start, piece.length).copy_(add_chosen(rows, piece_deltas, choice))
            records.append((name, choice))
        return out, records

    def _choose(self, name, base, deltas):
        return self.rule.choose(name, base, deltas, self.channel_dim, self.members)

    def _choose_detached(self, name, base, deltas):
        """Under autograd (exact score guidance) the discrete decision is made on detached tensors, so the
        divergences build no graph; only the chosen output carries gradients."""
        with torch.no_grad():
            return self._choose(name, base.detach(), tuple(d.detach() for d in deltas))

    def _fusable(self, base: torch.Tensor) -> bool:
        return self._rule_fuses and fused_gate.fused_available(base)

    def _gated_fused(self, base, x):
        """Eq. 9-13 in the kernels of `fused_gate`: where the deltas are plain low-rank, formed there from x and
        the stacked factors, the down projection included (two launches; never written to memory); else read
        from the stacked deltas. Slices of a fused layer: the first computes the hidden x @ down^T in its
        kernels, the others reuse it (`gate_factored` on their columns of up^T)."""
        plain = self.deltas.plain
        if plain:
            down, up_t = self.deltas.kernel_factors(x.device, x.dtype)
        else:
            stacked = self.deltas(x, stacked=True)
        hidden = None
        records = []
        out = None
        for name, piece in self._slices():
            rows = base if piece is None else base.narrow(-1, piece.start, piece.length)
            if plain:
                up = up_t if piece is None else self._slice_up(up_t, piece)
                result = self.rule.fused(rows, None, self.members, (down, up), x, hidden)
                if result is not None:
                    hidden = result[2]
            else:
                result = self.rule.fused(rows, stacked if piece is None else
                                         stacked.narrow(-1, piece.start, piece.length), self.members)
            if result is None:  # a shape the kernels do not take: the eager gate, from materialised deltas
                return self._gated(base, self.deltas(x), self._choose)
            if piece is None:
                return result[0], [(name, result[1])]
            if out is None:
                out = torch.empty_like(base)
            out.narrow(-1, piece.start, piece.length).copy_(result[0])
            records.append((name, result[1]))
        return out, records

    def _slice_up(self, up_t: torch.Tensor, piece: RowSlice) -> torch.Tensor:
        key = (piece, up_t.device, up_t.dtype, up_t.data_ptr())
        if key not in self._slice_factors:
            self._slice_factors[key] = up_t[..., piece.start:piece.start + piece.length].contiguous()
        return self._slice_factors[key]

    def _static_key(self, x: torch.Tensor, args, kwargs):
        """The cache key of this call's result, or None where it must be computed (see the class)."""
        if not getattr(self.rule, "step_independent", False) or args or kwargs:
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        inputs = self.state.static_inputs
        if any(generation != inputs.generation for generation, _ in self._static):
            self._static.clear()  # a new run: drop the old run's outputs
        index = inputs.key(x)
        return None if index is None else (inputs.generation, index)

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
