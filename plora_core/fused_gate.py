"""The gate of Eq. 11-13 as three Triton kernels, for accelerators (the eager `divergence` is the reference).

Per gated-layer call, with N LoRA deltas stacked as one [N, rows, C] tensor (channels last):

1. `_parts_kernel` (one launch): per token and delta, a few float32 sums over the channels that
   `divergence` also computes - KL: [r, a - r, b - r] of `_kl_tokens` (v = D - E_q[D] centred,
   a = E_q[expm1 v], b = E_q[v e^v], r = E_q[v]); JS: its per-token value; cosine: [F.F, F.D, D.D];
   dot: [F.D]. F and D are read in the model's dtype; a block of rows is passed over a few times
   (softmax statistics of F, then per delta its q-mean, then its sums), so each block is read from
   memory once and again from L1/L2 (a block is at most BLOCK_ELEMENTS values per tensor; rows
   wider than that - GEGLU's 5120/10240 channels - are looped over in channel blocks).
2. `_finish_kernel` (one launch, one program per sample): the per-token values in float64 from the
   parts, their mean over the sample's tokens, and the choice (Eq. 13): the first k maximising
   w_k d_k with w = (1, style_bias, style_bias, ...) - for two deltas, subject iff d_c >= bias d_s.
   No host sync: the choice stays on the device.
3. `_add_kernel` (one launch): F + D_chosen per sample, in the model's dtype.

Bytes per output element (fp16, two deltas): parts 6 (F, D_c, D_s once), add 6 (F, D_chosen) and
2 written, against 2 for the layer's own output. Triton is imported lazily; without it (or off an
accelerator) `fused_available` is False and the eager path runs. Set `FORCE = True` (or
PLORA_FUSED_GATE=force) with TRITON_INTERPRET=1 to run the kernels on the CPU (tests).
Every launch goes through `launch`, so a benchmark can count launches and bytes.
"""

from __future__ import annotations

import functools
import os

import torch

FORCE = os.environ.get("PLORA_FUSED_GATE", "") == "force"  # run the kernels on the CPU too (TRITON_INTERPRET=1)
DISABLED = os.environ.get("PLORA_FUSED_GATE", "") == "off"  # never use them
CRITERIA = {"kl": (0, 3), "js": (1, 1), "cosine": (2, 3), "dot": (3, 1)}  # name -> (code, parts per token)
MAX_DELTAS = 8  # deltas per launch (unrolled in the kernel)
BLOCK_ELEMENTS = 4096  # values per tensor in one program's block (rows x channels)
WIDE_BLOCK = 2048  # channel block of rows wider than BLOCK_ELEMENTS
FLOAT32_EXP_LIMIT = 60.0  # as divergence.FLOAT32_EXP_LIMIT


def launch(name: str, kernel, grid, reads: tuple, writes: tuple, *args, **meta):
    """Run `kernel[grid](*args, **meta)`; `reads` / `writes` are the tensors it reads and writes.

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


def supports(base: torch.Tensor, deltas: torch.Tensor, channel_dim: int, criterion: str) -> bool:
    """Whether `gate` takes this call: channels last, row-flattenable F and [N, ...] deltas, a known criterion."""
    return (criterion in CRITERIA and channel_dim % base.ndim == base.ndim - 1 and base.ndim >= 2
            and deltas.shape[1:] == base.shape and 1 <= deltas.shape[0] <= MAX_DELTAS
            and base.dtype in (torch.float16, torch.bfloat16, torch.float32) and deltas.dtype == base.dtype
            and _row_stride(base) is not None and _row_stride(deltas[0]) is not None and base.numel() > 0)


def _blocks(channels: int) -> tuple[int, int]:
    """(rows, channels) of one program's block."""
    import triton
    if channels <= BLOCK_ELEMENTS:
        block_c = triton.next_power_of_2(channels)
        return max(1, BLOCK_ELEMENTS // block_c), block_c
    return 1, WIDE_BLOCK


def shift_parts(base: torch.Tensor, deltas: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-token parts, float32 [N, K, rows], of `criterion` for F (`base`, [B, ..., C]) and deltas [N, B, ..., C]."""
    kernels = _kernels()
    code, count = CRITERIA[criterion]
    channels = base.shape[-1]
    rows = base.numel() // channels
    n = deltas.shape[0]
    parts = torch.empty(n, count, rows, dtype=torch.float32, device=base.device)
    block_r, block_c = _blocks(channels)
    grid = (triton_cdiv(rows, block_r),)
    launch("plora_parts", kernels.parts_kernel, grid, (base, deltas), (parts,),
           base, deltas, parts, rows, channels, _row_stride(base), deltas.stride(0), _row_stride(deltas[0]),
           N=n, CRIT=code, K=count, BLOCK_R=block_r, BLOCK_C=block_c, EXP_LIMIT=FLOAT32_EXP_LIMIT)
    return parts


def finish(parts: torch.Tensor, batch: int, criterion: str, style_bias: float = 1.0):
    """(divergences float32 [N, B], chosen index int32 [B], subject mask bool [B]) from `shift_parts`'s parts."""
    kernels = _kernels()
    n, _, rows = parts.shape
    tokens = rows // batch
    divergences = torch.empty(n, batch, dtype=torch.float32, device=parts.device)
    choice = torch.empty(batch, dtype=torch.int32, device=parts.device)
    subject = torch.empty(batch, dtype=torch.bool, device=parts.device)
    import triton
    block_t = min(1024, triton.next_power_of_2(max(tokens, 1)))
    launch("plora_finish", kernels.finish_kernel, (batch,), (parts,), (divergences, choice, subject),
           parts, divergences, choice, subject.view(torch.uint8), tokens, rows, float(style_bias),
           N=n, CRIT=CRITERIA[criterion][0], K=CRITERIA[criterion][1], BLOCK_T=block_t)
    return divergences, choice, subject


def add_chosen(base: torch.Tensor, deltas: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """F + D_choice[b] for each sample b, in the model's dtype (Eq. 13)."""
    kernels = _kernels()
    channels = base.shape[-1]
    rows = base.numel() // channels
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    block_r, block_c = _blocks(channels)
    grid = (triton_cdiv(rows, block_r), triton_cdiv(channels, block_c))
    # bytes: F and one delta per element read, out written (the chosen delta is all that is read of D)
    launch("plora_add", kernels.add_kernel, grid, (base, deltas[0], choice), (out,),
           base, deltas, choice, out, rows, channels, rows // base.shape[0], _row_stride(base), deltas.stride(0),
           _row_stride(deltas[0]), BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.no_grad()
def gate(base: torch.Tensor, deltas: torch.Tensor, criterion: str = "kl", style_bias: float = 1.0):
    """Eq. 9-13 fused: (F + D_chosen, subject mask [B], divergences [N, B]) for F [B, ..., C], deltas [N, B, ..., C]."""
    parts = shift_parts(base, deltas, criterion)
    divergences, choice, subject = finish(parts, base.shape[0], criterion, style_bias)
    return add_chosen(base, deltas, choice), subject, divergences
