"""Per-step state of one gated model and the record of its decisions.

The choice of Eq. 13 depends on the input, so it changes from step to step (paper
Figure 5). The recorder keeps, for the latest sampling run, (step, layer, sample) -> the
LoRA passed on (subject | style for the paper's pair), which is what a selection map draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUBJECT = "subject"
STYLE = "style"
BOTH = "both"
BOTH_VALUE = 0.5  # a decision that passes both LoRAs on (direct merge); 1.0 = subject, 0.0 = style


COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes for the rows of a model call


BOTH_INDEX = -1.0  # in `choices`: every LoRA passed on (a direct merge); NaN: none (not gated there)


def _static_index(value: torch.Tensor) -> torch.Tensor:
    """A fixed rule's pair value (1 subject, 0 style, 0.5 both, NaN none) as a LoRA index of the pair."""
    value = value.float()
    index = torch.where(value == 1, 0.0, torch.where(value == 0, 1.0, value))
    return torch.where(value == BOTH_VALUE, BOTH_INDEX, index)


@dataclass
class SelectionRecorder:
    """Decisions of the latest run.

    A gate records, per (step, layer), the index of the LoRA each row of the model call passed on,
    with the positions of the layer's LoRAs in the set (`members`); a fixed rule records pair values
    (1 subject, 0 style, 0.5 both, NaN none). Nothing is converted while sampling (on an accelerator
    a conversion would be a kernel per layer); the views below are worked out when read:

    - `decisions[(step, layer)]`: [B] mask, True where a subject LoRA (`roles`) was passed on (the
      pair's subject mask), or a fixed rule's values;
    - `choices[(step, layer)]`: [B] float, the set index of the LoRA passed on (BOTH_INDEX: all of
      them, NaN: none);
    - `by_kind[(step, layer, kind)]`: the `decisions` of the rows of each kind (COND, UNCOND), so a
      step whose cond and uncond passes ran as separate calls is still complete.
    """

    roles: tuple[str, ...] = (SUBJECT, STYLE)  # role of each LoRA of the set, by index
    names: tuple[str, ...] = ()  # file name of each LoRA of the set (the selection map's legend)
    entries: dict = field(default_factory=dict)  # (step, layer) -> (tensor, members or None)
    kind_entries: dict = field(default_factory=dict)  # (step, layer, kind) -> (rows, members or None)
    layer_order: dict[str, None] = field(default_factory=dict)
    _views: dict = field(default_factory=dict, repr=False)

    def clear(self) -> None:
        self.entries.clear()
        self.kind_entries.clear()
        self.layer_order.clear()
        self._views.clear()

    def record(self, step: int, layer: str, choice: torch.Tensor,
               cond_or_uncond: list[int] | None = None, members: tuple[int, ...] | None = None) -> None:
        """`choice`: [B] LoRA indices into `members` (a gate), or a bool subject mask / pair values (members None)."""
        value = choice.detach()
        self.entries[(step, layer)] = (value, members)
        self.layer_order.setdefault(layer, None)
        if cond_or_uncond and value.shape[0] % len(cond_or_uncond) == 0:
            for kind, rows in zip(cond_or_uncond, value.chunk(len(cond_or_uncond))):
                self.kind_entries[(step, layer, kind)] = (rows, members)
        self._views.clear()

    def _index(self, value: torch.Tensor, members) -> torch.Tensor:
        """Set indices (float; BOTH_INDEX, NaN) of one record."""
        if members is None:
            return torch.where(value, 0.0, 1.0) if value.dtype == torch.bool else _static_index(value)
        return torch.tensor(members, dtype=torch.float32, device=value.device)[value.long()]

    def _mask(self, value: torch.Tensor, members) -> torch.Tensor:
        if members is None:
            return value
        subject = torch.tensor([self.roles[m] == SUBJECT if m < len(self.roles) else False for m in members],
                               device=value.device)
        return subject[value.long()]

    def _view(self, name: str, source: dict, convert) -> dict:
        if name not in self._views:
            self._views[name] = {key: convert(value, members) for key, (value, members) in source.items()}
        return self._views[name]

    @property
    def decisions(self) -> dict:
        return self._view("decisions", self.entries, self._mask)

    @property
    def by_kind(self) -> dict:
        return self._view("by_kind", self.kind_entries, self._mask)

    @property
    def choices(self) -> dict:
        return self._view("choices", self.entries, self._index)

    def kind_choices(self) -> dict:
        return self._view("kind_choices", self.kind_entries, self._index)

    def steps(self) -> list[int]:
        return sorted({step for step, _ in self.entries})

    def layers(self) -> list[str]:
        """Gated layers in the order the model ran them."""
        return list(self.layer_order)

    def choice(self, step: int, layer: str, sample: int) -> str:
        """SUBJECT, STYLE or BOTH for one (step, layer, sample) (the role of the LoRA passed on)."""
        value = float(self.decisions[(step, layer)][sample])
        return BOTH if value == BOTH_VALUE else SUBJECT if value else STYLE

    def subject_fraction(self) -> float:
        """Share of all recorded (step, layer, sample) decisions that took a subject LoRA."""
        if not self.entries:
            return float("nan")
        masks = torch.cat([m.reshape(-1).float().cpu() for m in self.decisions.values()])
        return float(masks.mean())

    def as_matrix(self, sample: int = 0, kind: int | None = None, by_lora: bool = False
                  ) -> tuple[list[int], list[str], torch.Tensor]:
        """(steps, layers, [steps, layers] matrix, NaN = not seen) for one image: 1 = subject (0 style, 0.5
        both), or with `by_lora` the set index of the LoRA passed on (BOTH_INDEX: all).

        With `kind` (COND or UNCOND), `sample` indexes the images of that pass; else the rows
        of the model call.
        """
        steps, layers = self.steps(), self.layers()
        matrix = torch.full((len(steps), len(layers)), float("nan"))
        step_row = {s: i for i, s in enumerate(steps)}
        layer_col = {name: j for j, name in enumerate(layers)}
        if kind is None:
            source = self.choices if by_lora else self.decisions
            entries = ((step, layer, mask) for (step, layer), mask in source.items())
        else:
            source = self.kind_choices() if by_lora else self.by_kind
            entries = ((step, layer, mask) for (step, layer, k), mask in source.items() if k == kind)
        for step, layer, mask in entries:
            if sample < mask.shape[0]:
                matrix[step_row[step], layer_col[layer]] = float(mask[sample])
        return steps, layers, matrix


class StaticInputs:
    """The distinct inputs, within one run, of layers whose input repeats from step to step.

    Cross-attention k/v projections see only the text context, the same at every step unless the
    conditioning changes (prompt scheduling, timestep ranges): their gate's decision and output
    then repeat too. `key(x)` names x's value exactly: the index of an equal input seen earlier in
    the run (`torch.equal`), or a new one. Within one model call the answer is remembered per
    tensor object (and its version counter), so the comparison runs once per call, not per layer
    (on an accelerator it is one host sync per model call). Inference tensors (ComfyUI samples in
    inference mode) have no version counter: there the object alone is trusted within one call
    (no model edits its text context in place mid-forward).
    """

    def __init__(self, kept: int = 8):
        self.generation = 0  # bumped when a run starts: keys of an older run mean nothing
        self.limit = kept
        self._inputs: list[torch.Tensor] = []
        self._call: dict[int, tuple[torch.Tensor, int | None, int]] = {}  # id -> (x, version, key)

    def clear(self) -> None:
        self.generation += 1
        self._inputs.clear()
        self._call.clear()

    def new_call(self) -> None:
        self._call.clear()

    def key(self, x: torch.Tensor) -> int | None:
        """The index of x's value among this run's inputs (None once `kept` distinct ones were seen)."""
        version = _version(x)
        seen = self._call.get(id(x))
        if seen is not None and seen[0] is x and seen[1] == version:
            return seen[2]
        key = next((i for i, kept in enumerate(self._inputs)
                    if kept.shape == x.shape and kept.dtype == x.dtype and kept.device == x.device
                    and torch.equal(kept, x)), None)
        if key is None:
            if len(self._inputs) >= self.limit:
                return None
            self._inputs.append(x.detach().clone())
            key = len(self._inputs) - 1
        self._call[id(x)] = (x, version, key)
        return key


def _version(x: torch.Tensor) -> int | None:
    """x's in-place version counter; None for inference tensors, which have none."""
    try:
        return x._version
    except RuntimeError:
        return None


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
    cond_or_uncond: list[int] | None = None
    sample_sigmas: tuple[float, ...] = ()  # the run's schedule when the sampler tells it
    batch: int | None = None  # rows of the current model call (each an image: cond or uncond)
    static_inputs: StaticInputs = field(default_factory=StaticInputs)

    def begin_model_call(self, sigma: float, sample_sigmas: torch.Tensor | None = None,
                         cond_or_uncond: list[int] | None = None, batch: int | None = None) -> None:
        if self.sigma is None or sigma > self.sigma * (1 + 1e-6) + 1e-9:
            self.recorder.clear()
            self.static_inputs.clear()
            self.step = 0
        elif sigma < self.sigma * (1 - 1e-6) - 1e-9:
            self.step += 1
        if sample_sigmas is not None and len(sample_sigmas) > 0:
            self.step = int((sample_sigmas.float().cpu() > sigma * (1 + 1e-5) + 1e-9).sum())
            self.sample_sigmas = tuple(float(s) for s in sample_sigmas)
        self.sigma = sigma
        self.active = self.sigma_low <= sigma <= self.sigma_high
        self.cond_or_uncond = None if cond_or_uncond is None else list(cond_or_uncond)
        self.batch = batch
        self.static_inputs.new_call()

    def record(self, layer: str, choice: torch.Tensor, members: tuple[int, ...] | None = None) -> None:
        """One layer's decision at this call: LoRA indices into `members` (a gate), or a fixed rule's values."""
        self.recorder.record(self.step, layer, choice, self.cond_or_uncond, members)
