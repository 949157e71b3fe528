"""Triton kernels of `fused_gate` (imported only when Triton is; see that module for the design).

Shapes: F rows [R, C] (row stride `sf`, channel stride 1), R = B * T, sample b's rows b * T ..
(b + 1) * T - 1. The deltas come in one of two forms (the constexpr FACTORED):

- materialised: D [N, R, C] (delta stride `sdk`, row stride `sdr`, channel stride 1);
- factored: H [R, N * RP] (row stride `sh`) and U [N, RP, C] contiguous; D_k = H[:, k RP:(k+1) RP] @ U[k],
  computed with tl.dot (float32 accumulation) and rounded to the model's dtype, as a bmm in that
  dtype gives it. D is never written to memory. With PROJECT (parts kernel) H itself is computed
  there from the layer input X [R, IN] (row stride `sx`) and the stacked down-projection A [N * RP, IN]
  contiguous, H = X @ A^T rounded to the model's dtype, and written for the add kernel.

PS, float64 [N, B, P] with P = cdiv(T, BLOCK_R): per delta and row block, the sum of the
per-token values of the block's rows (each block inside one sample). Per-token sums are float32,
as in `divergence`; per-token values and everything after them float64.
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
def _log1p64(a):
    """log(1 + a) in float64 for a > -1 (Kahan's form, exact where 1 + a == 1)."""
    w = 1.0 + a
    exact = w == 1.0
    return tl.where(exact, a, tl.log(w) * a / tl.where(exact, 1.0, w - 1.0))


@triton.jit
def _rounded(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """float32 `x` rounded to `dtype` (to nearest even). ROUND_BF16: done in bits first, for the
    interpreter, whose float32 -> bf16 cast truncates (after it the cast is exact)."""
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _hidden(H, X, A, k, rows, row_ok, sh, sx, IN, FACTORED: tl.constexpr, PROJECT: tl.constexpr, RP: tl.constexpr,
            DOT_F32: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """H_k on `rows` [BLOCK_R, RP] in the model's dtype (`k` a constexpr or a runtime index); a dummy unless FACTORED.

    PROJECT: computed here as X_rows @ A_k^T (A_k = A[k RP:(k+1) RP], [RP, IN] row-major), a loop over IN in
    BLOCK_K blocks with tl.dot, float32 accumulation (IEEE where DOT_F32), rounded to the model's dtype as the
    output of F.linear in that dtype is; stored to H (rows in the sample only) for the add kernel. Otherwise
    loaded from H."""
    ranks = tl.arange(0, RP)
    if FACTORED:
        if PROJECT:
            inner = tl.arange(0, BLOCK_K)
            acc = tl.zeros([BLOCK_R, RP], dtype=tl.float32)
            for i0 in range(0, IN, BLOCK_K):
                i = i0 + inner
                i_ok = i < IN
                x = tl.load(X + rows[:, None] * sx + i[None, :], mask=i_ok[None, :], other=0.0)
                a = tl.load(A + (k * RP + ranks)[None, :] * IN + i[:, None], mask=i_ok[:, None], other=0.0)
                if DOT_F32:
                    acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, a, acc)
            h = _rounded(acc, H.dtype.element_ty, ROUND_BF16)
            tl.store(H + rows[:, None] * sh + (k * RP + ranks)[None, :], h, mask=row_ok[:, None])
        else:
            h = tl.load(H + rows[:, None] * sh + (k * RP + ranks)[None, :])
    else:
        h = tl.zeros([BLOCK_R, RP], dtype=H.dtype.element_ty)
    return h


@triton.jit
def _delta(D, h, U, k, rows, cols, col_ok, C, sdk, sdr,
           FACTORED: tl.constexpr, RP: tl.constexpr, DOT_F32: tl.constexpr, ROUND_BF16: tl.constexpr):
    """D_k on `rows` x `cols` in float32, 0 outside the channels (`k` a constexpr or a runtime index).

    Factored: h (H_k on the rows, `_hidden`) @ U_k accumulated in float32 (IEEE products and sums where
    DOT_F32: fp32 models, and bf16 under the interpreter, whose dot cannot read bf16), rounded to the
    model's dtype.
    """
    if FACTORED:
        ranks = tl.arange(0, RP)
        u = tl.load(U + (k * RP + ranks)[:, None] * C + cols[None, :], mask=col_ok, other=0.0)
        if DOT_F32:
            acc = tl.dot(h.to(tl.float32), u.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(h, u)
        d = _rounded(acc, h.dtype, ROUND_BF16).to(tl.float32)
    else:
        d = tl.load(D + k * sdk + rows[:, None] * sdr + cols[None, :], mask=col_ok, other=0.0).to(tl.float32)
    return d


@triton.jit
def _block(F, D, h, U, k, rows, c0, cols0, C, sf, sdk, sdr, F_PAD: tl.constexpr,
           FACTORED: tl.constexpr, RP: tl.constexpr, DOT_F32: tl.constexpr, ROUND_BF16: tl.constexpr):
    """(channels in range [1, BLOCK_C], F, D_k) of one channel block of the rows, in float32; F padded with F_PAD."""
    cols = c0 + cols0
    ok = cols[None, :] < C
    f = tl.load(F + rows[:, None] * sf + cols[None, :], mask=ok, other=F_PAD).to(tl.float32)
    d = _delta(D, h, U, k, rows, cols, ok, C, sdk, sdr, FACTORED, RP, DOT_F32, ROUND_BF16)
    return ok, f, d


@triton.jit
def _token_value(x0, x1, x2, CRIT: tl.constexpr):
    """Per-token value in float64 from its float32 sums (as `divergence`'s finishes)."""
    x0 = x0.to(tl.float64)
    if CRIT == 0:  # KL = b / (1 + a) - log1p(a), clamped at 0 (`_kl_from_parts`); x = [r, a - r, b - r]
        a = x1.to(tl.float64) + x0
        b = x2.to(tl.float64) + x0
        value = tl.maximum(b / (a + 1.0) - _log1p64(a), 0.0)
    elif CRIT == 1:  # JS, summed in float32
        value = x0
    elif CRIT == 2:  # 1 - cos from [F.F, F.D, D.D], as `_cosine_from_parts`
        cross = x1.to(tl.float64)
        delta_sq = x2.to(tl.float64)
        n0 = tl.sqrt(x0)
        n1 = tl.sqrt(tl.maximum(x0 + 2.0 * cross + delta_sq, 0.0))
        norms = n0 * n1
        along = x0 + cross
        safe = tl.where(norms > 0, norms, 1.0)
        stable = tl.maximum(x0 * delta_sq - cross * cross, 0.0) / (safe * (safe + along))
        plain = 1.0 - along / safe
        per_token = tl.where(along > 0, stable, plain)
        value = tl.where(norms > 0, per_token, tl.where(delta_sq > 0, 1.0, 0.0))
    else:  # dot: -F.D
        value = -x0
    return value


@triton.jit
def parts_kernel(F, D, H, U, X, A, PS, T, C, IN, sf, sdk, sdr, sh, sx, N: tl.constexpr, CRIT: tl.constexpr,
                 FACTORED: tl.constexpr, PROJECT: tl.constexpr, RP: tl.constexpr, DOT_F32: tl.constexpr,
                 ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                 EXP_LIMIT: tl.constexpr):
    """Program (sample, block): per delta, the float64 sum of the per-token values of its BLOCK_R rows.

    Per token and delta, the float32 sums over the channels that `divergence` computes - KL:
    [r, a - r, b - r] of `_kl_tokens` (v = D - E_q[D] centred, with the exponent limit; a = E_q[expm1 v],
    b = E_q[v e^v], r = E_q[v]); JS: its value; cosine: [F.F, F.D, D.D]; dot: [F.D] - then the value
    in float64 (`_token_value`). The block is passed over a few times (softmax statistics of F, then
    per delta its q-mean, then its sums), D recomputed on each pass in the factored form from the block's
    H_k (loaded once per delta; with PROJECT computed here from X and A and stored to H, see `_hidden`).
    """
    sample = tl.program_id(0)
    block = tl.program_id(1)
    tok = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = tok < T
    rows = (sample * T + tl.minimum(tok, T - 1)).to(tl.int64)  # rows past the sample read its last; not summed
    out = PS + sample * tl.num_programs(1) + block
    stride_k = tl.num_programs(0) * tl.num_programs(1)
    cols0 = tl.arange(0, BLOCK_C)
    zero = tl.zeros([BLOCK_R], dtype=tl.float32)
    if CRIT <= 1:  # KL, JS: softmax statistics of F (max m, sum s of e^(F - m)), online over channel blocks
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = zero
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            ok = cols[None, :] < C
            f = tl.load(F + rows[:, None] * sf + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(f, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(f - m_new[:, None]), axis=1)
            m = m_new
    for k in tl.static_range(N):
        h = _hidden(H, X, A, k, rows, row_ok, sh, sx, IN, FACTORED, PROJECT, RP, DOT_F32, ROUND_BF16, BLOCK_R,
                    BLOCK_K)
        if CRIT <= 1:
            # the q-mean E_q[D] and max D: the centring and the exponent limit of `_kl_tokens`
            t = zero
            d_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                ok, f, d = _block(F, D, h, U, k, rows, c0, cols0, C, sf, sdk, sdr, float("-inf"),
                                  FACTORED, RP, DOT_F32, ROUND_BF16)
                t += tl.sum(tl.exp(f - m[:, None]) * d, axis=1)
                d_max = tl.maximum(d_max, tl.max(tl.where(ok, d, float("-inf")), axis=1))
            mean = t / s
            centre = mean + tl.maximum(d_max - mean - EXP_LIMIT, 0.0)
            r = zero
            a = zero
            b = zero
            for c0 in range(0, C, BLOCK_C):
                ok, f, d = _block(F, D, h, U, k, rows, c0, cols0, C, sf, sdk, sdr, float("-inf"),
                                  FACTORED, RP, DOT_F32, ROUND_BF16)
                e = tl.exp(f - m[:, None])
                v = tl.where(ok, d - centre[:, None], 0.0)
                phi = _phi(v)
                r += tl.sum(e * v, axis=1)
                a += tl.sum(e * phi, axis=1)  # e^v - 1 - v: KL's a - r, or JS's a
                b += tl.sum(e * v * (phi + v), axis=1)  # v (e^v - 1) = v e^v - v: b - r
            if CRIT == 0:
                value = _token_value(r / s, a / s, b / s, CRIT)
            else:  # JS = E_q[f(t)], t = p / q - 1 = (expm1 v - a) / (1 + a), f as in `_js_tokens_elementwise`
                a_js = (a + r) / s
                js = zero
                for c0 in range(0, C, BLOCK_C):
                    ok, f, d = _block(F, D, h, U, k, rows, c0, cols0, C, sf, sdk, sdr, float("-inf"),
                                      FACTORED, RP, DOT_F32, ROUND_BF16)
                    e = tl.exp(f - m[:, None])
                    v = tl.where(ok, d - centre[:, None], 0.0)
                    tt = (_phi(v) + v - a_js[:, None]) / (1.0 + a_js[:, None])
                    tt = tl.maximum(tt, -1.0 + 2.384185791015625e-07)  # 2^-22, as the eager path
                    first = _log1p(tt / (tt + 2.0)) * tt
                    second = _log1p(tt * tt / (4.0 * (tt + 1.0)))
                    js += tl.sum(tl.where(ok, e * (first - second), 0.0), axis=1)
                value = _token_value(0.5 * js / s, zero, zero, CRIT)
        else:  # cosine: F.F, F.D, D.D; dot: F.D
            ff = zero
            fd = zero
            dd = zero
            for c0 in range(0, C, BLOCK_C):
                ok, f, d = _block(F, D, h, U, k, rows, c0, cols0, C, sf, sdk, sdr, 0.0, FACTORED, RP, DOT_F32,
                                  ROUND_BF16)
                fd += tl.sum(f * d, axis=1)
                if CRIT == 2:
                    ff += tl.sum(f * f, axis=1)
                    dd += tl.sum(d * d, axis=1)
            if CRIT == 2:
                value = _token_value(ff, fd, dd, CRIT)
            else:
                value = _token_value(fd, zero, zero, CRIT)
        tl.store(out + k * stride_k, tl.sum(tl.where(row_ok, value, 0.0), axis=0))


@triton.jit
def _weight(k: tl.constexpr, W0, W1, W2, W3, W4, W5, W6, W7):
    """w_k of Eq. 13's weighted choice (k a constexpr: the choice is made when the kernel is compiled)."""
    return (W0 if k == 0 else W1 if k == 1 else W2 if k == 2 else W3 if k == 3
            else W4 if k == 4 else W5 if k == 5 else W6 if k == 6 else W7)


@triton.jit
def add_kernel(F, D, H, U, PS, OUT, CHOICE, DIV, T, C, sf, sdk, sdr, sh, W0, W1, W2, W3, W4, W5, W6, W7,
               N: tl.constexpr, FACTORED: tl.constexpr, RP: tl.constexpr, DOT_F32: tl.constexpr,
               ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (sample, block): d_k = mean of the sample's per-token values (its PS row, summed in a fixed
    order, so every program of a sample gets the same numbers), the choice (Eq. 13: the first k maximising
    w_k d_k), and OUT = F + D_choice on the block's rows (OUT contiguous [R, C]). The programs of a sample's
    first block also write CHOICE[sample] and DIV[:, sample]."""
    sample = tl.program_id(0)
    block = tl.program_id(1)
    batch = tl.num_programs(0)
    blocks = tl.num_programs(1)
    first = block == 0
    offsets = tl.arange(0, BLOCK_P)
    best = tl.full([1], float("-inf"), tl.float32)
    best_index = tl.full([1], 0, tl.int32)
    for k in tl.static_range(N):
        partial = PS + (k * batch + sample) * blocks
        summed = tl.zeros([BLOCK_P], dtype=tl.float64)
        for p0 in range(0, blocks, BLOCK_P):
            index = p0 + offsets
            summed += tl.load(partial + index, mask=index < blocks, other=0.0)
        mean = (tl.sum(summed, axis=0) / T).to(tl.float32)
        tl.store(DIV + k * batch + sample, mean, mask=first)
        weighted = mean * _weight(k, W0, W1, W2, W3, W4, W5, W6, W7)
        better = weighted > best
        best_index = tl.where(better, k, best_index)
        best = tl.where(better, weighted, best)
    tl.store(CHOICE + sample + tl.arange(0, 1), best_index, mask=first)
    choice = tl.max(best_index, axis=0)
    tok = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = tok < T
    rows = (sample * T + tl.minimum(tok, T - 1)).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_C)
    h = _hidden(H, H, H, choice, rows, row_ok, sh, 0, 0, FACTORED, False, RP, DOT_F32, ROUND_BF16, BLOCK_R, 16)
    for c0 in range(0, C, BLOCK_C):
        ok, f, d = _block(F, D, h, U, choice, rows, c0, cols0, C, sf, sdk, sdr, 0.0, FACTORED, RP, DOT_F32,
                          ROUND_BF16)
        rounded = _rounded(f + d, OUT.dtype.element_ty, ROUND_BF16)
        tl.store(OUT + rows[:, None] * C + (c0 + cols0)[None, :], rounded, mask=row_ok[:, None] & ok)
