"""The LoRA set (the paper's subject/style pair, or N LoRAs) read onto a model: each LoRA's delta on
a layer, fused-layer slices, shape and family checks, and the direct merge of the layers a fusion
rule does not handle.

Shared by every fusion method of `gate.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..plora_core.deltas import DensePart, LayerDelta, LayerGeometry, LayerMismatch, LowRankPart, normalise_factors
from ..plora_core.gate import RowSlice
from ..plora_core.lora_file import LoraFile
from ..plora_core.fused_gate import MAX_DELTAS
from ..plora_core.lora_info import families_compatible, families_overlap, lora_family
from ..plora_core.recorder import STYLE, SUBJECT
from . import host
from .lora_mapping import MappedLora, ModulePatches


ROLES = (SUBJECT, STYLE)
MAX_LORAS = MAX_DELTAS  # LoRAs one gate chooses among: as many as the fused kernels take per layer


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA of the set as the user chose it: its file, strength, role and bias.

    `bias` multiplies the LoRA's divergence in the gate (Eq. 13 as a weighted argmax; 1 = paper).
    """

    file: LoraFile
    strength: float
    role: str = SUBJECT
    bias: float = 1.0

    @property
    def name(self) -> str:
        return self.file.name


@dataclass(frozen=True)
class LoraSet:
    """The PLORA_PAIR value passed from LoadSubjectStyleLoRA (and Add LoRA to Set) to PLoRAModelPatcher.

    The paper's pair is a set of two: a subject and a style. Each Add LoRA to Set node appends one
    LoRA with its role and bias; the set's order is the order of the selection map's colours.
    """

    loras: tuple[LoraChoice, ...]

    def __post_init__(self):
        if len(self.loras) < 2:
            names = ", ".join(c.name for c in self.loras) or "none"
            raise ValueError(f"A P-LoRA set needs two or more LoRAs to fuse, got {len(self.loras)} ({names}). Start it "
                             "with Load Subject + Style LoRA; for one LoRA alone use ComfyUI's Load LoRA node.")
        for choice in self.loras:
            check_role(choice.role, choice.name)

    @classmethod
    def pair(cls, subject: LoraChoice, style: LoraChoice) -> "LoraSet":
        return cls((replace(subject, role=SUBJECT), replace(style, role=STYLE)))

    @property
    def subject(self) -> LoraChoice:
        """The first subject LoRA (the pair's subject)."""
        return next(c for c in self.loras if c.role == SUBJECT)

    @property
    def style(self) -> LoraChoice:
        """The first style LoRA (the pair's style)."""
        return next(c for c in self.loras if c.role == STYLE)

    @property
    def is_pair(self) -> bool:
        """One subject and one style: the paper's case, which every method handles."""
        return len(self.loras) == 2 and {c.role for c in self.loras} == set(ROLES)

    def index(self, choice: LoraChoice) -> int:
        return next(i for i, c in enumerate(self.loras) if c is choice)

    def gate_weights(self, style_bias: float) -> tuple[float, ...]:
        """w_k of Eq. 13 as a weighted argmax: the LoRA's bias, times the patcher's style_bias for styles."""
        return tuple(float(c.bias) * (float(style_bias) if c.role == STYLE else 1.0) for c in self.loras)

    def with_lora(self, choice: LoraChoice) -> "LoraSet":
        """This set with one more LoRA (refused with a message naming the file: a duplicate, an unknown role,
        another family than the set's, or more than MAX_LORAS; the role is checked by the new set)."""
        for member in self.loras:
            if same_file(member.file, choice.file):
                raise ValueError(f"LoRA {choice.name} is already in the set (as its {member.role} LoRA): each LoRA "
                                 "can be in a set once. Pick another file, or change that LoRA's strength instead.")
        new_family = lora_family(choice.file.tensors, choice.file.metadata)
        for member in self.loras:
            family = lora_family(member.file.tensors, member.file.metadata)
            if not families_overlap(new_family, family):
                raise ValueError(f"LoRA {choice.name} is a {new_family} LoRA but the set's {member.name} is a {family} "
                                 f"LoRA: all LoRAs of a set must be made for one model. Pick a {family} LoRA.")
        if len(self.loras) >= MAX_LORAS:
            raise ValueError(f"The set already holds {MAX_LORAS} LoRAs, as many as the gate chooses among; LoRA "
                             f"{choice.name} cannot be added. Merge some with ComfyUI's Load LoRA node instead.")
        return LoraSet((*self.loras, choice))


def check_role(role: str, name: str) -> None:
    if role not in ROLES:
        raise ValueError(f"LoRA {name}: role must be {' or '.join(ROLES)}, not {role!r}. Subjects are who or what "
                         "you render (a person, pet or object), styles how it looks (a medium, a look, lighting).")


def same_file(a: LoraFile, b: LoraFile) -> bool:
    """The same file (the same path, whatever its version), or the same object."""
    return a is b or (bool(a.version) and a.version[:1] == b.version[:1])


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
            up, down, mid = normalise_factors(geometry, up, down, mid, None if rows is None else rows[1], layer,
                                              choice.name)
            scale = choice.strength * (alpha / down.shape[0] if alpha is not None else 1.0)
            mid = None if mid is None else mid.float()
            delta.low_rank.append(LowRankPart(up.float(), down.float(), scale, mid, rows))
        else:
            dense = host.dense_delta(patch, choice.strength, base("weight"), f"{patches.path}.weight", offset, function)
            delta.dense.append(DensePart(dense))
    for patch, offset, function in patches.bias:
        if module.bias is None:
            raise LayerMismatch(f"Layer {layer}: the LoRA changes a bias this layer does not have.", patches.path,
                                choice.name)
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
                raise LayerMismatch(
                    f"Layer {patches.path} (LoRA {mapped.name}): LoRA factors up {tuple(up.shape)}, down "
                    f"{tuple(down.shape)} do not fit the layer's weight {tuple(module.weight.shape)}. The LoRA "
                    "was probably trained for another base model; pick one made for this checkpoint.",
                    patches.path, mapped.name)


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


def merge_patches(model_patcher, mapped: MappedLora, strength: float, skip_modules: set[str]) -> None:
    """ComfyUI's own add_patches for every module of the LoRA except `skip_modules`."""
    chosen = {}
    for target, patch in mapped.raw_patches.items():
        key = target if isinstance(target, str) else target[0]
        if key.rpartition(".")[0] not in skip_modules:
            chosen[target] = patch
    model_patcher.add_patches(chosen, strength)
