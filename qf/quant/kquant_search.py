"""K-quant scale search: ggml's make_q*_quants family, and per-super-block drivers for Q2_K..Q6_K.

Learnt from ggml-quants.c (quantize_row_q*_K_ref without importance, quantize_row_q*_K_impl with a
`quant_weights` importance vector). Every step repeats ggml's float32 operations in the same order
(no FMA, sequential sums, ggml's nearest_int and f16 rounding) so the bytes are identical to ggml's
as ggml-base builds it (no -ffast-math, no FMA contraction); tests/test_codecs_kquants.py checks
that against ggml-quants.c itself when QF_GGML_SRC is set.
Drivers return the super-block scales already rounded through f16, the sub-block scales packed
exactly as ggml packs them (its re-quantization step reads them back), and the per-element codes L;
the bit layout of L belongs to the codecs in qf.quant.codecs.kquants.

The legacy types' importance path (quantize_row_q4_0_impl ... q5_1_impl) reuses the same searches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from qf.format.errors import QFError
from qf.format.ggml_types import QK_K
_F32 = np.float32
GROUP_MAX_EPS = _F32(1e-15)
# Constant arguments of the searches go through these casts: numba types a bare 16 or True as a Literal and
# compiles (and caches) one more copy of the callee per distinct literal; as plain int64/bool every call site
# shares one specialization (bytes unchanged; measured ~20% less cold compile time).
_i = np.int64
_b = np.bool_


class KQuant(NamedTuple):
    """Search result for n super-blocks."""

    d: np.ndarray  # [n] f32, exactly representable in f16 (f32 for Q8_K)
    dmin: np.ndarray  # [n] f32 (zeros for the types without mins)
    scales: np.ndarray  # [n, 12 | 16] u8: sub-block scales packed as in the ggml block
    L: np.ndarray  # [n, 256] u8 (Q6_K/Q3_K: offset codes 0..63 / 0..7; Q8_K: int8 stored as u8)


# ---------------------------------------------------------------- float helpers (numba)

@njit(cache=True, error_model="numpy")
def _f32_mantissa(v):
    """The 23 mantissa bits of float32 v (NaN taken as x86's default NaN)."""
    a = abs(np.float64(v))
    if a != a:
        return 0x400000
    if a == 0.0 or a == np.inf:
        return 0
    if a < 1.1754943508222875e-38:  # subnormal
        return int(math.ldexp(a, 149))
    m, _ = math.frexp(a)
    return int(m * 16777216.0) - 8388608


@njit(cache=True, error_model="numpy")
def nearest_int(f):
    """ggml's nearest_int: mantissa bits of f + 1.5*2^23 (round half to even for |f| < 2^22)."""
    v = f + _F32(12582912.0)
    if v >= _F32(8388608.0) and v < _F32(16777216.0):
        return int(v) - 12582912
    return _f32_mantissa(v) - 0x400000


@njit(cache=True, error_model="numpy")
def f16_round(f):
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f)): f32 -> nearest-even f16 value, as f32."""
    a = abs(np.float64(f))
    if a != a:  # NaN keeps its sign (ggml: sign | 0x7E00); put_f16 stores it the same way
        return f
    if a >= 65520.0:
        r = np.inf
    elif a < 6.103515625e-05:  # f16 subnormal range: quantum 2^-24
        r = np.rint(a * 16777216.0) / 16777216.0
    else:
        _, e = math.frexp(a)
        q = math.ldexp(1.0, e - 11)
        r = np.rint(a / q) * q
    return _F32(-r) if np.signbit(f) else _F32(r)


# ---------------------------------------------------------------- ggml's searches (numba)

@njit(cache=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L, qw, use_qw):
    """Symmetric scale for codes -nmax..nmax-1 (stored +nmax in L), weighted by qw or x^2 (rmse_type 1)."""
    # x: [n] f32, L: [n] int (out), qw: [n] f32 (read when use_qw) -> scale f32
    mx = _F32(0.0)
    amax = _F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F32(0.0)
    iscale = _F32(-nmax) / mx
    sumlx = _F32(0.0)
    suml2 = _F32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l + nmax
        w = qw[i] if use_qw else x[i] * x[i]
        fl = _F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else _F32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_F32(nmax) + _F32(0.1) * _F32(step)) / mx
        sumlx = _F32(0.0)
        suml2 = _F32(0.0)
        for i in range(n):
            fl = _F32(max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))))
            w = qw[i] if use_qw else x[i] * x[i]
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, error_model="numpy")
def make_q3_quants(n, nmax, x, L):
    """Q3_K's x^2-weighted symmetric search with coordinate-descent refinement (do_rmse = true)."""
    # x: [n] f32, L: [n] int (out, codes +nmax) -> scale f32
    mx = _F32(0.0)
    amax = _F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F32(0.0)
    iscale = _F32(-nmax) / mx
    sumlx = _F32(0.0)
    suml2 = _F32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l
        w = x[i] * x[i]
        sumlx += w * x[i] * _F32(l)
        suml2 += w * _F32(l) * _F32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fl = _F32(L[i])
            slx = sumlx - w * x[i] * fl
            if slx > 0:
                sl2 = suml2 - w * fl * fl
                new_l = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    fn = _F32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else _F32(0.0)


@njit(cache=True, error_model="numpy")
def make_qkx_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """Affine codes 0..nmax: weighted fit of (scale, min) over nstep+1 trial grids (make_qkx2/qkx3_quants)."""
    # x, weights: [n] f32; L, Laux: [n] int -> (scale f32, the_min f32 = -min >= 0)
    lo = x[0]
    hi = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < lo:
            lo = x[i]
        if x[i] > hi:
            hi = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if lo > 0:
        lo = _F32(0.0)
    if hi <= lo:  # qkx2 tests ==, qkx3 <=: the same for finite input
        for i in range(n):
            L[i] = 0
        return _F32(0.0), -lo
    iscale = _F32(nmax) / (hi - lo)
    scale = _F32(1.0) / iscale
    best = _F32(0.0)
    for i in range(n):
        L[i] = max(0, min(nmax, nearest_int(iscale * (x[i] - lo))))
        diff = scale * _F32(L[i]) + lo - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best += weights[i] * diff
    if nstep < 1:
        return scale, -lo
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * _F32(step) + _F32(nmax)) / (hi - lo)
        sum_l = _F32(0.0)
        sum_l2 = _F32(0.0)
        sum_xl = _F32(0.0)
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * (x[i] - lo))))
            Laux[i] = l
            w = weights[i]
            fl = _F32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = _F32(0.0)
                this_scale = sum_xl / sum_l2
            cur = _F32(0.0)
            for i in range(n):
                diff = this_scale * _F32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur += weights[i] * diff
            if cur < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = cur
                scale = this_scale
                lo = this_min
    return scale, -lo


@njit(cache=True, error_model="numpy")
def make_qp_quants(n, nmax, x, L, qw):
    """Codes 0..nmax for non-negative x (sub-block scales) under weights qw; returns their scale."""
    # x, qw: [n] f32; L: [n] int (out; ggml keeps it in uint8, so values wrap mod 256)
    mx = _F32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F32(0.0)
    iscale = _F32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = _F32(1.0) / iscale
    best_mse = _F32(0.0)
    for i in range(n):
        diff = x[i] - scale * _F32(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_F32(0.1) * _F32(step) + _F32(nmax)) / mx
        scale_is = _F32(1.0) / iscale_is
        mse = _F32(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * _F32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _F32(0.0)
    suml2 = _F32(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))  # the sums see int l (-1 for IQ2_XXS's flipped x), L its byte
        L[i] = l & 0xFF
        sumlx += qw[i] * x[i] * _F32(l)
        suml2 += qw[i] * _F32(l) * _F32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            fl = _F32(L[i])
            slx = sumlx - w * x[i] * fl
            sl2 = suml2 - w * fl * fl
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = _F32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else _F32(0.0)


# ---------------------------------------------------------------- packed sub-block scales

@njit(cache=True, error_model="numpy")
def pack_scale_min_k4(j, ls, lm, s):
    """Put 6-bit scale ls and min lm of sub-block j (0..7) into the 12 scale bytes s (ggml's OR packing)."""
    ls = np.int64(ls)
    lm = np.int64(lm)
    if j < 4:
        s[j] = ls & 0xFF
        s[j + 4] = lm & 0xFF
    else:
        s[j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
        s[j - 4] = (np.int64(s[j - 4]) | ((ls >> 4) << 6)) & 0xFF
        s[j] = (np.int64(s[j]) | ((lm >> 4) << 6)) & 0xFF


@njit(cache=True, error_model="numpy")
def get_scale_min_k4(j, s):
    """(scale, min) 6-bit codes of sub-block j from the 12 scale bytes of a Q4_K/Q5_K block."""
    if j < 4:
        return np.int64(s[j]) & 63, np.int64(s[j + 4]) & 63
    a, b, c = np.int64(s[j + 4]), np.int64(s[j - 4]), np.int64(s[j])
    return (a & 0xF) | ((b >> 6) << 4), (a >> 4) | ((c >> 6) << 4)


@njit(cache=True, error_model="numpy")
def pack_scale_q3(j, l, s):
    """Put 6-bit code l (0..63) of sub-block j (0..15) into the 12 Q3_K scale bytes s."""
    l = np.int64(l)
    if j < 8:
        s[j] = l & 0xF
    else:
        s[j - 8] = (np.int64(s[j - 8]) | ((l & 0xF) << 4)) & 0xFF
    s[j % 4 + 8] = (np.int64(s[j % 4 + 8]) | ((l >> 4) << (2 * (j // 4)))) & 0xFF


@njit(cache=True, error_model="numpy")
def get_scale_q3(j, s):
    """Signed scale (code - 32) of sub-block j from the 12 Q3_K scale bytes."""
    lo = np.int64(s[j]) & 0xF if j < 8 else np.int64(s[j - 8]) >> 4
    return (lo | (((np.int64(s[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


# ---------------------------------------------------------------- per-super-block drivers (numba)
# Each type: sub-block scales from the plain (quantize_row_*_ref) or the importance (*_impl) path,
# then ggml's final pass that re-derives every code from the rounded, packed scales.

@njit(cache=True, error_model="numpy")
def _sigma2(x, factor):
    """factor * sum(x^2) / 256, summed in order (the *_impl weights' variance term)."""
    sum_x2 = _F32(0.0)
    for l in range(QK_K):
        sum_x2 += x[l] * x[l]
    return _F32(factor) * sum_x2 / _F32(QK_K)


@njit(cache=True, error_model="numpy")
def _impl_weights(xs, qw, sigma2, out):
    """out = qw * sqrt(sigma2 + x^2); returns sum(out)."""
    total = _F32(0.0)
    for l in range(xs.shape[0]):
        out[l] = qw[l] * np.sqrt(sigma2 + xs[l] * xs[l])
    for l in range(xs.shape[0]):
        total += out[l]
    return total


@njit(cache=True, error_model="numpy")
def _q45_k_scales_ref(x, nmax, out_s, L):
    """quantize_row_q4_K_ref / q5_K_ref scale step -> (d, dmin)."""
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    weights = np.empty(32, np.float32)
    Laux = np.empty(32, np.int64)
    rmin, nstep = (_F32(-1.0), 20) if nmax == 15 else (_F32(-0.5), 15)
    max_scale = _F32(0.0)
    max_min = _F32(0.0)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = _F32(0.0)
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / _F32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        scales[j], mins[j] = make_qkx_quants(_i(32), nmax, xs, weights, L[32 * j:32 * j + 32], Laux,
                                             rmin, _F32(0.1), nstep, _b(False))
        max_scale = scales[j] if scales[j] > max_scale else max_scale
        max_min = mins[j] if mins[j] > max_min else max_min
    inv_scale = _F32(63.0) / max_scale if max_scale > 0 else _F32(0.0)
    inv_min = _F32(63.0) / max_min if max_min > 0 else _F32(0.0)
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        pack_scale_min_k4(j, ls, lm, out_s)
    return f16_round(max_scale / _F32(63.0)), f16_round(max_min / _F32(63.0))


@njit(cache=True, error_model="numpy")
def _q45_k_scales_imp(x, qw, nmax, out_s, L):
    """quantize_row_q4_K_impl / q5_K_impl scale step (quant_weights given) -> (d, dmin)."""
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    sw = np.empty(8, np.float32)
    weights = np.empty(32, np.float32)
    Laux = np.empty(32, np.int64)
    sigma2 = _sigma2(x, 2.0)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sw[j] = _impl_weights(xs, qw[32 * j:32 * j + 32], sigma2, weights)
        scales[j], mins[j] = make_qkx_quants(_i(32), nmax, xs, weights, L[32 * j:32 * j + 32], Laux,
                                             _F32(-0.9), _F32(0.05), _i(36), _b(False))
    Ls = np.empty(8, np.int64)
    Lm = np.empty(8, np.int64)
    d_block = make_qp_quants(_i(8), _i(63), scales, Ls, sw)
    m_block = make_qp_quants(_i(8), _i(63), mins, Lm, sw)
    for j in range(8):
        if nmax == 31:  # Q5_K clamps the codes, Q4_K does not
            pack_scale_min_k4(j, min(63, Ls[j]), min(63, Lm[j]), out_s)
        else:
            pack_scale_min_k4(j, Ls[j], Lm[j], out_s)
    return f16_round(d_block), f16_round(m_block)


@njit(cache=True, error_model="numpy")
def q45_k_block(x, qw, use_qw, nmax, out_s, L):
    """One Q4_K (nmax 15) / Q5_K (nmax 31) super-block -> (d, dmin); fills scales out_s[12] and L[256]."""
    for k in range(12):
        out_s[k] = 0
    if use_qw:
        d, dmin = _q45_k_scales_imp(x, qw, nmax, out_s, L)
    else:
        d, dmin = _q45_k_scales_ref(x, nmax, out_s, L)
    for j in range(8):
        sc, m = get_scale_min_k4(j, out_s)
        dd = d * _F32(sc)
        if dd == 0:
            continue
        dm = dmin * _F32(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int((x[32 * j + ii] + dm) / dd)))
    return d, dmin


@njit(cache=True, error_model="numpy")
def _q2_k_scales_ref(x, out_s, L):
    """quantize_row_q2_K_ref scale step -> (d, dmin)."""
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    weights = np.empty(16, np.float32)
    Laux = np.empty(16, np.int64)
    max_scale = _F32(0.0)
    max_min = _F32(0.0)
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        for l in range(16):
            weights[l] = abs(xs[l])
        scales[j], mins[j] = make_qkx_quants(_i(16), _i(3), xs, weights, L[16 * j:16 * j + 16], Laux,
                                             _F32(-0.5), _F32(0.1), _i(15), _b(True))
        max_scale = scales[j] if scales[j] > max_scale else max_scale
        max_min = mins[j] if mins[j] > max_min else max_min
    d = _F32(0.0)
    dmin = _F32(0.0)
    for j in range(16):
        out_s[j] = 0
    if max_scale > 0:
        iscale = _F32(15.0) / max_scale
        for j in range(16):
            out_s[j] = nearest_int(iscale * scales[j]) & 0xFF
        d = f16_round(max_scale / _F32(15.0))
    if max_min > 0:
        iscale = _F32(15.0) / max_min
        for j in range(16):
            out_s[j] = (np.int64(out_s[j]) | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
        dmin = f16_round(max_min / _F32(15.0))
    return d, dmin


@njit(cache=True, error_model="numpy")
def _q2_k_scales_imp(x, qw, out_s, L):
    """quantize_row_q2_K_impl scale step (quant_weights given) -> (d, dmin)."""
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    weights = np.empty(16, np.float32)
    Laux = np.empty(16, np.int64)
    sigma2 = _sigma2(x, 1.0)
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        sw[j] = _impl_weights(xs, qw[16 * j:16 * j + 16], sigma2, weights)
        scales[j], mins[j] = make_qkx_quants(_i(16), _i(3), xs, weights, L[16 * j:16 * j + 16], Laux,
                                             _F32(-0.9), _F32(0.05), _i(36), _b(False))
    Ls = np.empty(16, np.int64)
    Lm = np.empty(16, np.int64)
    dm = make_qp_quants(_i(16), _i(15), scales, Ls, sw)
    mm = make_qp_quants(_i(16), _i(15), mins, Lm, sw)
    for j in range(16):
        out_s[j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
    return f16_round(dm), f16_round(mm)


@njit(cache=True, error_model="numpy")
def q2_k_block(x, qw, use_qw, out_s, L):
    """One Q2_K super-block -> (d, dmin); fills scales out_s[16] (scale | min << 4) and L[256] (0..3)."""
    if use_qw:
        d, dmin = _q2_k_scales_imp(x, qw, out_s, L)
    else:
        d, dmin = _q2_k_scales_ref(x, out_s, L)
    for j in range(16):
        sj = np.int64(out_s[j])
        dd = d * _F32(sj & 0xF)
        if dd == 0:
            continue
        dm = dmin * _F32(sj >> 4)
        for ii in range(16):
            L[16 * j + ii] = max(0, min(3, nearest_int((x[16 * j + ii] + dm) / dd)))
    return d, dmin


@njit(cache=True, error_model="numpy")
def _q3_k_scales_ref(x, out_s, L):
    """quantize_row_q3_K_ref scale step -> d."""
    scales = np.empty(16, np.float32)
    max_scale = _F32(0.0)
    amax = _F32(0.0)
    for j in range(16):
        scales[j] = make_q3_quants(_i(16), _i(4), x[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            max_scale = scales[j]
    if max_scale == 0:
        return _F32(0.0)
    iscale = _F32(-32.0) / max_scale
    for j in range(16):
        l8 = ((nearest_int(iscale * scales[j]) + 128) & 0xFF) - 128  # ggml keeps it in an int8_t
        pack_scale_q3(j, max(-32, min(31, l8)) + 32, out_s)
    return f16_round(_F32(1.0) / iscale)


@njit(cache=True, error_model="numpy")
def _q3_k_scales_imp(x, qw, out_s, L):
    """quantize_row_q3_K_impl scale step (quant_weights given) -> d."""
    scales = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    weight = np.empty(16, np.float32)
    sigma2 = _sigma2(x, 2.0)
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        sw[j] = _impl_weights(xs, qw[16 * j:16 * j + 16], sigma2, weight)
        scales[j] = make_qx_quants(_i(16), _i(4), xs, L[16 * j:16 * j + 16], weight, _b(True))
    Ls = np.empty(16, np.int64)
    d_block = make_qx_quants(_i(16), _i(32), scales, Ls, sw, _b(True))
    for j in range(16):
        pack_scale_q3(j, Ls[j], out_s)
    return f16_round(d_block)


@njit(cache=True, error_model="numpy")
def q3_k_block(x, qw, use_qw, out_s, L):
    """One Q3_K super-block -> d; fills scales out_s[12] and L[256] (codes 0..7 = q + 4)."""
    for k in range(12):
        out_s[k] = 0
    d = _q3_k_scales_imp(x, qw, out_s, L) if use_qw else _q3_k_scales_ref(x, out_s, L)
    for j in range(16):
        dd = d * _F32(get_scale_q3(j, out_s))
        if dd == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-4, min(3, nearest_int(x[16 * j + ii] / dd))) + 4
    return d


@njit(cache=True, error_model="numpy")
def q6_k_block(x, qw, use_qw, out_s, L):
    """One Q6_K super-block (ref, or impl with qw as the weights) -> d; fills int8 scales out_s[16], L[256] (q + 32)."""
    scales = np.empty(16, np.float32)
    max_scale = _F32(0.0)
    max_abs_scale = _F32(0.0)
    for ib in range(16):
        scales[ib] = make_qx_quants(_i(16), _i(32), x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16],
                                    qw[16 * ib:16 * ib + 16], use_qw)
        if abs(scales[ib]) > max_abs_scale:
            max_abs_scale = abs(scales[ib])
            max_scale = scales[ib]
    if max_abs_scale < GROUP_MAX_EPS:  # ggml zeroes the whole block
        out_s[:] = 0
        L[:] = 0
        return _F32(0.0)
    iscale = _F32(-128.0) / max_scale
    d = f16_round(_F32(1.0) / iscale)
    for ib in range(16):
        out_s[ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
    for j in range(16):
        sc = np.int64(out_s[j])
        dd = d * _F32(sc - 256 if sc > 127 else sc)
        if dd == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, nearest_int(x[16 * j + ii] / dd))) + 32
    return d


@njit(cache=True, error_model="numpy")
def q8_k_block(x, L, bsums):
    """One Q8_K super-block (quantize_row_q8_K_ref) -> d (f32); L[256] int8 codes, bsums[16]."""
    mx = _F32(0.0)
    amax = _F32(0.0)
    for j in range(QK_K):
        ax = abs(x[j])
        if ax > amax:
            amax = ax
            mx = x[j]
    if amax == 0:
        for j in range(QK_K):
            L[j] = 0
        for j in range(16):
            bsums[j] = 0
        return _F32(0.0)
    iscale = _F32(-127.0) / mx
    for j in range(QK_K):
        L[j] = min(127, nearest_int(iscale * x[j]))
    for j in range(16):
        s = 0
        for ii in range(16):
            s += L[16 * j + ii]
        bsums[j] = s
    return _F32(1.0) / iscale


# ---------------------------------------------------------------- block loops (numba)

@njit(cache=True, error_model="numpy", parallel=True)
def _search_affine(x, qw, use_qw, kind, d, dmin, s, L):
    """kind 2 -> Q2_K, 4 -> Q4_K, 5 -> Q5_K over x [n, 256]; super-blocks in parallel."""
    for i in prange(x.shape[0]):
        Lb = np.empty(QK_K, np.int64)
        if kind == 2:
            di, mi = q2_k_block(x[i], qw[i], use_qw, s[i], Lb)
        else:
            di, mi = q45_k_block(x[i], qw[i], use_qw, 15 if kind == 4 else 31, s[i], Lb)
        d[i] = di
        dmin[i] = mi
        for k in range(QK_K):
            L[i, k] = Lb[k]


@njit(cache=True, error_model="numpy", parallel=True)
def _search_symmetric(x, qw, use_qw, kind, d, s, L):
    """kind 3 -> Q3_K, 6 -> Q6_K over x [n, 256]; super-blocks in parallel."""
    for i in prange(x.shape[0]):
        Lb = np.empty(QK_K, np.int64)
        if kind == 3:
            d[i] = q3_k_block(x[i], qw[i], use_qw, s[i], Lb)
        else:
            d[i] = q6_k_block(x[i], qw[i], use_qw, s[i], Lb)
        for k in range(QK_K):
            L[i, k] = Lb[k]


@njit(cache=True, error_model="numpy")
def _search_q8_k(x, d, L, bsums):
    """Q8_K over x [n, 256]."""
    Lb = np.empty(QK_K, np.int64)
    bs = np.empty(16, np.int64)
    for i in range(x.shape[0]):
        d[i] = q8_k_block(x[i], Lb, bs)
        for k in range(QK_K):
            L[i, k] = Lb[k] & 0xFF
        for k in range(16):
            bsums[i, k] = bs[k]


@njit(cache=True, error_model="numpy", parallel=True)
def _search_legacy_rows(rows, qw, nmax, affine, d, m, L):
    """quantize_row_q4_0/q4_1/q5_0/q5_1_impl: per row sigma2, per 32-block weighted search; rows in parallel."""
    # rows, qw: [r, ne0] f32 -> d, m: [r * ne0 / 32] f32, L: [r * ne0 / 32, 32] u8
    ne0 = rows.shape[1]
    nb = ne0 // 32
    for r in prange(rows.shape[0]):
        weight = np.empty(32, np.float32)
        Lb = np.empty(32, np.int64)
        Laux = np.empty(32, np.int64)
        x = rows[r]
        sum_x2 = _F32(0.0)
        for j in range(ne0):
            sum_x2 += x[j] * x[j]
        sigma2 = sum_x2 / _F32(ne0)
        for ib in range(nb):
            xb = x[32 * ib:32 * ib + 32]
            for j in range(32):
                weight[j] = qw[r, 32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j])
            k = r * nb + ib
            if affine:
                scale, the_min = make_qkx_quants(_i(32), nmax, xb, weight, Lb, Laux, _F32(-0.9), _F32(0.05),
                                                 _i(36), _b(False))
                d[k] = scale
                m[k] = -the_min
            else:
                d[k] = make_qx_quants(_i(32), nmax, xb, Lb, weight, _b(True))
                m[k] = _F32(0.0)
            for j in range(32):
                L[k, j] = Lb[j]


# ---------------------------------------------------------------- Python entry points

N_SCALE_BYTES = {2: 16, 3: 12, 4: 12, 5: 12, 6: 16}


def _owned_f32(x: np.ndarray, n_cols: int) -> np.ndarray:
    """x as a writable C-contiguous f32 [-1, n_cols] (a copy only when x is read-only or not f32 C-order).

    numba types read-only and writable arrays differently and compiles (and caches) the whole call tree once
    per combination; mmap views (safetensors F32, GGUF tensors) are read-only, fresh arrays are not. Passing
    only writable arrays keeps one signature per kernel, so a process never recompiles for the other flavour.
    """
    return np.require(x, np.float32, ("C", "W")).reshape(-1, n_cols)


def check_importance(importance: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Importance as C-contiguous f32 of `shape`: finite and >= 0, else QFError."""
    w = np.array(np.broadcast_to(np.asarray(importance, dtype=np.float32), shape), order="C")  # own, writable
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise QFError(f"importance for {what} must be finite and non-negative")
    return w


def search_k(x: np.ndarray, bits: int, importance: np.ndarray | None = None) -> KQuant:
    """ggml's K-quant search for Q{bits}_K (bits 2..6) over finite x: f32 [n, 256]."""
    if bits not in N_SCALE_BYTES:
        raise ValueError(f"no K-quant search for {bits} bits")
    x = _owned_f32(x, QK_K)
    n = x.shape[0]
    use_qw = importance is not None
    qw = check_importance(importance, x.shape, f"Q{bits}_K") if use_qw else np.zeros((n, QK_K), np.float32)
    d = np.empty(n, np.float32)
    dmin = np.zeros(n, np.float32)
    s = np.zeros((n, N_SCALE_BYTES[bits]), np.uint8)
    L = np.empty((n, QK_K), np.uint8)
    if bits in (2, 4, 5):
        _search_affine(x, qw, use_qw, bits, d, dmin, s, L)
    else:
        _search_symmetric(x, qw, use_qw, bits, d, s, L)
    return KQuant(d, dmin, s, L)


def search_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q8_K_ref over finite x: f32 [n, 256] -> (d f32 [n], q int8 [n, 256], bsums int16 [n, 16])."""
    x = _owned_f32(x, QK_K)
    n = x.shape[0]
    d = np.empty(n, np.float32)
    L = np.empty((n, QK_K), np.uint8)
    bsums = np.empty((n, 16), np.int16)
    _search_q8_k(x, d, L, bsums)
    return d, L.view(np.int8), bsums


def search_legacy(rows: np.ndarray, importance: np.ndarray, nmax: int, affine: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's importance-weighted search for Q4_0 (nmax 8), Q5_0 (16), Q4_1 (15, affine), Q5_1 (31, affine).

    rows: finite f32 [r, ne0] (sigma2 is taken per row, as ggml does); importance broadcastable to rows.
    Returns d f32 [nb], m f32 [nb] (the added min; zeros when not affine), L u8 [nb, 32] codes (nb = r*ne0/32).
    """
    rows = _owned_f32(rows, rows.shape[-1])
    qw = check_importance(importance, rows.shape, "a legacy type")
    nb = rows.size // 32
    d = np.empty(nb, np.float32)
    m = np.empty(nb, np.float32)
    L = np.empty((nb, 32), np.uint8)
    _search_legacy_rows(rows, qw, nmax, affine, d, m, L)
    return d, m, L


# ---------------------------------------------------------------- plain rounding (baseline, no search)

_PLAIN = {  # bits -> (elements per sub-block, top code, affine, sub-block scale levels)
    2: (16, 3, True, 15), 3: (16, 4, False, 32), 4: (32, 15, True, 63), 5: (32, 31, True, 63), 6: (16, 32, False, 128),
}


def _f16_values(v: np.ndarray) -> np.ndarray:
    """f32 values rounded through f16."""
    return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit codes sc, m: int [n, 8] -> the 12 Q4_K/Q5_K scale bytes [n, 12] (pack_scale_min_k4, vectorized)."""
    s = np.empty((sc.shape[0], 12), np.int64)
    s[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return s.astype(np.uint8)


def _pack_q3_scales(l: np.ndarray) -> np.ndarray:
    """6-bit codes l: int [n, 16] (scale + 32) -> the 12 Q3_K scale bytes [n, 12] (pack_scale_q3, vectorized)."""
    s = np.empty((l.shape[0], 12), np.int64)
    s[:, 0:8] = (l[:, 0:8] & 0xF) | ((l[:, 8:16] & 0xF) << 4)
    hi = l >> 4
    s[:, 8:12] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    return s.astype(np.uint8)


def search_k_plain(x: np.ndarray, bits: int) -> KQuant:
    """Plain rounding in the Q{bits}_K layout: sub-block min/max (or signed max) scales, no search.

    Fast and worse than search_k; the baseline that ggml's search is measured against.
    """
    sub, nmax, affine, levels = _PLAIN[bits]
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK_K)
    n = x.shape[0]
    xs = x.reshape(n, QK_K // sub, sub)  # [n, n_sub, sub]
    with np.errstate(divide="ignore", invalid="ignore"):
        if affine:
            lo = np.minimum(xs.min(axis=-1), 0)
            scale, mins = (xs.max(axis=-1) - lo) / nmax, -lo  # [n, n_sub]
            ms, mm = scale.max(axis=-1), mins.max(axis=-1)  # [n]
            d, dmin = _f16_values(ms / levels), _f16_values(mm / levels)
            sc = np.where(ms[:, None] > 0, np.rint(scale / ms[:, None] * levels), 0).astype(np.int64)
            m = np.where(mm[:, None] > 0, np.rint(mins / mm[:, None] * levels), 0).astype(np.int64)
            packed = (sc | (m << 4)).astype(np.uint8) if bits == 2 else _pack_k4_scales(sc, m)
            eff_d, eff_m = d[:, None] * sc, dmin[:, None] * m
            q = np.where(eff_d[..., None] > 0, np.rint((xs + eff_m[..., None]) / eff_d[..., None]), 0)
            L = np.clip(q, 0, nmax)
        else:
            at = np.abs(xs).argmax(axis=-1)[..., None]
            scale = np.take_along_axis(xs, at, axis=-1)[..., 0] / -nmax  # [n, n_sub], signed like ggml
            ms = np.take_along_axis(scale, np.abs(scale).argmax(axis=-1)[:, None], axis=-1)[:, 0]
            iscale = np.where(ms != 0, -levels / ms, 0)
            code = np.clip(np.rint(iscale[:, None] * scale), -levels, levels - 1).astype(np.int64)
            d = _f16_values(np.where(ms != 0, 1 / iscale, 0))
            packed = _pack_q3_scales(code + 32) if bits == 3 else code.astype(np.int8).view(np.uint8)
            eff = d[:, None] * code
            q = np.where(eff[..., None] != 0, np.rint(xs / eff[..., None]), 0)
            L = np.clip(q, -nmax, nmax - 1) + nmax
            dmin = np.zeros(n, np.float32)
    return KQuant(d.astype(np.float32), dmin.astype(np.float32), packed, L.reshape(n, QK_K).astype(np.uint8))
