"""The gate of Eq. 11-13 as two Triton kernels, for accelerators (the eager `divergence` is the reference).

F is a layer's output [B, ..., C] (channels last, read as rows [B * T, C]); D_k is LoRA k's delta
on it. Three forms of the deltas:

- `gate_from_input(base, x, down, up_t, ...)`: a plain low-rank LoRA from the layer's input x,
  D_k = (x @ down_k^T) @ up_t[k]. The parts kernel computes the hidden rows x @ down^T of its row
  block (a loop over the input features, tl.dot, float32 accumulation, rounded to the model's
  dtype as F.linear's output in it), uses them and writes them [B * T, N * RP] for the add kernel:
  per gated layer two kernels in all.
- `gate_factored(base, hidden, up_t, ...)`: the same with hidden = x @ down_stacked^T given (one
  GEMM by the caller: three kernels per gated layer). In both D is computed inside the kernels
  (tl.dot, float32 accumulation, rounded to the model's dtype as a bmm in that dtype gives it)
  and never written to memory.
- `gate(base, deltas, ...)`: deltas materialised [N, B, ..., C] (LoHa, dense, conv...), read.

All run the same two kernels (`fused_gate_kernels`, the constexprs FACTORED and PROJECT switching
the form):

1. `parts_kernel`, grid (B, cdiv(T, ROW_BLOCK)): per token and delta the float32 sums over the
   channels that `divergence` computes (KL through the centred v = D - E_q[D] with the exponent
   limit, JS, cosine's stable form, dot), the per-token value in float64 from them (Eq. 11-12),
   and per (delta, program) the float64 sum of its rows' values: a [N, B, programs] buffer.
   A block is passed over a few times (softmax statistics of F, per delta its q-mean, its sums),
   so it is read from memory once and again from cache; rows wider than CHANNEL_BLOCK (GEGLU's
   5120/10240 channels) are looped over in channel blocks.
2. `add_kernel`, the same grid: each program sums its sample's partials in a fixed order
   (deterministic, the same in every program), d_k = the mean over the T tokens, the choice of
   Eq. 13 (the first k maximising w_k d_k; ties -> the lowest k) and F + D_choice on its rows;
   the programs of a sample's first block also write choice[b] and divergences[:, b].

No host sync, no torch op but `torch.empty`. Bytes per output element (fp16, two rank-64 deltas
at 640 channels, the down projection included): about 9, against 18.9 with a bmm writing the deltas.
Triton is imported lazily; without it (or off an accelerator) `fused_available` is False and the
eager path runs. Set `FORCE = True` (or PLORA_FUSED_GATE=force) with TRITON_INTERPRET=1 to run the
kernels on the CPU (tests). Every launch goes through `launch`, so a benchmark can count launches,
bytes and FLOPs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Sequence

import torch

FORCE = os.environ.get("PLORA_FUSED_GATE", "") == "force"  # run the kernels on the CPU too (TRITON_INTERPRET=1)
DISABLED = os.environ.get("PLORA_FUSED_GATE", "") == "off"  # never use them
CRITERIA = {"kl": 0, "js": 1, "cosine": 2, "dot": 3}  # name -> the kernels' code
PASSES = {"kl": 2, "js": 3, "cosine": 1, "dot": 1}  # passes over D_k in the parts kernel (D recomputed on each)
MAX_DELTAS = 8  # deltas per launch (unrolled in the kernels; one weight argument each)
ROW_BLOCK = 16  # rows per program (a power of two >= 16: tl.dot's smallest M)
CHANNEL_BLOCK = 256  # channels per block (a power of two >= 16); wider rows are looped over
FACTOR_TILE_BYTES = 32768  # an up_t tile [RP, channel block] at most this big (tl.dot stages it in shared memory)
INPUT_BLOCK = 64  # input features per step of the down projection's loop (gate_from_input; a power of two >= 16)
PARTIALS_BLOCK = 1024  # partial sums a program of the add kernel loads at once
FLOAT32_EXP_LIMIT = 60.0  # as divergence.FLOAT32_EXP_LIMIT
INDEX_LIMIT = 2 ** 31  # elements of one operand: offsets k * delta_stride stay in int32
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def launch(name: str, kernel, grid, reads: tuple, writes: tuple, *args, flops: float = 0.0, **meta):
    """Run `kernel[grid](*args, **meta)`; `reads` / `writes` are the tensors it reads and writes, `flops`
    the matrix-product FLOPs it does (2 RP per output element, delta and pass that recomputes D).

    The one place every launch of this module goes through (a benchmark replaces it to count).
    """
    return kernel[grid](*args, **meta)


@functools.lru_cache(maxsize=None)
def _kernels():
    """The jitted kernels, built on first use (None if Triton cannot be imported)."""
    try:
        from . import fused_gate_kernels
    except ImportError:
        return None
    return fused_gate_kernels


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """Whether Triton was imported in interpreter mode (TRITON_INTERPRET=1 set before its import)."""
    try:
        import triton.language
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return not isinstance(triton.language.standard.sum, JITFunction)


def fused_available(tensor: torch.Tensor) -> bool:
    """Whether the kernels can run on `tensor`'s device: CUDA (incl. ROCm) with Triton, or FORCE'd on the CPU."""
    if DISABLED:
        return False
    on_device = tensor.is_cuda or (FORCE and tensor.is_cpu and interpreting())
    return on_device and _kernels() is not None


def _row_stride(t: torch.Tensor) -> int | None:
    """Stride between consecutive rows when `t` is read as [rows, C] with unit channel stride, else None."""
    if t.ndim < 1 or t.stride(-1) != 1 and t.shape[-1] > 1:
        return None
    if t.ndim == 1:
        return t.shape[0]
    row = t.stride(-2)
    expected = row
    for dim in range(t.ndim - 2, 0, -1):  # leading dims must flatten onto one row stride
        expected *= t.shape[dim]
        if t.shape[dim - 1] > 1 and t.stride(dim - 1) != expected:
            return None
    return row


def _base_ok(base: torch.Tensor, criterion: str) -> bool:
    return (criterion in CRITERIA and base.ndim >= 2 and base.dtype in DTYPES and base.numel() > 0
            and base.numel() < INDEX_LIMIT and _row_stride(base) is not None)


def supports(base: torch.Tensor, deltas: torch.Tensor, channel_dim: int, criterion: str) -> bool:
    """Whether `gate` takes this call: channels last, row-flattenable F and [N, ...] deltas, a known criterion."""
    return (_base_ok(base, criterion) and channel_dim % base.ndim == base.ndim - 1
            and deltas.shape[1:] == base.shape and 1 <= deltas.shape[0] <= MAX_DELTAS
            and deltas.dtype == base.dtype and _row_stride(deltas[0]) is not None
            and deltas.shape[0] * max(deltas.stride(0), 1) < INDEX_LIMIT)


def _up_ok(base: torch.Tensor, up_t: torch.Tensor) -> bool:
    """up_t [N, RP, C] contiguous in F's dtype, 1 <= N <= MAX_DELTAS, RP a power of two >= 16, C F's channels."""
    if not (up_t.ndim == 3 and up_t.is_contiguous() and up_t.dtype == base.dtype and up_t.numel() < INDEX_LIMIT):
        return False
    count, rank, channels = up_t.shape
    return 1 <= count <= MAX_DELTAS and rank >= 16 and rank & (rank - 1) == 0 and channels == base.shape[-1]


def supports_factored(base: torch.Tensor, hidden: torch.Tensor, up_t: torch.Tensor, criterion: str) -> bool:
    """Whether `gate_factored` takes this call: F [B, ..., C] and hidden [B, ..., N * RP] row-flattenable,
    up_t [N, RP, C] contiguous, RP a power of two >= 16, one dtype, a known criterion."""
    if not (_base_ok(base, criterion) and _up_ok(base, up_t) and hidden.dtype == base.dtype):
        return False
    count, rank, _ = up_t.shape
    return (hidden.shape == (*base.shape[:-1], count * rank) and _row_stride(hidden) is not None
            and hidden.numel() < INDEX_LIMIT)


def supports_from_input(base: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor,
                        criterion: str) -> bool:
    """Whether `gate_from_input` takes this call: F [B, ..., C] and the layer input x [B, ..., IN] (the same
    token dims) row-flattenable, down [N * RP, IN] and up_t [N, RP, C] contiguous, RP a power of two >= 16,
    one dtype, a known criterion."""
    if not (_base_ok(base, criterion) and _up_ok(base, up_t) and x.dtype == base.dtype
            and down.dtype == base.dtype and x.ndim == base.ndim and down.ndim == 2 and down.is_contiguous()):
        return False
    count, rank, _ = up_t.shape
    return (down.shape[0] == count * rank and down.shape[1] == x.shape[-1] >= 1
            and x.shape[:-1] == base.shape[:-1] and _row_stride(x) is not None and x.numel() < INDEX_LIMIT
            and down.numel() < INDEX_LIMIT and base.numel() // base.shape[-1] * count * rank < INDEX_LIMIT)


@dataclass(frozen=True)
class _Deltas:
    """The deltas as the kernels take them: D (materialised) or H, U (factored), strides, what is read."""

    count: int
    factored: bool
    d: torch.Tensor
    h: torch.Tensor
    u: torch.Tensor
    sdk: int
    sdr: int
    sh: int
    rank: int
    reads: tuple  # by the parts kernel
    chosen: tuple  # by the add kernel (one delta's share)
    project: bool = False  # H computed (and written) by the parts kernel from X and A
    x: torch.Tensor | None = None
    a: torch.Tensor | None = None
    sx: int = 0
    inner: int = 0  # IN, the input features
    block_k: int = 16
    flops_per_row: float = 0.0  # the down projection's, in the parts kernel


def _materialised(base: torch.Tensor, deltas: torch.Tensor) -> _Deltas:
    return _Deltas(deltas.shape[0], False, deltas, base, base, deltas.stride(0), _row_stride(deltas[0]), 0, 16,
                   (deltas,), (deltas[0],))


def _factored(base: torch.Tensor, hidden: torch.Tensor, up_t: torch.Tensor) -> _Deltas:
    count, rank, _ = up_t.shape
    return _Deltas(count, True, base, hidden, up_t, 0, 0, _row_stride(hidden), rank, (hidden, up_t),
                   (hidden[..., :rank], up_t[0]))


def _from_input(base: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor) -> _Deltas:
    """The factored form with H = x @ down^T computed by the parts kernel into a new contiguous buffer."""
    count, rank, _ = up_t.shape
    inner = down.shape[1]
    width = count * rank
    hidden = torch.empty((*base.shape[:-1], width), dtype=base.dtype, device=base.device)
    element = 4 if _dot_in_float32(base) else base.element_size()
    block_k = min(INPUT_BLOCK, max(16, FACTOR_TILE_BYTES // (rank * element)), max(16, _next_power_of_2(inner)))
    return _Deltas(count, True, base, hidden, up_t, 0, 0, width, rank, (x, down, up_t),
                   (hidden[..., :rank], up_t[0]), True, x, down, _row_stride(x), inner, block_k,
                   2.0 * inner * width)


def _weights(weights: Sequence[float], count: int) -> tuple[float, ...]:
    """The N weights of Eq. 13 as MAX_DELTAS python floats (the kernel's scalar arguments)."""
    values = tuple(float(w) for w in weights)
    if len(values) != count:
        raise ValueError(f"P-LoRA fused gate: {len(values)} weights for {count} deltas")
    return values + (0.0,) * (MAX_DELTAS - count)


def _dot_in_float32(base: torch.Tensor) -> bool:
    """IEEE float32 products: fp32 models (no TF32), and bf16 in the interpreter (its dot cannot read bf16)."""
    return base.dtype == torch.float32 or (base.dtype == torch.bfloat16 and interpreting())


def _round_bf16(base: torch.Tensor) -> bool:
    """Round float32 -> bf16 in bits before the cast: the interpreter's cast truncates (a GPU's rounds)."""
    return base.dtype == torch.bfloat16 and interpreting()


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _geometry(base: torch.Tensor, deltas: _Deltas) -> tuple[int, int, int, tuple[int, int]]:
    """(channels, tokens per sample, channel block, grid (B, row blocks per sample))."""
    channels = base.shape[-1]
    batch = base.shape[0]
    tokens = base.numel() // channels // batch
    block_c = min(_next_power_of_2(channels), CHANNEL_BLOCK)
    if deltas.factored:
        element = 4 if _dot_in_float32(base) else base.element_size()
        block_c = min(block_c, max(16, FACTOR_TILE_BYTES // (deltas.rank * element)))
    return channels, tokens, block_c, (batch, _cdiv(tokens, ROW_BLOCK))


def token_partials(base: torch.Tensor, deltas: _Deltas, criterion: str) -> torch.Tensor:
    """Launch (a): float64 [N, B, programs] sums of per-token values (Eq. 11-12), each over one block of rows."""
    kernels = _kernels()
    channels, tokens, block_c, grid = _geometry(base, deltas)
    partials = torch.empty(deltas.count, *grid, dtype=torch.float64, device=base.device)
    flops = 2.0 * deltas.rank * base.numel() * deltas.count * PASSES[criterion] if deltas.factored else 0.0
    if deltas.project:  # the down projection, once per row
        flops += deltas.flops_per_row * (base.numel() // channels)
        x, a, writes = deltas.x, deltas.a, (deltas.h, partials)
    else:
        x, a, writes = base, base, (partials,)
    launch("plora_parts", kernels.parts_kernel, grid, (base, *deltas.reads), writes,
           base, deltas.d, deltas.h, deltas.u, x, a, partials, tokens, channels, deltas.inner, _row_stride(base),
           deltas.sdk, deltas.sdr, deltas.sh, deltas.sx, flops=flops,
           N=deltas.count, CRIT=CRITERIA[criterion], FACTORED=deltas.factored, PROJECT=deltas.project,
           RP=deltas.rank, DOT_F32=_dot_in_float32(base), ROUND_BF16=_round_bf16(base), BLOCK_R=ROW_BLOCK,
           BLOCK_C=block_c, BLOCK_K=deltas.block_k, EXP_LIMIT=FLOAT32_EXP_LIMIT)
    return partials


def choose_and_add(base: torch.Tensor, deltas: _Deltas, partials: torch.Tensor, weights: Sequence[float]):
    """Launch (b): (F + D_choice[b] per sample in the model's dtype, choice int32 [B], divergences float32 [N, B])
    - d_k the mean of the per-token values, choice the first k maximising w_k d_k (Eq. 13)."""
    kernels = _kernels()
    channels, tokens, block_c, grid = _geometry(base, deltas)
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    choice = torch.empty(grid[0], dtype=torch.int32, device=base.device)
    divergences = torch.empty(deltas.count, grid[0], dtype=torch.float32, device=base.device)
    flops = 2.0 * deltas.rank * base.numel() if deltas.factored else 0.0
    launch("plora_add", kernels.add_kernel, grid, (base, *deltas.chosen, partials), (out, choice, divergences),
           base, deltas.d, deltas.h, deltas.u, partials, out, choice, divergences, tokens, channels,
           _row_stride(base), deltas.sdk, deltas.sdr, deltas.sh, *_weights(weights, deltas.count), flops=flops,
           N=deltas.count, FACTORED=deltas.factored, RP=deltas.rank, DOT_F32=_dot_in_float32(base),
           ROUND_BF16=_round_bf16(base), BLOCK_R=ROW_BLOCK, BLOCK_C=block_c,
           BLOCK_P=min(_next_power_of_2(grid[1]), PARTIALS_BLOCK))
    return out, choice, divergences


def _run(base: torch.Tensor, deltas: _Deltas, criterion: str, weights: Sequence[float]):
    _weights(weights, deltas.count)  # refused before any launch
    partials = token_partials(base, deltas, criterion)
    return choose_and_add(base, deltas, partials, weights)


@torch.no_grad()
def gate(base: torch.Tensor, deltas: torch.Tensor, criterion: str = "kl", weights: Sequence[float] = (1.0, 1.0)):
    """Eq. 9-13 fused on materialised deltas: (F + D_choice, choice int32 [B], divergences float32 [N, B]).

    `base` F [B, ..., C] (fp16/bf16/fp32, rows flattenable with unit channel stride), `deltas`
    [N, B, ..., C] in F's dtype, `weights` N python floats; see `supports`. Two launches.
    """
    return _run(base, _materialised(base, deltas), criterion, weights)


@torch.no_grad()
def gate_factored(base: torch.Tensor, hidden: torch.Tensor, up_t: torch.Tensor, criterion: str = "kl",
                  weights: Sequence[float] = (1.0, 1.0)):
    """Eq. 9-13 fused on low-rank deltas D_k = hidden[..., k RP:(k+1) RP] @ up_t[k], never materialised:
    (F + D_choice contiguous [B, ..., C], choice int32 [B], divergences float32 [N, B]).

    `base` F [B, ..., C] (fp16/bf16/fp32, rows flattenable with unit channel stride); `hidden`
    [B, ..., N * RP] = x @ down_stacked^T in F's dtype, rows with unit channel stride; `up_t`
    [N, RP, C] contiguous in F's dtype; RP a power of two >= 16 (ranks padded with exact zeros);
    `weights` N python floats. See `supports_factored`. Two launches.
    """
    return _run(base, _factored(base, hidden, up_t), criterion, weights)


@torch.no_grad()
def gate_from_input_and_hidden(base: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor,
                               criterion: str = "kl", weights: Sequence[float] = (1.0, 1.0)):
    """`gate_from_input`, and the hidden rows x @ down^T [B, ..., N * RP] the parts kernel wrote (contiguous,
    in F's dtype): what `gate_factored` takes, e.g. for another slice of the same layer's output."""
    deltas = _from_input(base, x, down, up_t)
    return (*_run(base, deltas, criterion, weights), deltas.h)


def gate_from_input(base: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor,
                    criterion: str = "kl", weights: Sequence[float] = (1.0, 1.0)):
    """Eq. 9-13 fused from the layer's input: D_k = (x @ down_k^T) @ up_t[k], with down_k = down[k RP:(k+1) RP]:
    (F + D_choice contiguous [B, ..., C], choice int32 [B], divergences float32 [N, B]).

    The down projection runs in the parts kernel (a loop over IN with tl.dot, float32 accumulation,
    rounded to F's dtype as F.linear's output in it), which also writes it for the add kernel: two
    launches for the whole gate, no GEMM before them. `base` F [B, ..., C] and `x` [B, ..., IN] (the
    same token dims; fp16/bf16/fp32, rows flattenable with unit channel stride); `down` [N * RP, IN]
    and `up_t` [N, RP, C] contiguous in F's dtype, RP a power of two >= 16 (ranks padded with zero
    rows); `weights` N python floats. See `supports_from_input`.
    """
    out, choice, divergences, _ = gate_from_input_and_hidden(base, x, down, up_t, criterion, weights)
    return out, choice, divergences
