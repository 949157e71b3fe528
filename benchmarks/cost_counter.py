"""Counting what a piece of torch code would launch on an accelerator, on any machine.

`CostLog` is a `TorchDispatchMode`: every aten op that reaches it is one record. Views,
metadata ops (`OpOverload.is_view`, `_unsafe_view`, `detach`, ...) and any op that writes
nothing (`to`, `reshape`, eval-mode `dropout` returning existing memory) are not kernels, nor
are allocations (`empty*`). Under inference mode (ComfyUI samples in it) composite ops such
as `linear`, `conv2d` and `layer_norm` reach the mode whole: one kernel each, as on a GPU.
Every other op is one kernel, whose bytes are the tensors it reads (each distinct tensor view
once: `numel * element_size`) plus those it writes (the outputs, and the arguments its schema
marks as written: in-place `self` is read and written, `out=` is written only). FLOPs:
2 M N K for matrix products and convolutions, one per written element otherwise.
`_local_scalar_dense` (`.item()`, `.tolist()`, `bool()`) is counted as a host sync.

Memory: every storage an op creates is tracked from its first appearance until its Python
storage object is finalised (torch keeps one Python object per storage and frees it with
the storage, so `weakref.finalize` fires exactly when the last view of it dies); `live` is
the sum of the tracked storages' nbytes, `peak` its maximum. This works on the meta device,
where nothing is allocated at all.

Triton kernels do not pass through aten: code that launches them through one function
(`plora_core.fused_gate.launch`) is counted by `CostLog.launch`, which is patched in its
place and records one kernel with the bytes of the tensors it is told are read and written and
the FLOPs it declares (the in-kernel matrix products).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
# not kernels: allocations and ops that only make a new view or alias of existing memory
ALLOCATIONS = frozenset({aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
                         aten.new_empty.default, aten.new_empty_strided.default})
METADATA = frozenset({aten._unsafe_view.default, aten.detach.default, aten.alias.default, aten.lift_fresh.default,
                      aten.set_.source_Storage_storage_offset, aten._reshape_alias.default})
SYNCS = frozenset({aten._local_scalar_dense.default, aten.is_nonzero.default})
# in-place ops that overwrite `self` without reading it
WRITE_ONLY_SELF = frozenset({aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default})
MATMULS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.mm.out,
                     aten.addmm.out, aten.bmm.out})
CONVOLUTIONS = frozenset({aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default})


@dataclass
class Kernel:
    """One launch: what it is, where in the measured code it ran, and what it moves and computes."""

    name: str
    phase: str
    read: int  # bytes
    written: int  # bytes
    flops: float

    @property
    def moved(self) -> int:
        return self.read + self.written

    def seconds(self, bandwidth: float, peak_flops: float, launch: float) -> float:
        """Roofline time: max(bytes / bandwidth, flops / peak) plus a fixed launch cost."""
        return max(self.moved / bandwidth, self.flops / peak_flops) + launch


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _view_key(tensor: torch.Tensor) -> tuple:
    return (_storage_key(tensor), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype)


def _distinct_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen.setdefault(_view_key(t), nbytes(t))
    return sum(seen.values())


def _flops(func, args, written: list[torch.Tensor]) -> float:
    if func in MATMULS:
        first = args[1] if func in (aten.addmm.default, aten.baddbmm.default, aten.addmm.out) else args[0]
        return 2.0 * written[0].numel() * first.shape[-1]
    if func is aten.linear.default:  # dispatched whole under inference mode
        return 2.0 * written[0].numel() * args[1].shape[-1]
    if func in CONVOLUTIONS:
        weight = args[1]
        return 2.0 * written[0].numel() * weight.shape[1] * math.prod(weight.shape[2:])
    return float(sum(t.numel() for t in written))


class CostLog(TorchDispatchMode):
    """Records kernels, host syncs and live memory of everything run under it (see the module docstring)."""

    def __init__(self, untracked_phases: tuple[str, ...] = ()):
        super().__init__()
        self.untracked_phases = frozenset(untracked_phases)  # their allocations are not counted in `live`
        self.kernels: list[Kernel] = []
        self.syncs = 0
        self.views = 0
        self.live = 0
        self.peak = 0
        self.phase = "other"
        self._tracked: set[int] = set()

    # ---- phases: which part of the measured code a kernel belongs to
    @contextlib.contextmanager
    def in_phase(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def phase_wrapper(self, function, phase: str):
        """`function` with every kernel it launches attributed to `phase` (unless it sets its own)."""
        def wrapped(*args, **kwargs):
            with self.in_phase(phase):
                return function(*args, **kwargs)
        return wrapped

    # ---- memory
    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._tracked:
            return
        self._tracked.add(key)
        if self.phase in self.untracked_phases:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._untrack, key, size)

    def _untrack(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size

    def reset_peak(self) -> None:
        self.peak = self.live

    # ---- kernels
    def record(self, name: str, reads, writes, flops: float = 0.0) -> None:
        """One kernel that reads `reads` and writes `writes` (tensors; each distinct view counted once)."""
        self.kernels.append(Kernel(name, self.phase, _distinct_bytes(reads), _distinct_bytes(writes), flops))

    def launch(self, name, kernel, grid, reads: tuple, writes: tuple, *args, flops: float = 0.0, **meta) -> None:
        """Stands in for `plora_core.fused_gate.launch`: records the launch and its declared FLOPs, runs nothing."""
        self.record(f"triton:{name}", [t for t in reads if isinstance(t, torch.Tensor)],
                    [t for t in writes if isinstance(t, torch.Tensor)], float(flops))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if func in SYNCS:
            self.syncs += 1
            return out
        inputs = {}
        written = {}
        position = 0
        for argument in func._schema.arguments:
            if argument.kwarg_only:
                value = kwargs.get(argument.name)
            else:
                value = args[position] if position < len(args) else kwargs.get(argument.name)
                position += 1
            tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            is_write = argument.alias_info is not None and argument.alias_info.is_write
            for t in tensors:
                if is_write:
                    written[_view_key(t)] = t
                if not is_write or not (argument.kwarg_only or func in WRITE_ONLY_SELF):
                    inputs[_view_key(t)] = t
        input_storages = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        fresh = [t for t in outputs if _storage_key(t) not in input_storages]
        for t in fresh:
            self._track(t)
        if func in ALLOCATIONS:
            return out
        for t in fresh:
            written.setdefault(_view_key(t), t)
        if not written:  # views, metadata; `to`, `reshape`, eval `dropout` that return existing memory
            self.views += 1
            return out
        writes = list(written.values())
        self.kernels.append(Kernel(str(func.overloadpacket.__name__), self.phase, _distinct_bytes(inputs.values()),
                                   _distinct_bytes(writes), _flops(func, args, writes)))
        return out

    # ---- summaries
    def count(self, phase: str | None = None, exclude: tuple[str, ...] = ()) -> int:
        return len(self.select(phase, exclude))

    def moved(self, phase: str | None = None, exclude: tuple[str, ...] = ()) -> int:
        return sum(k.moved for k in self.select(phase, exclude))

    def select(self, phase: str | None = None, exclude: tuple[str, ...] = ()) -> list[Kernel]:
        return [k for k in self.kernels if (phase is None or k.phase == phase) and k.phase not in exclude]


def attention_as_one_kernel(log: CostLog):
    """A stand-in for `scaled_dot_product_attention` that records it as one fused (flash) kernel.

    On the meta device torch would decompose it into the math path (the full attention matrix);
    a GPU runs one flash/efficient kernel reading q, k, v once and writing the output:
    4 B H Lq Lk d FLOPs (QK^T and PV).
    """
    def scaled_dot_product_attention(q, k, v, attn_mask=None, *args, **kwargs):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        reads = [q, k, v] + ([attn_mask] if attn_mask is not None else [])
        flops = 4.0 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]
        log.record("flash_attention", reads, [out], flops)
        return out
    return scaled_dot_product_attention
