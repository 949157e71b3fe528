"""Install the gate in ComfyUI: the KL-gated clone of a MODEL behind PLoRAModelPatcher.

The gate's maths is `plora_core/gate.py`; this is its glue. Layers both LoRAs touch get a
`LayerGate`. A `GateInstaller`, added as a wrapper of every diffusion-model call, sets each
gate over its layer's `forward` on the model instance that actually runs, for the length of
the call, and puts the layers back afterwards (so the host's own forward, with casting,
offloading and other LoRAs' patches, still runs inside, and a model instance ComfyUI builds
later - hooks, multi-GPU, compile - is gated too: nothing captured when the node ran can go
stale). The 2024 core has no wrappers: there the gates are object-patched when the node runs.
Layers only one LoRA touches get that LoRA through ComfyUI's own `add_patches`, exactly as a
direct merge would.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..plora_core.deltas import DensePart, LayerDelta, LayerGeometry, LowRankPart, normalise_factors
from ..plora_core.gate import DivergenceRule, GatedForward, LayerGate, RowSlice
from ..plora_core.lora_file import LoraFile, LoraFileError
from ..plora_core.lora_info import families_compatible, lora_family
from ..plora_core.recorder import GateState
from . import host
from .lora_mapping import MappedLora, ModulePatches, map_lora_onto_model

logger = logging.getLogger("plora")


@dataclass
class LoraChoice:
    """One LoRA of the pair as the user chose it."""

    file: LoraFile
    strength: float

    @property
    def name(self) -> str:
        return self.file.name


@dataclass
class SubjectStyleLoras:
    """The PLORA_PAIR value passed from LoadSubjectStyleLoRA to PLoRAModelPatcher."""

    subject: LoraChoice
    style: LoraChoice


def layer_delta(patches: ModulePatches, choice: LoraChoice, geometry: LayerGeometry,
                module: torch.nn.Module, model_patcher=None) -> LayerDelta:
    """One LoRA's delta on one layer: factored where it can be, dense (via the host) otherwise.

    Dense deltas (DoRA's above all) depend on W0: with `model_patcher` given it is read without
    patches another clone may have merged into the shared weights.
    """
    delta = LayerDelta(geometry)

    def base(param: str) -> torch.Tensor:
        current = getattr(module, param)
        if model_patcher is None:
            return current
        return host.unpatched_parameter(model_patcher, f"{patches.path}.{param}", current)

    layer = f"{patches.path} (LoRA {choice.name})"
    for patch, offset, function in patches.weight:
        factors = host.lora_factors(patch) if function is None else None
        if factors is not None and (offset is None or offset[0] == 0):
            up, down, alpha, mid = factors
            rows = None if offset is None else (int(offset[1]), int(offset[2]))
            up, down, mid = normalise_factors(geometry, up, down, mid, None if rows is None else rows[1], layer)
            scale = choice.strength * (alpha / down.shape[0] if alpha is not None else 1.0)
            mid = None if mid is None else mid.float()
            delta.low_rank.append(LowRankPart(up.float(), down.float(), scale, mid, rows))
        else:
            dense = host.dense_delta(patch, choice.strength, base("weight"), f"{patches.path}.weight", offset, function)
            delta.dense.append(DensePart(dense))
    for patch, offset, function in patches.bias:
        if module.bias is None:
            raise ValueError(f"Layer {layer}: the LoRA changes a bias this layer does not have.")
        bias = host.dense_delta(patch, choice.strength, base("bias"), f"{patches.path}.bias", offset, function)
        delta.bias = bias if delta.bias is None else delta.bias + bias
    return delta


def family_mismatch(model_patcher, lora: LoraFile) -> str | None:
    """The family message for a LoRA whose layers do not fit, when its file says another family."""
    family, model_family = lora_family(lora.tensors, lora.metadata), host.model_family(model_patcher)
    if families_compatible(family, model_family):
        return None
    return (f"LoRA file {lora.name} is a {family} LoRA but the model is {model_family}, so its layers do not fit. "
            f"Pick a LoRA trained for {model_family}, or load a {family} checkpoint.")


def check_merged_shapes(model_patcher, mapped: MappedLora) -> None:
    """Factored patches that go through add_patches must fit their layer (the host only logs)."""
    for patches in mapped.modules.values():
        module = host.get_module(model_patcher, patches.path)
        for patch, offset, _ in patches.weight:
            factors = host.lora_factors(patch)
            if factors is None or getattr(module, "weight", None) is None:
                continue
            up, down, _, mid = factors
            shape = module.weight.shape  # shapes only: indexing a quantized weight would dequantize it all
            rows = shape[0] if offset is None else int(offset[2])
            fits = up.shape[0] == rows and (mid is not None or down[0].numel() == math.prod(shape[1:]))
            if not fits:
                raise ValueError(
                    f"Layer {patches.path} (LoRA {mapped.name}): LoRA factors up {tuple(up.shape)}, down "
                    f"{tuple(down.shape)} do not fit the layer's weight {tuple(module.weight.shape)}. The LoRA "
                    "was probably trained for another base model; pick one made for this checkpoint."
                )


def fused_row_slices(key_map: dict, path: str, out_channels: int) -> tuple[RowSlice, ...]:
    """The row slices ComfyUI's key map cuts a fused layer into (Flux qkv: to_q, to_k, to_v;
    linear1: to_q, to_k, to_v, proj_mlp), named after the separate layers of the diffusers model.

    Empty for an ordinary layer. Rows no slice covers form slices of their own, so every output
    channel is gated exactly once.
    """
    weight_key = f"{path}.weight"
    found: dict[tuple[int, int], str] = {}
    for lora_key, target in key_map.items():
        if isinstance(target, str) or target[0] != weight_key or target[1] is None or target[1][0] != 0:
            continue
        span = (int(target[1][1]), int(target[1][2]))
        name = lora_key.rpartition(".")[2]  # diffusers names end in the layer's own name
        if "." in lora_key and (span not in found or len(name) < len(found[span])):
            found[span] = name
        found.setdefault(span, lora_key)
    # keep the finest cut: newer ComfyUI also maps e.g. `linear1_qkv` onto the union of q, k and v
    finest = {span: name for span, name in found.items()
              if not any(other != span and span[0] <= other[0] and other[0] + other[1] <= span[0] + span[1]
                         for other in found)}
    if not finest:
        return ()
    slices, cursor = [], 0
    for (start, length), name in sorted(finest.items()):
        if start < cursor:  # overlapping spans: not a partition the gate can use
            return ()
        if start > cursor:
            slices.append(RowSlice(f"rows {cursor}-{start - 1}", cursor, start - cursor))
        slices.append(RowSlice(name, start, length))
        cursor = start + length
    if cursor < out_channels:
        slices.append(RowSlice(f"rows {cursor}-{out_channels - 1}", cursor, out_channels - cursor))
    return tuple(slices)


def _merge_patches(model_patcher, mapped: MappedLora, strength: float, skip_modules: set[str]) -> None:
    chosen = {}
    for target, patch in mapped.raw_patches.items():
        key = target if isinstance(target, str) else target[0]
        if key.rpartition(".")[0] not in skip_modules:
            chosen[target] = patch
    model_patcher.add_patches(chosen, strength)


GATE_KEY = "plora_gate"
_NOT_SET = object()


class GateInstaller:
    """The gates of one patched model, installed around each model call (an APPLY_MODEL wrapper).

    On each call it tells the shared GateState the current sigma (which step of the run this is,
    and which rows are cond / uncond), then sets every gate over its layer's `forward` on the
    model instance the executor runs, and restores the layers when the call returns.
    """

    def __init__(self, gates: dict[str, LayerGate], state: GateState):
        self.gates = gates
        self.state = state
        self._depth = 0

    def __deepcopy__(self, memo):  # clones and model copies share the gates (and their caches)
        return self

    def begin_model_call(self, sigma: torch.Tensor, transformer_options: dict) -> None:
        self.state.begin_model_call(float(sigma.max()), transformer_options.get("sample_sigmas"),
                                    transformer_options.get("cond_or_uncond"))

    def __call__(self, executor, x, sigma, *args, **kwargs):
        options = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})
        self.begin_model_call(sigma, options or {})
        if self._depth:  # a model call inside a model call: the layers are gated already
            return executor(x, sigma, *args, **kwargs)
        installed = []
        self._depth += 1
        try:
            for path, gate in self.gates.items():
                module = host.get_attr(executor.class_obj, path)
                installed.append((module, module.__dict__.get("forward", _NOT_SET)))
                module.forward = gate.bind(module.forward)
            return executor(x, sigma, *args, **kwargs)
        finally:
            self._depth -= 1
            for module, previous in reversed(installed):
                if previous is _NOT_SET:
                    del module.forward
                else:
                    module.forward = previous

    def install(self, model_patcher) -> None:
        """Put the gates on a clone: at run time where the host has wrappers, else as object patches."""
        if host.RUN_TIME_LAYER_PATCHES:
            host.add_model_call_wrapper(model_patcher, GATE_KEY, self)
            return
        for path, gate in self.gates.items():
            model_patcher.add_object_patch(f"{path}.forward",
                                           gate.bind(model_patcher.get_model_object(f"{path}.forward")))
        previous = model_patcher.model_options.get("model_function_wrapper")

        def plora_step_tracker(apply_model, args):
            self.begin_model_call(args["timestep"], args["c"].get("transformer_options", {}))
            if previous is not None:
                return previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])

        model_patcher.set_model_unet_function_wrapper(plora_step_tracker)


def build_gated_model(model, pair: SubjectStyleLoras, criterion: str = "kl", style_bias: float = 1.0,
                      start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of `model` whose shared layers run the gate of Eq. 9-13; `model` is not touched."""
    active = [c for c in (pair.subject, pair.style) if c.strength != 0]
    if not active:
        return model
    mapped = {id(c): map_lora_onto_model(model, c.file) for c in active}
    shared: set[str] = set()
    if len(active) == 2:
        shared = set(mapped[id(pair.subject)].modules) & set(mapped[id(pair.style)].modules)
    sampling = model.get_model_object("model_sampling")
    state = GateState(sigma_high=float(sampling.percent_to_sigma(start_percent)),
                      sigma_low=float(sampling.percent_to_sigma(end_percent)))
    rule = DivergenceRule(criterion, style_bias)
    try:
        for choice in active:
            check_merged_shapes(model, mapped[id(choice)])
        gates = {}
        key_map = host.unet_key_map(model) if shared else {}
        for path in sorted(shared):
            module = host.get_module(model, path)
            geometry = LayerGeometry.of_module(module)
            subject = layer_delta(mapped[id(pair.subject)].modules[path], pair.subject, geometry, module, model)
            style = layer_delta(mapped[id(pair.style)].modules[path], pair.style, geometry, module, model)
            row_slices = fused_row_slices(key_map, path, geometry.out_channels)
            gates[path] = LayerGate(path, subject, style, state, rule, row_slices)
    except ValueError as error:
        for choice in active:
            mismatch = family_mismatch(model, choice.file)
            if mismatch and f"LoRA {choice.name})" in str(error):
                raise LoraFileError(mismatch) from error
        raise

    patched = model.clone()
    for choice in active:
        _merge_patches(patched, mapped[id(choice)], choice.strength, shared)
    if gates:
        GateInstaller(gates, state).install(patched)
    logger.info("P-LoRA: %d layers gated (%s), %d merged directly", len(gates), criterion,
                sum(len(mapped[id(c)].modules) for c in active) - 2 * len(gates))
    return patched


def gated_layers(model_patcher) -> dict[str, LayerGate]:
    """path -> LayerGate of a gated MODEL ({} if it has no P-LoRA gate)."""
    for wrapper in host.model_call_wrappers(model_patcher, GATE_KEY):
        if isinstance(wrapper, GateInstaller):
            return dict(wrapper.gates)
    return {key[: -len(".forward")]: value.gate for key, value in model_patcher.object_patches.items()
            if isinstance(value, GatedForward)}


def gate_state_of(model_patcher) -> GateState | None:
    """The GateState of a gated MODEL (for the recorder), or None if it has no P-LoRA gate."""
    gates = gated_layers(model_patcher)
    return next(iter(gates.values())).state if gates else None
