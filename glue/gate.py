"""Install the gate in ComfyUI: the KL-gated clone of a MODEL behind PLoRAModelPatcher.

The gate's maths is `plora_core/gate.py`; this is its glue. Layers both LoRAs touch get a
`LayerGate`. A `GateInstaller`, added as a wrapper of every diffusion-model call, sets each
gate over its layer's `forward` on the model instance that actually runs, for the length of
the call, and puts the layers back afterwards (so the host's own forward, with casting,
offloading and other LoRAs' patches, still runs inside, and a model instance ComfyUI builds
later - hooks, multi-GPU, compile - is gated too: nothing captured when the node ran can go
stale). Layers only one LoRA touches get that LoRA through ComfyUI's own `add_patches`, exactly as a
direct merge would.

The same mechanism runs the paper's rivals for comparison (`method`): K-LoRA as another
selection rule of the LayerGates, direct merge and B-LoRA as fixed choices (no gate; the
installer only records them for the selection map).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
import weakref
from collections import OrderedDict

import torch

from ..plora_core.deltas import LayerGeometry, LayerMismatch
from ..plora_core.fusion_rules import (B_LORA_CONTENT_BLOCK, B_LORA_STYLE_BLOCK, KLoraRule, b_lora_routing,
                                       klora_layer_scores, schedule_position)
from ..plora_core.gate import DivergenceRule, LayerGate, RowSlice
from ..plora_core.lora_file import LoraFileError
from ..plora_core.recorder import BOTH_VALUE, STYLE, SUBJECT, GateState
from . import host
from .lora_mapping import map_lora_onto_model
from .memory_hooks import register_cache
from .lora_pair import (LoraChoice, LoraSet, check_merged_shapes, family_mismatch,  # noqa: F401
                        fused_row_slices, layer_delta, merge_patches)

logger = logging.getLogger("plora")


GATE_KEY = "plora_gate"
_NOT_SET = object()


class GateInstaller:
    """The gates of one patched model, installed around each model call (an APPLY_MODEL wrapper).

    On each call it tells the shared GateState the current sigma (which step of the run this is,
    and which rows are cond / uncond), then sets every gate over its layer's `forward` on the
    model instance the executor runs, and restores the layers when the call returns.
    """

    def __init__(self, gates: dict[str, LayerGate], state: GateState, static: dict[str, float] | None = None):
        self.gates = gates
        self.state = state
        self.static = dict(static or {})  # layer -> a fixed choice (1 subject, 0 style, 0.5 both, NaN none)
        self._depth = 0
        self._layers = weakref.WeakKeyDictionary()  # model instance -> (its diffusion_model, [(module, gate)])

    def __deepcopy__(self, memo):  # clones and model copies share the gates (and their caches)
        return self

    def begin_model_call(self, x: torch.Tensor, sigma: torch.Tensor, transformer_options: dict) -> None:
        self.state.begin_model_call(float(sigma.max()), transformer_options.get("sample_sigmas"),
                                    transformer_options.get("cond_or_uncond"), batch=int(x.shape[0]))
        for layer, value in self.static.items():  # a fixed rule decides the same at every call
            self.state.record(layer, torch.full((x.shape[0],), value))

    def __call__(self, executor, x, sigma, *args, **kwargs):
        options = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})
        self.begin_model_call(x, sigma, options or {})
        if self._depth:  # a model call inside a model call: the layers are gated already
            return executor(x, sigma, *args, **kwargs)
        installed = []
        self._depth += 1
        try:
            for module, gate in self._gated_modules(executor.class_obj):
                installed.append((module, module.__dict__.get("forward", _NOT_SET)))
                module.__dict__["forward"] = gate.bind(module.forward)  # what `module.forward = ...` stores
            return executor(x, sigma, *args, **kwargs)
        finally:
            self._depth -= 1
            for module, previous in reversed(installed):
                if previous is _NOT_SET:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = previous

    def _gated_modules(self, model) -> list:
        """[(module, gate)] of a model instance, looked up once per instance (not per call, per layer)."""
        known = self._layers.get(model)
        if known is None or known[0] is not model.diffusion_model:
            known = (model.diffusion_model, [(host.get_attr(model, path), gate) for path, gate in self.gates.items()])
            self._layers[model] = known
        return known[1]

    def install(self, model_patcher) -> None:
        """Put the gates on a clone: installed at run time, on each model call, by this APPLY_MODEL wrapper."""
        model_patcher.model_options.setdefault("transformer_options", {})[GATE_KEY] = self  # for the selection map
        host.add_model_call_wrapper(model_patcher, GATE_KEY, self)


METHODS = ("p-lora", "direct", "k-lora", "b-lora")
ROUTED_EXPERT = ".experts."  # MoE experts (HiDream) run on the tokens routed to them, flattened over the batch


class KLoraSelection:
    """K-LoRA's rule as a SelectionRule: one choice per layer and step, the same for every sample,
    with the step read from the run's own sigma schedule (any step count, any sampler)."""

    def __init__(self, rule: KLoraRule, state: GateState, model_sampling):
        self.rule = rule
        self.state = state
        self.model_sampling = model_sampling
        self._warned = False
        self._progress: tuple[tuple, tuple[float, int]] | None = None  # (model call, its progress)

    def progress(self) -> tuple[float, int]:
        """(position in steps, number of steps) of the current model call, worked out once per call."""
        call = (self.state.sigma, self.state.sample_sigmas)
        if self._progress is None or self._progress[0] != call:
            self._progress = (call, self._call_progress())
        return self._progress[1]

    def _call_progress(self) -> tuple[float, int]:
        schedule = self.state.sample_sigmas
        if len(schedule) > 1:
            return schedule_position(self.state.sigma, schedule), len(schedule) - 1
        # The host does not tell the run's schedule (the 2024 core): progress from the noise level,
        # as a fraction of the model's timesteps, in 1000 fine steps.
        if not self._warned:
            logger.warning("P-LoRA k-lora: this ComfyUI does not tell the sampler's sigma schedule; K-LoRA's "
                           "time is taken from the noise level instead (close to, not exactly, its step count).")
            self._warned = True
        timestep = float(self.model_sampling.timestep(torch.tensor([self.state.sigma])).reshape(-1)[0])
        return 1000.0 * (1.0 - min(max(timestep / 1000.0, 0.0), 1.0)), 1000

    def choose(self, layer, base, deltas, channel_dim, members=(0, 1)):
        """[B] LoRA index: 0 (the subject) for every sample where K-LoRA's rule takes the subject, else 1."""
        position, steps = self.progress()
        take_subject = self.rule.choose_subject(layer, position, steps)
        return torch.full((base.shape[0],), 0 if take_subject else 1, dtype=torch.int64, device=base.device)

    def __repr__(self) -> str:
        return repr(self.rule)


_KLORA_SCORES: OrderedDict = OrderedDict()  # (pair, layer, rows) -> KLoraLayerScores: five floats each
_KLORA_SCORES_KEPT = 200_000
register_cache(_KLORA_SCORES.clear)  # emptied with the pack's other caches (memory_hooks)


def _file_key(choice: LoraChoice) -> tuple | None:
    """The LoRA file as it was read (path, modification time, size) and the strength it is used at."""
    return (choice.file.version, choice.strength) if choice.file.version else None


def _klora_scores(pair_key: tuple, name: str, rows, subject, style):
    """K-LoRA's Top-K sums of one layer, computed once per pair of files (re-patching with other widget
    values - the preset, the window - reuses them; an SDXL pair takes tens of seconds on a CPU)."""
    if None in pair_key:  # a LoraFile not read from a file: nothing to key it by
        return klora_layer_scores(subject, style, name, rows)
    key = (pair_key, name, rows)
    if key in _KLORA_SCORES:
        _KLORA_SCORES.move_to_end(key)
        return _KLORA_SCORES[key]
    scores = _KLORA_SCORES[key] = klora_layer_scores(subject, style, name, rows)
    while len(_KLORA_SCORES) > _KLORA_SCORES_KEPT:
        _KLORA_SCORES.popitem(last=False)
    return scores


def _gate_names(path: str, row_slices: tuple[RowSlice, ...]) -> list[tuple[str, tuple[int, int] | None]]:
    """The names a layer's decisions are recorded under, with their rows: `path`, or `path[slice]`."""
    if not row_slices:
        return [(path, None)]
    return [(f"{path}[{piece.name}]", (piece.start, piece.length)) for piece in row_slices]


def _b_lora_modules(model, pair: LoraSet, mapped: dict, active: list) -> dict[int, set[str]]:
    """Per LoRA, the modules B-LoRA lets it act on (subject: content block, style: style block)."""
    family = host.model_family(model)
    kept = {}
    for choice, role, block in ((pair.subject, SUBJECT, B_LORA_CONTENT_BLOCK), (pair.style, STYLE, B_LORA_STYLE_BLOCK)):
        if choice not in active:
            continue
        kept[id(choice)] = {path for path in mapped[id(choice)].modules if role in b_lora_routing(path, family)}
        if not kept[id(choice)]:
            raise ValueError(f"Method b-lora: the {role} LoRA {choice.name} changes nothing in SDXL's {role} block "
                             f"({block}, ComfyUI output_blocks.{0 if role == SUBJECT else 1}.1), so B-LoRA would "
                             "drop it entirely. B-LoRA needs LoRAs trained on those blocks (or at least touching "
                             "them); use another method for this pair.")
    return kept


@dataclass
class GatePlan:
    """What build_gated_model decided before touching anything: each active LoRA mapped onto the model,
    the layers both touch, which of them are gated, and which layers each LoRA keeps."""

    active: list[LoraChoice]
    mapped: dict[int, object]  # id(choice) -> MappedLora
    shared: set[str]
    gated: set[str]
    kept: dict[int, set[str]] = field(default_factory=dict)  # id(choice) -> layers that LoRA acts on


def build_gated_model(model, loras: LoraSet, criterion: str = "kl", style_bias: float = 1.0,
                      start_percent: float = 0.0, end_percent: float = 1.0, method: str = "p-lora",
                      k_lora_preset: str = "s*"):
    """A clone of `model` with the set's LoRAs fused by `method`; `model` is not touched.

    p-lora: the KL gate of Eq. 9-13 on every layer two or more LoRAs touch, choosing among those
    (Eq. 13 as a weighted argmax); a layer one LoRA touches gets it merged. k-lora: K-LoRA's Top-K
    rule on the layers both touch (scores computed here, once). direct: all merged, as chained
    LoraLoaders. b-lora: the subject LoRA only in SDXL's content block, the style LoRA only in its
    style block. k-lora and b-lora are defined for one subject and one style LoRA only.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
    plan = plan_layers(model, loras, method)
    if plan is None:
        return model
    sampling = model.get_model_object("model_sampling")
    state = GateState(sigma_high=float(sampling.percent_to_sigma(start_percent)),
                      sigma_low=float(sampling.percent_to_sigma(end_percent)))
    state.recorder.roles = tuple(c.role for c in loras.loras)  # the selection map's colours and legend
    state.recorder.names = tuple(c.name for c in loras.loras)
    try:
        for choice in plan.active:
            check_merged_shapes(model, plan.mapped[id(choice)])
        plan.kept = ({id(c): set(plan.mapped[id(c)].modules) for c in plan.active} if method != "b-lora"
                     else _b_lora_modules(model, loras, plan.mapped, plan.active))
        layers = build_layer_deltas(model, loras, plan)
        rule = selection_rule(method, criterion, style_bias, k_lora_preset, loras, layers, state, sampling)
    except LayerMismatch as error:  # a LoRA of another family: say that, rather than which layer failed first
        for choice in plan.active:
            mismatch = family_mismatch(model, choice.file)
            if mismatch and error.lora == choice.name:
                raise LoraFileError(mismatch) from error
        raise
    gates = {path: LayerGate(path, state=state, rule=rule, row_slices=layer.row_slices,
                             static_input=fed_by_context(path), deltas=layer.deltas, members=layer.members)
             for path, layer in layers.items()}
    patched = install_plan(model, loras, plan, method, gates, state)
    logger.info("P-LoRA (%s, %d LoRAs): %d layers gated%s, %d merged directly", method, len(plan.active), len(gates),
                f" ({criterion})" if method == "p-lora" else "",
                sum(len(plan.kept[id(c)] - plan.gated) for c in plan.active))
    return patched


PAIR_ONLY = ("k-lora", "b-lora")  # defined for one subject and one style LoRA


def plan_layers(model, loras: LoraSet, method: str) -> GatePlan | None:
    """Map the LoRAs with a strength onto the model and choose the gated layers (None: nothing to do)."""
    active = [c for c in loras.loras if c.strength != 0]
    if not active:
        return None
    if method in PAIR_ONLY and not loras.is_pair:
        raise ValueError(f"Method {method} is defined for one subject and one style LoRA (its rule compares exactly "
                         f"those two), but this set has {len(loras.loras)} LoRAs "
                         f"({', '.join(f'{c.role} {c.name}' for c in loras.loras)}). Use method p-lora (the gate "
                         "chooses among any number) or direct, or remove the Add LoRA to Set nodes.")
    mapped = {id(c): map_lora_onto_model(model, c.file) for c in active}
    touching: dict[str, int] = {}
    for choice in active:
        for path in mapped[id(choice)].modules:
            touching[path] = touching.get(path, 0) + 1
    shared = {path for path, count in touching.items() if count >= 2}
    gated = shared if method in ("p-lora", "k-lora") else set()
    per_token = {path for path in gated if ROUTED_EXPERT in path}
    if per_token:
        logger.info("P-LoRA: %d routed-expert layers (e.g. %s) see the tokens routed to them, not whole images, so "
                    "no per-image choice exists there: the LoRAs are merged directly", len(per_token),
                    min(per_token))
        gated = gated - per_token
    return GatePlan(active, mapped, shared, gated)


@dataclass
class GatedLayer:
    """One gated layer: the set positions of the LoRAs that touch it, their deltas, its fused-layer slices."""

    members: tuple[int, ...]
    deltas: list
    row_slices: tuple[RowSlice, ...]


def build_layer_deltas(model, loras: LoraSet, plan: GatePlan) -> dict[str, GatedLayer]:
    """path -> GatedLayer of every gated layer, in the model's order."""
    layers = {}
    key_map = host.unet_key_map(model) if plan.gated else {}
    for path in sorted(plan.gated, key=_module_order(model)):
        host.stop_if_interrupted()  # Cancel stops a long build (dense deltas of a large model) between layers
        module = host.get_module(model, path)
        geometry = LayerGeometry.of_module(module)
        members = [c for c in plan.active if path in plan.mapped[id(c)].modules]
        layers[path] = GatedLayer(
            tuple(loras.index(c) for c in members),
            [layer_delta(plan.mapped[id(c)].modules[path], c, geometry, module, model) for c in members],
            fused_row_slices(key_map, path, geometry.out_channels))
    return layers


def selection_rule(method: str, criterion: str, style_bias: float, k_lora_preset: str, loras: LoraSet,
                   layers: dict[str, GatedLayer], state: GateState, sampling):
    """The gates' rule: the paper's divergence rule, or K-LoRA's with its Top-K sums computed here, once."""
    if method == "p-lora":
        return DivergenceRule(criterion, style_bias, weights=loras.gate_weights(style_bias))
    if method != "k-lora" or not layers:
        return None
    pair_key = (_file_key(loras.subject), _file_key(loras.style))
    scores = {}
    for path, layer in layers.items():
        host.stop_if_interrupted()  # the Top-K sums take seconds per SDXL layer on a CPU
        subject, style = layer.deltas
        for name, rows in _gate_names(path, layer.row_slices):
            scores[name] = _klora_scores(pair_key, name, rows, subject, style)
    return KLoraSelection(KLoraRule(scores, k_lora_preset, layer_order=list(scores)), state, sampling)


def install_plan(model, loras: LoraSet, plan: GatePlan, method: str, gates: dict, state: GateState):
    """The patched clone: every kept layer a LoRA acts on alone merged as LoraLoader would, the gates
    installed, and a fixed rule's choices recorded for the selection map."""
    patched = model.clone()
    for choice in plan.active:
        skip = plan.gated | (set(plan.mapped[id(choice)].modules) - plan.kept[id(choice)])
        merge_patches(patched, plan.mapped[id(choice)], choice.strength, skip)
    static = {}
    if method == "direct" and len(plan.active) >= 2:  # what the selection map shows for a fixed rule
        static = {path: BOTH_VALUE for path in sorted(plan.shared, key=_module_order(model))}
    elif method == "b-lora" and len(plan.active) == 2:
        subject_kept, style_kept = plan.kept[id(loras.subject)], plan.kept[id(loras.style)]
        for path in sorted(plan.shared | subject_kept | style_kept, key=_module_order(model)):
            subject_acts, style_acts = path in subject_kept, path in style_kept
            static[path] = BOTH_VALUE if subject_acts and style_acts else (
                1.0 if subject_acts else 0.0 if style_acts else float("nan"))
    if gates or static:
        GateInstaller(gates, state, static).install(patched)
    return patched


CONTEXT_FED = (".attn2.to_k", ".attn2.to_v")  # SD/SDXL cross-attention k/v: their input is the text context


def fed_by_context(path: str) -> bool:
    """Whether a layer's input is the run's text context (the same at every step unless the conditioning
    changes). Only a hint for the gate's cache: that keys on the input's value, so a wrong guess costs
    a comparison, never a wrong output."""
    return path.endswith(CONTEXT_FED)


def _module_order(model):
    """Sort key: a module path's position in the model (the order its layers are defined)."""
    order = {name: i for i, (name, _) in enumerate(model.model.named_modules())}
    return lambda path: order.get(path, len(order))


def installed_gates(model_patcher) -> GateInstaller | None:
    """The GateInstaller of a MODEL from PLoRAModelPatcher (the latest one if it was patched twice)."""
    installer = model_patcher.model_options.get("transformer_options", {}).get(GATE_KEY)
    return installer if isinstance(installer, GateInstaller) else None


def gated_layers(model_patcher) -> dict[str, LayerGate]:
    """path -> LayerGate of a gated MODEL ({} if it gates nothing)."""
    installer = installed_gates(model_patcher)
    return dict(installer.gates) if installer is not None else {}


def gate_state_of(model_patcher) -> GateState | None:
    """The GateState (the selection recorder) of a MODEL from PLoRAModelPatcher, or None."""
    installer = installed_gates(model_patcher)
    return installer.state if installer is not None else None
