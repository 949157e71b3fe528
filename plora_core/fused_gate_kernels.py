"""Triton kernels of `fused_gate` (imported only when Triton is; see that module for the design).

Shapes: F rows [R, C] (row stride `sf`, channel stride 1); deltas [N, R, C] (delta stride `sdk`,
row stride `sdr`); parts float32 [N, K, R] contiguous. All sums are float32, as in `divergence`.
"""

import triton
import triton.language as tl


@triton.jit
def _phi(v):
    """e^v - 1 - v to float32 accuracy (a Taylor polynomial where |v| < 0.5: no cancellation)."""
    poly = 1.0 / 362880.0
    poly = poly * v + 1.0 / 40320.0
    poly = poly * v + 1.0 / 5040.0
    poly = poly * v + 1.0 / 720.0
    poly = poly * v + 1.0 / 120.0
    poly = poly * v + 1.0 / 24.0
    poly = poly * v + 1.0 / 6.0
    poly = poly * v + 0.5
    small = v * v * poly
    return tl.where(tl.abs(v) < 0.5, small, (tl.exp(v) - 1.0) - v)


@triton.jit
def _log1p(x):
    """log(1 + x) for x > -1 (Kahan: log(w) x / (w - 1), w = 1 + x; exactly x where w == 1)."""
    w = 1.0 + x
    exact = w == 1.0
    ratio = tl.log(w) / tl.where(exact, 1.0, w - 1.0)
    return tl.where(exact, x, ratio * x)


@triton.jit
def _row_block(f_row, d_row, c0, cols0, C, F_PAD: tl.constexpr):
    """(in range, F, D) of one channel block of the rows, in float32; F padded with F_PAD, D with 0."""
    cols = c0 + cols0
    ok = cols[None, :] < C
    f = tl.load(f_row + cols[None, :], mask=ok, other=F_PAD).to(tl.float32)
    d = tl.load(d_row + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return ok, f, d


@triton.jit
def parts_kernel(F, D, P, R, C, sf, sdk, sdr, N: tl.constexpr, CRIT: tl.constexpr, K: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EXP_LIMIT: tl.constexpr):
    """Per-token parts of criterion CRIT for N deltas over a block of BLOCK_R rows (see `fused_gate`)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows_safe = tl.minimum(rows, R - 1).to(tl.int64)  # out-of-range rows read the last row; not stored
    f_row = F + rows_safe[:, None] * sf
    cols0 = tl.arange(0, BLOCK_C)
    zero = tl.zeros([BLOCK_R], dtype=tl.float32)
    if CRIT <= 1:  # KL, JS: softmax statistics of F (max m, sum s of e^(F - m)), online over channel blocks
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = zero
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            ok = cols[None, :] < C
            f = tl.load(f_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(f, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(f - m_new[:, None]), axis=1)
            m = m_new
    for k in tl.static_range(N):
        d_row = D + k * sdk + rows_safe[:, None] * sdr
        out = P + k * (R * K) + rows
        if CRIT <= 1:
            # the q-mean E_q[D] and max D: the centring and the exponent limit of `_kl_tokens`
            t = zero
            d_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                ok, f, d = _row_block(f_row, d_row, c0, cols0, C, float("-inf"))
                t += tl.sum(tl.exp(f - m[:, None]) * d, axis=1)
                d_max = tl.maximum(d_max, tl.max(tl.where(ok, d, float("-inf")), axis=1))
            mean = t / s
            centre = mean + tl.maximum(d_max - mean - EXP_LIMIT, 0.0)
            r = zero
            a = zero
            b = zero
            for c0 in range(0, C, BLOCK_C):
                ok, f, d = _row_block(f_row, d_row, c0, cols0, C, float("-inf"))
                e = tl.exp(f - m[:, None])
                v = tl.where(ok, d - centre[:, None], 0.0)
                phi = _phi(v)
                r += tl.sum(e * v, axis=1)
                a += tl.sum(e * phi, axis=1)  # e^v - 1 - v: KL's a - r, or JS's a
                b += tl.sum(e * v * (phi + v), axis=1)  # v (e^v - 1) = v e^v - v: b - r
            if CRIT == 0:
                tl.store(out, r / s, mask=row_ok)
                tl.store(out + R, a / s, mask=row_ok)
                tl.store(out + 2 * R, b / s, mask=row_ok)
            else:  # JS = E_q[f(t)], t = p / q - 1 = (expm1 v - a) / (1 + a), f as in `_js_tokens_elementwise`
                a_js = (a + r) / s
                js = zero
                for c0 in range(0, C, BLOCK_C):
                    ok, f, d = _row_block(f_row, d_row, c0, cols0, C, float("-inf"))
                    e = tl.exp(f - m[:, None])
                    v = tl.where(ok, d - centre[:, None], 0.0)
                    tt = (_phi(v) + v - a_js[:, None]) / (1.0 + a_js[:, None])
                    tt = tl.maximum(tt, -1.0 + 2.384185791015625e-07)  # 2^-22, as the eager path
                    first = _log1p(tt / (tt + 2.0)) * tt
                    second = _log1p(tt * tt / (4.0 * (tt + 1.0)))
                    js += tl.sum(tl.where(ok, e * (first - second), 0.0), axis=1)
                tl.store(out, 0.5 * js / s, mask=row_ok)
        else:  # cosine: F.F, F.D, D.D; dot: F.D
            ff = zero
            fd = zero
            dd = zero
            for c0 in range(0, C, BLOCK_C):
                ok, f, d = _row_block(f_row, d_row, c0, cols0, C, 0.0)
                fd += tl.sum(f * d, axis=1)
                if CRIT == 2:
                    ff += tl.sum(f * f, axis=1)
                    dd += tl.sum(d * d, axis=1)
            if CRIT == 2:
                tl.store(out, ff, mask=row_ok)
                tl.store(out + R, fd, mask=row_ok)
                tl.store(out + 2 * R, dd, mask=row_ok)
            else:
                tl.store(out, fd, mask=row_ok)


@triton.jit
def _log1p64(a):
    """log(1 + a) in float64 for a > -1 (Kahan's form, exact where 1 + a == 1)."""
    w = 1.0 + a
    exact = w == 1.0
    return tl.where(exact, a, tl.log(w) * a / tl.where(exact, 1.0, w - 1.0))


@triton.jit
def finish_kernel(P, OUT, CHOICE, SUBJECT, T, R, bias, N: tl.constexpr, CRIT: tl.constexpr, K: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    """One program per sample: per-token values in float64, their mean, and the choice of Eq. 13."""
    sample = tl.program_id(0)
    offsets = tl.arange(0, BLOCK_T)
    best = tl.full([1], float("-inf"), tl.float32)
    best_index = tl.full([1], 0, tl.int32)
    for k in tl.static_range(N):
        base = P + k * (R * K) + sample * T
        total = tl.zeros([BLOCK_T], dtype=tl.float64)
        for t0 in range(0, T, BLOCK_T):
            tok = t0 + offsets
            ok = tok < T
            x0 = tl.load(base + tok, mask=ok, other=0.0).to(tl.float64)
            if CRIT == 0:  # KL = b / (1 + a) - log1p(a), clamped at 0 (`_kl_from_parts`)
                a = tl.load(base + R + tok, mask=ok, other=0.0).to(tl.float64) + x0
                b = tl.load(base + 2 * R + tok, mask=ok, other=0.0).to(tl.float64) + x0
                value = tl.maximum(b / (a + 1.0) - _log1p64(a), 0.0)
            elif CRIT == 1:
                value = x0
            elif CRIT == 2:  # 1 - cos, as `_cosine_per_tokens`
                cross = tl.load(base + R + tok, mask=ok, other=0.0).to(tl.float64)
                delta_sq = tl.load(base + 2 * R + tok, mask=ok, other=0.0).to(tl.float64)
                n0 = tl.sqrt(x0)
                n1 = tl.sqrt(tl.maximum(x0 + 2.0 * cross + delta_sq, 0.0))
                norms = n0 * n1
                along = x0 + cross
                safe = tl.where(norms > 0, norms, 1.0)
                stable = tl.maximum(x0 * delta_sq - cross * cross, 0.0) / (safe * (safe + along))
                plain = 1.0 - along / safe
                per_token = tl.where(along > 0, stable, plain)
                value = tl.where(norms > 0, per_token, tl.where(delta_sq > 0, 1.0, 0.0))
            else:
                value = -x0
            total += tl.where(ok, value, 0.0)
        d = (tl.sum(total, axis=0) / T).to(tl.float32)
        tl.store(OUT + k * tl.num_programs(0) + sample, d)
        weighted = d if k == 0 else d * bias
        better = weighted > best
        best_index = tl.where(better, k, best_index)
        best = tl.where(better, weighted, best)
    tl.store(CHOICE + sample + tl.arange(0, 1), best_index)
    tl.store(SUBJECT + sample + tl.arange(0, 1), (best_index == 0).to(tl.uint8))


@triton.jit
def add_kernel(F, D, CHOICE, OUT, R, C, T, sf, sdk, sdr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT = F + D[choice[sample]] for a block of rows and channels (OUT contiguous [R, C])."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows[:, None] < R) & (cols[None, :] < C)
    rows64 = rows.to(tl.int64)
    chosen = tl.load(CHOICE + rows // T, mask=rows < R, other=0).to(tl.int64)
    f = tl.load(F + rows64[:, None] * sf + cols[None, :], mask=ok, other=0.0)
    d = tl.load(D + chosen[:, None] * sdk + rows64[:, None] * sdr + cols[None, :], mask=ok, other=0.0)
    total = f.to(tl.float32) + d.to(tl.float32)
    tl.store(OUT + rows64[:, None] * C + cols[None, :], total.to(OUT.dtype.element_ty), mask=ok)
