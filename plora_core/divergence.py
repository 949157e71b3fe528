"""Feature-distribution divergences for the gate (paper Eq. 11-12, Table 4), accurate at real magnitudes.

A layer output is read as one categorical distribution per token: the softmax over channels
(the last dim of a Linear output, dim 1 of a Conv output). Each criterion returns one number
per batch sample, its per-token value averaged over that sample's tokens, so CFG's cond and
uncond rows (and different prompts in one batch) decide separately.

Every criterion is computed from the base output F and a LoRA's delta D (F_hat = F + D), never
from F + D itself. Real layers have logits of std 1-100 over 320-3072 channels, while a LoRA
moves them by 1e-4..1e-1 of that: `log_softmax(F + D) - log_softmax(F)` then subtracts two
numbers the size of the largest logit and keeps almost no correct digits of a KL near 1e-7.
Here no step subtracts large numbers: KL and JS work with D centred under q = softmax(F), and
cosine with the exact algebraic form of 1 - cos. Inputs may be fp32, fp16 or bf16; the work
is done in float32 (per-token scalars in float64) and each criterion returns float32 [B]. The
divergences only decide (Eq. 13), so they are computed without autograd.
Tested against float64 definitions at SDXL/Flux magnitudes (tests/core/test_divergence_accuracy.py).

This is the hot path of every gated layer at every step. On a CPU the tokens are processed in
cache-sized chunks and the KL takes a short moment series when the deltas are small; on an
accelerator everything runs in one piece with no data-dependent branch (no host sync).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch

# (tuned [B, ...], base [B, ...], channel_dim) -> [B]: the divergence of materialised outputs
Divergence = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# (base F, deltas (D_1, D_2, ...), channel_dim[, finish_device=]) -> (d(F + D_1, F), d(F + D_2, F), ...),
# each [B]; work that depends only on F (the softmax, |F|^2) is done once for all deltas
ShiftDivergence = Callable[..., tuple[torch.Tensor, ...]]

# KL from the first K <= SERIES_MAX_MOMENTS moments of v when that truncates at most SERIES_TOLERANCE
# of the KL (max |v| up to about 2); otherwise from expm1(v) elementwise.
SERIES_MAX_MOMENTS = 12
SERIES_TOLERANCE = 1e-5
# Largest |v| worked on in float32: e^v neither overflows nor reaches denormals, and channels whose
# float32 q underflowed (q_c < 1e-38 q_max) cannot carry a visible share of p = q e^v / E_q[e^v].
FLOAT32_EXP_LIMIT = 60.0
# On a CPU, tokens are taken in groups of about this many elements per tensor, so that the few
# passes each criterion makes over them run from cache rather than memory.
CHUNK_ELEMENTS = 1 << 20


def _accelerated(tensor: torch.Tensor) -> bool:
    """Off the CPU: no data-dependent branches (each would be a host sync) and no cache-sized chunks."""
    return not tensor.is_cpu


# (base chunk, delta chunks, channel_dim) -> per delta, the chunk's per-token parts: a [k, tokens]
# tensor (float32 off the CPU) that a float64 `finish` turns into values
PerTokens = Callable[[torch.Tensor, Sequence[torch.Tensor], int], list[torch.Tensor]]


def _over_tokens(per_tokens: PerTokens, base: torch.Tensor, deltas: Sequence[torch.Tensor], channel_dim: int,
                 finish: Callable[[torch.Tensor], torch.Tensor],
                 finish_device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """Per-sample means (float32 [B]) of a per-token criterion, computed over groups of tokens.

    A [B, ..., C] output is read as rows [B * tokens, C], a [B, C, ...] one as B planes
    [C, tokens]. On a CPU the tokens go in chunks of about CHUNK_ELEMENTS per tensor (every
    value is per token, so chunking changes nothing but the speed); elsewhere in one piece.
    `per_tokens` gives [k, tokens] parts (float32 off the CPU) and `finish` the float64 values;
    with `finish_device` (a device without float64) only the parts are moved there first.
    """
    tensors = (base, *deltas)
    batch, channels = base.shape[0], base.shape[channel_dim]
    if channel_dim % base.ndim == base.ndim - 1:
        planes, token_dim = [[t.reshape(-1, channels) for t in tensors]], 0
    else:
        flat = [t.movedim(channel_dim, 1).reshape(batch, channels, -1) for t in tensors]
        planes, token_dim = [[t[sample] for t in flat] for sample in range(batch)], 1
    values: list[list[torch.Tensor]] = [[] for _ in deltas]
    for plane in planes:
        tokens = plane[0].shape[token_dim]
        step = tokens if _accelerated(base) else max(1, CHUNK_ELEMENTS // channels)
        for start in range(0, tokens, step):
            chunk = [t.narrow(token_dim, start, min(step, tokens - start)) for t in plane]
            for collected, value in zip(values, per_tokens(chunk[0], chunk[1:], 1 - token_dim)):
                collected.append(value)
    per_token = [torch.cat(v, dim=-1) for v in values]
    if finish_device is not None:
        per_token = [v.to(finish_device) for v in per_token]
    return tuple(finish(v).view(batch, -1).mean(dim=1).float() for v in per_token)


def _token_sums(x: torch.Tensor, ys: Sequence[torch.Tensor], channel_dim: int, scratch: torch.Tensor) -> torch.Tensor:
    """[len(ys), tokens] float32: sum_c x_c * y_c per token for each y (parts of a per-token criterion)."""
    token_shape = list(x.shape)
    token_shape[channel_dim] = 1
    parts = torch.empty(len(ys), math.prod(token_shape), dtype=torch.float32, device=x.device)
    for row, y in zip(parts, ys):
        torch.sum(torch.mul(x, y, out=scratch), dim=channel_dim, keepdim=True, out=row.view(token_shape))
    return parts


def _channel_sum(x: torch.Tensor, y: torch.Tensor, channel_dim: int, scratch: torch.Tensor) -> torch.Tensor:
    """sum_c x_c * y_c per token, through a reused [B, ..., C] float32 buffer (no new temporary)."""
    return torch.mul(x, y, out=scratch).sum(dim=channel_dim, keepdim=True)


def expm1(x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """e^x - 1 to float32 accuracy for |x| <= FLOAT32_EXP_LIMIT, written into `out`.

    torch's float32 expm1 is a scalar loop on CPU (about 10x an exp); there Kahan's form
    expm1(x) = (u - 1) / log(u) * x, u = exp(x) (the ratio taken as 1 where u == 1), gives the
    same accuracy from two vectorised transcendentals. Elsewhere torch.expm1 is used.
    """
    if not (x.is_cpu and x.dtype == torch.float32):
        return torch.expm1(x, out=out)
    torch.exp(x, out=out)
    torch.log(out, out=scratch)
    return out.sub_(1.0).div_(scratch).nan_to_num_(1.0).mul_(x)


def log1p(x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """log(1 + x) to float32 accuracy for x > -1, written into `out` (`x` may be `out`).

    On CPU in float32, Kahan's form log1p(x) = log(w) * x / (w - 1), w = 1 + x (exactly x where
    w == 1), for the same reason as `expm1`.
    """
    if not (x.is_cpu and x.dtype == torch.float32):
        return torch.log1p(x, out=out)
    torch.add(x, 1.0, out=scratch)
    ratio = torch.log(scratch).div_(scratch.sub_(1.0)).nan_to_num_(1.0)
    return torch.mul(ratio, x, out=out)


def _softmax(base: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """q = softmax(F) over channels, in float32 (or float64 for float64 input), shared by both LoRAs."""
    return torch.softmax(base if base.dtype == torch.float64 else base.float(), dim=channel_dim)


def _centred(q: torch.Tensor, delta: torch.Tensor, channel_dim: int, scratch: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
    """v = D - E_q[D] per token, in float32 in `out` (the caller's delta is not modified).

    Every divergence of softmax(F + D) from softmax(F) is invariant to adding a per-token
    constant to D; centring makes the moments of v the small numbers they are.
    """
    mean = _channel_sum(q, delta, channel_dim, scratch)
    return torch.sub(delta, mean, out=out)


def _series_moments(max_abs: float) -> int | None:
    """Fewest moments K whose truncation stays below SERIES_TOLERANCE of the KL, or None.

    The first omitted term changes the KL by about M_(K+1) K / (K+1)!, and
    |M_(K+1)| <= max|v|^(K-1) M_2 while KL >= M_2 / 2 (1 - O(max|v|)): a relative error
    below 2 max|v|^(K-1) / K!.
    """
    for k in range(2, SERIES_MAX_MOMENTS + 1):
        if 2.0 * max_abs ** (k - 1) / math.factorial(k) <= SERIES_TOLERANCE:
            return k
    return None


def _kl_tokens(base: torch.Tensor, q: torch.Tensor, delta: torch.Tensor, channel_dim: int,
               work: list[torch.Tensor]) -> torch.Tensor:
    """KL(softmax(F + D) || softmax(F)) per token (Eq. 11-12), as float32 [3, tokens]: r, a - r, b - r.

    With p = softmax(F + D), q = softmax(F) and v = D - E_q[D]: p = q e^v / E_q[e^v], so
    KL = E_p[v] - log E_q[e^v] = b / (1 + a) - log1p(a), a = E_q[expm1(v)], b = E_q[v e^v].
    Both a and b are O(Var_q(v)) (E_q[v] = 0): no difference of large numbers remains, and the
    float32 error is about eps * E_q|v|, i.e. a relative error of about eps * sqrt(2 / KL).
    (b / (1 + a) is E_p[v] and log1p(a) is log E_q[e^v]; the formula holds for any per-token
    shift of D, so r = E_q[v], the rounding residual of the centring, enters a and b alike and
    is kept apart until `_kl_from_parts` adds it back in float64.)
    When |v| is small everywhere (the usual case), a and b come from the moments
    M_k = E_q[v^k]: a = sum_k M_k / k!, b = sum_k M_k / (k - 1)!, exact to SERIES_TOLERANCE
    and cheaper than an elementwise expm1; otherwise from expm1(v) (see `expm1`), in float64
    for the rare |v| > FLOAT32_EXP_LIMIT.
    """
    v, scratch, spare = work
    _centred(q, delta, channel_dim, scratch, out=v)
    token_shape = list(v.shape)
    token_shape[channel_dim] = 1
    parts = torch.empty(3, math.prod(token_shape), dtype=torch.float32, device=v.device)
    if _accelerated(v):
        _limit_exponents(v, channel_dim)
        return _kl_parts_elementwise(q, v, channel_dim, work, parts, token_shape)
    largest = _largest_magnitude(v)
    moments = _series_moments(largest)
    if moments is not None:
        return _kl_parts_from_moments(q, v, channel_dim, moments, scratch, parts, token_shape)
    if largest > FLOAT32_EXP_LIMIT:  # a huge delta, beyond float32's exponents: all in float64
        q64 = _softmax(base.double(), channel_dim)
        work64 = _workspace(q64, 3)
        v64 = _centred(q64, delta, channel_dim, work64[1], out=work64[0])
        kl = _kl_from_parts(_kl_parts_elementwise(q64, v64, channel_dim, work64, parts.double(), token_shape))
        parts[:2].zero_()  # a = b - KL = 0: parts that stand for the KL itself, which fits float32 where a, b may not
        parts[2].copy_(kl)
        return parts
    return _kl_parts_elementwise(q, v, channel_dim, work, parts, token_shape)


@functools.lru_cache(maxsize=None)
def _series_coefficients(moments: int) -> torch.Tensor:
    """[2, K - 1] float32: a - M_1 = sum_(k>=2) M_k / k! and b - M_1 = sum_(k>=2) M_k / (k - 1)!."""
    return torch.tensor([[1.0 / math.factorial(k) for k in range(2, moments + 1)],
                         [1.0 / math.factorial(k - 1) for k in range(2, moments + 1)]], dtype=torch.float32)


def _kl_parts_from_moments(q: torch.Tensor, v: torch.Tensor, channel_dim: int, moments: int, scratch: torch.Tensor,
                           parts: torch.Tensor, token_shape: list[int]) -> torch.Tensor:
    """[r, a - r, b - r] of `_kl_tokens` from M_1 = r and M_2..M_K (a matmul of the moments)."""
    higher = torch.empty(moments - 1, parts.shape[1], dtype=torch.float32, device=v.device)  # M_2..M_K
    weighted = torch.mul(q, v, out=scratch)  # q v^k, one power more each round
    torch.sum(weighted, dim=channel_dim, keepdim=True, out=parts[0].view(token_shape))
    for row in higher:
        torch.sum(weighted.mul_(v), dim=channel_dim, keepdim=True, out=row.view(token_shape))
    torch.mm(_series_coefficients(moments).to(v.device), higher, out=parts[1:])
    return parts


def _kl_parts_elementwise(q: torch.Tensor, v: torch.Tensor, channel_dim: int, work: list[torch.Tensor],
                          parts: torch.Tensor, token_shape: list[int]) -> torch.Tensor:
    """[0, a, b] of `_kl_tokens` with expm1(v) elementwise."""
    v, scratch, e = work
    expm1(v, out=e, scratch=scratch)
    parts[0].zero_()
    torch.sum(torch.mul(q, e, out=scratch), dim=channel_dim, keepdim=True, out=parts[1].view(token_shape))
    v_exp = torch.addcmul(v, v, e, out=e)  # v + v (e^v - 1) = v e^v
    torch.sum(torch.mul(q, v_exp, out=scratch), dim=channel_dim, keepdim=True, out=parts[2].view(token_shape))
    return parts


def _kl_from_parts(parts: torch.Tensor) -> torch.Tensor:
    """KL = b / (1 + a) - log1p(a) per token, in float64, from [r, a - r, b - r] (see `_kl_tokens`)."""
    residual, a, b = parts.double()
    a, b = a.add_(residual), b.add_(residual)
    return b.div_(a + 1.0).sub_(torch.log1p(a)).clamp_(min=0.0)


def _largest_magnitude(v: torch.Tensor) -> float:
    low, high = torch.aminmax(v)
    return max(-float(low), float(high))


def _limit_exponents(v: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Shift the tokens whose largest v exceeds FLOAT32_EXP_LIMIT down (every criterion is shift-invariant)."""
    return v.sub_(v.amax(dim=channel_dim, keepdim=True).sub_(FLOAT32_EXP_LIMIT).clamp_(min=0.0))


def _workspace(q: torch.Tensor, count: int) -> list[torch.Tensor]:
    return [torch.empty_like(q) for _ in range(count)]


def _kl_per_tokens(base: torch.Tensor, deltas: Sequence[torch.Tensor], channel_dim: int) -> list[torch.Tensor]:
    q = _softmax(base, channel_dim)
    work = _workspace(q, 3)
    return [_kl_tokens(base, q, delta, channel_dim, work) for delta in deltas]


@torch.no_grad()
def kl_of_shifts(base: torch.Tensor, deltas: Sequence[torch.Tensor], channel_dim: int,
                 finish_device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """d_k = KL(softmax(F + D_k) || softmax(F)) per sample, Eq. 11-12: the paper's criterion."""
    return _over_tokens(_kl_per_tokens, base, deltas, channel_dim, _kl_from_parts, finish_device)


def _js_tokens(base: torch.Tensor, q: torch.Tensor, delta: torch.Tensor, channel_dim: int,
               work: list[torch.Tensor]) -> torch.Tensor:
    """JS(softmax(F + D), softmax(F)) per token (Table 4), float32, channel dim of size 1.

    With t = p / q - 1 = (expm1(v) - a) / (1 + a) (a as in `_kl_tokens`) and M = (p + q) / 2,
    JS = E_q[f(t)] with f(t) = 0.5 [(1 + t) log(1 + t) - (2 + t) log(1 + t / 2)], which is
    E_q[0.5 e^u u - 0.5 (1 + e^u) log1p(expm1(u) / 2)] with u = log(p / q). Written as
    f(t) = 0.5 [t log1p(t / (2 + t)) - log1p(t^2 / (4 (1 + t)))] it has no first-order
    cancellation (f(t) = t^2 / 8 + O(t^3) >= 0), so every term and the sum keep float32 accuracy.
    """
    v, scratch, t, spare = work
    _centred(q, delta, channel_dim, scratch, out=v)
    if _accelerated(v):
        _limit_exponents(v, channel_dim)
    elif _largest_magnitude(v) > FLOAT32_EXP_LIMIT:
        q64 = _softmax(base.double(), channel_dim)
        work64 = _workspace(q64, 4)
        _centred(q64, delta, channel_dim, work64[1], out=work64[0])
        return _js_tokens_elementwise(q64, channel_dim, work64).float()
    return _js_tokens_elementwise(q, channel_dim, work)


def _js_tokens_elementwise(q: torch.Tensor, channel_dim: int, work: list[torch.Tensor]) -> torch.Tensor:
    v, scratch, t, spare = work
    expm1(v, out=t, scratch=scratch)
    a = _channel_sum(q, t, channel_dim, scratch)
    # t = p / q - 1, kept off -1 so that both logs below stay finite where p << q (f(-1) = log(2) / 2;
    # the two terms then cancel to ~25 eps)
    t.sub_(a).div_(a.add(1.0)).clamp_(min=-1.0 + 2.0 ** -22)
    first = log1p(torch.div(t, t + 2.0, out=v), out=v, scratch=scratch).mul_(t)   # t log1p(t / (2 + t))
    torch.add(t, 1.0, out=spare).mul_(4.0)
    second = log1p(torch.mul(t, t, out=t).div_(spare), out=t, scratch=scratch)    # log1p(t^2 / (4 (1 + t)))
    return _channel_sum(q, first.sub_(second), channel_dim, scratch).mul_(0.5)


def _js_per_tokens(base: torch.Tensor, deltas: Sequence[torch.Tensor], channel_dim: int) -> list[torch.Tensor]:
    q = _softmax(base, channel_dim)
    work = _workspace(q, 4)
    return [_js_tokens(base, q, delta, channel_dim, work).reshape(1, -1) for delta in deltas]


def _single_part(parts: torch.Tensor) -> torch.Tensor:
    return parts[0].double()


@torch.no_grad()
def js_of_shifts(base: torch.Tensor, deltas: Sequence[torch.Tensor], channel_dim: int,
                 finish_device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """Jensen-Shannon divergence of softmax(F + D_k) and softmax(F) per sample (Table 4)."""
    return _over_tokens(_js_per_tokens, base, deltas, channel_dim, _single_part, finish_device)


def _cosine_per_tokens(base: torch.Tensor, deltas: Sequence[torch.Tensor], channel_dim: int) -> list[torch.Tensor]:
    base32 = base.float()
    scratch = torch.empty_like(base32)
    base_sq = _token_sums(base32, (base32,), channel_dim, scratch)
    out = []
    for delta in deltas:
        delta32 = delta.float()
        out.append(torch.cat([base_sq, _token_sums(delta32, (base32, delta32), channel_dim, scratch)]))
    return out


def _cosine_from_parts(parts: torch.Tensor) -> torch.Tensor:
    """1 - cos per token in float64 from float32 [F.F, F.D, D.D] (see `cosine_of_shifts`)."""
    base_sq, cross, delta_sq = parts.double()
    n0 = base_sq.sqrt()
    n1 = (base_sq + 2.0 * cross + delta_sq).clamp_(min=0.0).sqrt_()
    norms = n0 * n1
    along = base_sq + cross  # F.(F + D) = n0 n1 cos
    stable = (base_sq * delta_sq - cross.square()).clamp_(min=0.0) / (norms * (norms + along))
    plain = 1.0 - along / norms
    per_token = torch.where(along > 0, stable, plain)
    return torch.where(norms > 0, per_token, (delta_sq > 0).double())


@torch.no_grad()
def cosine_of_shifts(base: torch.Tensor, deltas: Sequence[torch.Tensor], channel_dim: int,
                     finish_device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """1 - cos(F + D_k, F) per token over channels, averaged per sample (Table 4).

    With n0^2 = F.F, s = F.D, d2 = D.D (float32 dot products) and n1 = |F + D| =
    sqrt(n0^2 + 2 s + d2), exactly 1 - cos = (n0^2 d2 - s^2) / (n0 n1 (n0 n1 + n0^2 + s)):
    the numerator is |F|^2 |D|^2 sin^2 of their angle, so nothing cancels when cos is near 1.
    Where cos < 0 the plain 1 - (n0^2 + s) / (n0 n1) is used (no cancellation there either).
    The per-token algebra is float64. A zero F or F + D counts as distance 1 (as torch's
    cosine_similarity gives), except that nothing moved (D = 0) is distance 0.
    """
    return _over_tokens(_cosine_per_tokens, base, deltas, channel_dim, _cosine_from_parts, finish_device)


def _dot_per_tokens(base: torch.Tensor, deltas: Sequence[torch.Tensor], channel_dim: int) -> list[torch.Tensor]:
    base32 = base.float()
    scratch = torch.empty_like(base32)
    return [_token_sums(base32, (delta.float(),), channel_dim, scratch) for delta in deltas]


def _negated(parts: torch.Tensor) -> torch.Tensor:
    return parts[0].double().neg_()


@torch.no_grad()
def dot_of_shifts(base: torch.Tensor, deltas: Sequence[torch.Tensor], channel_dim: int,
                  finish_device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """F.F - (F + D_k).F = -F.D_k per token, averaged per sample (Table 4's dot product).

    How far the output's dot product with the base output dropped; |F|^2 is common to both
    LoRAs and cancels exactly, so only the float32 dot product F.D is computed.
    """
    return _over_tokens(_dot_per_tokens, base, deltas, channel_dim, _negated, finish_device)


SHIFT_DIVERGENCES: dict[str, ShiftDivergence] = {
    "kl": kl_of_shifts,
    "js": js_of_shifts,
    "cosine": cosine_of_shifts,
    "dot": dot_of_shifts,
}


def _on_outputs(of_shifts: ShiftDivergence) -> Divergence:
    def divergence(tuned: torch.Tensor, base: torch.Tensor, channel_dim: int) -> torch.Tensor:
        # tuned - base of two floats is exact to float32 rounding of the result: D as given
        return of_shifts(base, (tuned.float() - base.float(),), channel_dim)[0]

    divergence.__doc__ = f"{of_shifts.__name__} for a materialised output F_hat: D = F_hat - F in float32."
    divergence.__name__ = of_shifts.__name__.replace("_of_shifts", "_divergence")
    return divergence


kl_divergence = _on_outputs(kl_of_shifts)
js_divergence = _on_outputs(js_of_shifts)
cosine_distance = _on_outputs(cosine_of_shifts)
dot_drop = _on_outputs(dot_of_shifts)

DIVERGENCES: dict[str, Divergence] = {
    "kl": kl_divergence,
    "js": js_divergence,
    "cosine": cosine_distance,
    "dot": dot_drop,
}


def _lookup(table: dict, name: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"Unknown P-LoRA criterion {name!r}; choose one of {sorted(table)}.") from None


def get_divergence(name: str) -> Divergence:
    """A criterion by name, as a function of (tuned, base, channel_dim); the error lists the valid ones."""
    return _lookup(DIVERGENCES, name)


def get_shift_divergence(name: str) -> ShiftDivergence:
    """A criterion by name, as a function of (base, deltas, channel_dim): the gate's form."""
    return _lookup(SHIFT_DIVERGENCES, name)
