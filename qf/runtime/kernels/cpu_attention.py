"""CPU KV-cache kernels: store keys/values in f32, f16, q8_0 or q4_0 and attend over them, per row.

Every row of a batch carries its own KV slot and position, so one call serves a prefill chunk of one
sequence (consecutive positions in one slot) and a decode step of several sequences (one row per slot)
alike. A cache tensor is `data` [slots, Hkv, T, D or bytes] plus `scales` [slots, Hkv, T, D / 32]:

    f32   data f32 [S, H, T, D]                 scales unused (shape [1, 1, 1, 1])
    f16   data u16 [S, H, T, D] (IEEE half bits)   scales unused
    q8_0  data i8  [S, H, T, D]                 scales u16 [S, H, T, D / 32] (fp16 d): x = q * d
    q4_0  data u8  [S, H, T, D / 2]             scales u16 [S, H, T, D / 32]: x = (q - 8) * d, ggml's nibble order

The quantizers are ggml's reference ones (quantize_row_q8_0_ref / quantize_row_q4_0_ref), so a stored row
dequantizes exactly as gguf.quants would dequantize ggml's own bytes. The decoder is picked at compile time
from data's dtype (one compiled attention per K/V type pair in use).

Two attentions: `attention_parallel` / `attention_serial` go row by row (any mix of slots and positions:
decode steps), each row reading its keys and values as 16-lane vectors (`load16`, decoded in registers) where
D is a multiple of 16. `attention_flash` serves a prefill chunk (consecutive positions of one slot): each
chunk decodes a kv head's keys and values to f32 once, as its tiles first need them; a tile of QT query
positions (times the group of query heads of one kv head) scores KT keys at a time with 16-lane vector
products, four rows per key vector, and keeps a running max and sum per row (online softmax), so the work per
key is shared by the whole tile.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from qf.runtime.kernels.cpu_pool import run_shares
from qf.runtime.kernels.cpu_simd import (f16_bits, ld_bits, ld_f16, ld_i8, vadd, vexp, vfma, vhmax, vload, vmax, vmul,
                                         vsplat, vstore, vstore_f16, vsum, vzero)

QBLOCK = 32  # elements per q8_0 / q4_0 block
# The row kernels' float flags: fast math without reassociation, so that a row's sums are the same in the
# serial and the parallel kernel (exact rows of a multi-sequence decode step); the vectors sum in the order
# written (vsum's lane tree aside).
ROW_MATH = {"contract", "nnan", "ninf", "nsz", "arcp", "afn"}
# IEEE half bits -> f32, the decoder of f16 caches and of q8_0/q4_0 scales (256 KiB, stays in L2)
F16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def read_row(data, scales, tab, s, h, t, out):
    """out[:] = row (s, h, t) of a cache tensor, dequantized to f32 (specialised on data's dtype)."""


@overload(read_row, inline="always")
def _ov_read_row(data, scales, tab, s, h, t, out):
    """Pick the row decoder for the cache type at compile time."""
    dt = data.dtype
    if dt == types.float32:
        def f32_row(data, scales, tab, s, h, t, out):
            for d in range(out.shape[0]):
                out[d] = data[s, h, t, d]
        return f32_row
    if dt == types.uint16:
        def f16_row(data, scales, tab, s, h, t, out):
            for d in range(out.shape[0]):
                out[d] = tab[data[s, h, t, d]]
        return f16_row
    if dt == types.int8:
        def q8_row(data, scales, tab, s, h, t, out):
            for b in range(out.shape[0] // QBLOCK):
                sc = tab[scales[s, h, t, b]]
                for j in range(QBLOCK):
                    out[b * QBLOCK + j] = np.float32(data[s, h, t, b * QBLOCK + j]) * sc
        return q8_row
    if dt == types.uint8:
        def q4_row(data, scales, tab, s, h, t, out):
            half = QBLOCK // 2
            for b in range(out.shape[0] // QBLOCK):
                sc = tab[scales[s, h, t, b]]
                for j in range(half):
                    byte = np.int32(data[s, h, t, b * half + j])
                    out[b * QBLOCK + j] = np.float32((byte & 15) - 8) * sc
                    out[b * QBLOCK + half + j] = np.float32((byte >> 4) - 8) * sc
        return q4_row
    return None


@numba.njit(cache=True, inline="always")
def _flat(data, s, h, t):
    """Flat index of row (s, h, t)'s first element in a C-contiguous [S, H, T, cols] array."""
    return ((s * data.shape[1] + h) * data.shape[2] + t) * data.shape[3]


def load16(data, scales, tab, s, h, t, d):
    """Values d .. d + 15 (d a multiple of 16) of row (s, h, t) of a C-contiguous cache tensor as f32x16
    (specialised on data's dtype)."""


@overload(load16, inline="always")
def _ov_load16(data, scales, tab, s, h, t, d):
    """Pick the 16-lane loader for the cache type at compile time."""
    dt = data.dtype
    if dt == types.float32:
        return lambda data, scales, tab, s, h, t, d: vload(data, _flat(data, s, h, t) + d)
    if dt == types.uint16:
        return lambda data, scales, tab, s, h, t, d: ld_f16(data, _flat(data, s, h, t) + d)
    if dt == types.int8:
        def q8_16(data, scales, tab, s, h, t, d):
            return vmul(ld_i8(data, _flat(data, s, h, t) + d), vsplat(tab[scales[s, h, t, d // QBLOCK]]))
        return q8_16
    if dt == types.uint8:
        def q4_16(data, scales, tab, s, h, t, d):
            off = _flat(data, s, h, t) + (d // QBLOCK) * (QBLOCK // 2)
            q = ld_bits(data, off, (d % QBLOCK) // 4, 15)  # d % 32 = 16: the high nibbles
            return vmul(vadd(q, vsplat(-8.0)), vsplat(tab[scales[s, h, t, d // QBLOCK]]))
        return q4_16
    return None


@numba.njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _softmax(s, g, n):
    """s[g, :n] = softmax(s[g, :n]) in place, 16 lanes at a time (vexp) and the tail one by one; s: C-contiguous
    [rows, >= n] f32."""
    row = g * s.shape[1]
    n16 = n - n % 16
    best = s[g, 0]
    if n16:
        mv = vload(s, row)
        for t in range(16, n16, 16):
            mv = vmax(mv, vload(s, row + t))
        best = vhmax(mv)
    for t in range(n16, n):
        best = max(best, s[g, t])
    neg = vsplat(-best)
    total = np.float32(0.0)
    for t in range(0, n16, 16):
        e = vexp(vadd(vload(s, row + t), neg))
        vstore(s, row + t, e)
        total += vsum(e)
    for t in range(n16, n):
        e = np.exp(s[g, t] - best)
        s[g, t] = e
        total += e
    inv = np.float32(1.0) / total
    for t in range(n):
        s[g, t] *= inv


@numba.njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _attend_row_vec(q, kd, ks, vd, vs, tab, slot, p, sc, window, m, kvh, out, qv, s):
    """_attend_row for D a multiple of 16, 16 lanes at a time: each key is read once per query head of the
    group as vectors (f16 widened by vcvtph2ps), the softmax runs on vexp, and each output vector sums its keys
    in two chains. qv: [group, D] f32 scratch; s: [group, >= p + 1] f32 scratch."""
    dim = q.shape[2]
    nv = dim // 16
    group = q.shape[1] // kd.shape[1]
    h0 = kvh * group
    t0 = max(0, p + 1 - window) if window > 0 else 0
    n_keys = p + 1 - t0
    for g in range(group):
        for d in range(dim):
            qv[g, d] = q[m, h0 + g, d] * sc
    for t in range(n_keys):
        for g in range(group):
            acc = vzero()
            for c in range(nv):
                acc = vfma(vload(qv, g * dim + 16 * c), load16(kd, ks, tab, slot, kvh, t0 + t, 16 * c), acc)
            s[g, t] = vsum(acc)
    for g in range(group):
        _softmax(s, g, n_keys)
    for c in range(nv):
        for g in range(group):
            a0 = vzero()
            a1 = vzero()
            for t in range(0, n_keys - 1, 2):
                a0 = vfma(vsplat(s[g, t]), load16(vd, vs, tab, slot, kvh, t0 + t, 16 * c), a0)
                a1 = vfma(vsplat(s[g, t + 1]), load16(vd, vs, tab, slot, kvh, t0 + t + 1, 16 * c), a1)
            if n_keys % 2:
                a0 = vfma(vsplat(s[g, n_keys - 1]), load16(vd, vs, tab, slot, kvh, t0 + n_keys - 1, 16 * c), a0)
            vstore(qv, g * dim + 16 * c, vadd(a0, a1))
    for g in range(group):
        for d in range(dim):
            out[m, h0 + g, d] = qv[g, d]


@numba.njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _attend_row(q, kd, ks, vd, vs, tab, slot, p, sc, window, m, kvh, out, kbuf, s):
    """Row m (position p, slot `slot`) attends with its group of query heads of kv head kvh.

    out[m, h] = softmax(q[m, h] . K[t0 : p + 1] * sc) @ V[t0 : p + 1]; t0 = max(0, p - window + 1) when
    window > 0, else 0. q, out: [M, H, D]; kbuf: [D] f32 scratch; s: [group, >= p + 1] f32 scratch.
    """
    dim = q.shape[2]
    group = q.shape[1] // kd.shape[1]
    h0 = kvh * group
    t0 = max(0, p + 1 - window) if window > 0 else 0
    n_keys = p + 1 - t0
    for t in range(n_keys):
        read_row(kd, ks, tab, slot, kvh, t0 + t, kbuf)
        for g in range(group):
            acc = np.float32(0.0)
            for d in range(dim):
                acc += q[m, h0 + g, d] * kbuf[d]
            s[g, t] = acc * sc
    for g in range(group):
        _softmax(s, g, n_keys)
        for d in range(dim):
            out[m, h0 + g, d] = 0.0
    for t in range(n_keys):
        read_row(vd, vs, tab, slot, kvh, t0 + t, kbuf)
        for g in range(group):
            pr = s[g, t]
            for d in range(dim):
                out[m, h0 + g, d] += pr * kbuf[d]


# Two separately named functions: numba's cache is keyed by function, not by the `parallel` flag.
@numba.njit(cache=True, parallel=True, fastmath=ROW_MATH, error_model="numpy")
def attention_parallel(q, kd, ks, vd, vs, tab, slots, pos, scale, window, out):
    """Causal GQA attention of rows q [M, H, D] at (slots[m], pos[m]) -> out [M, H, D]; one job per (row, kv head)."""
    n_kv = kd.shape[1]
    group = q.shape[1] // n_kv
    for job in numba.prange(q.shape[0] * n_kv):
        m = job // n_kv
        s = np.empty((group, pos[m] + 1), dtype=np.float32)
        _row_job(q, kd, ks, vd, vs, tab, slots[m], pos[m], np.float32(scale), window, m, job % n_kv, out,
                 np.empty((group, q.shape[2]), dtype=np.float32), s)


@numba.njit(cache=True, fastmath=ROW_MATH, error_model="numpy")
def attention_serial(q, kd, ks, vd, vs, tab, slots, pos, scale, window, out):
    """The same attention on the calling thread (small problems: a decode step over a short context)."""
    n_kv = kd.shape[1]
    group = q.shape[1] // n_kv
    buf = np.empty((group, q.shape[2]), dtype=np.float32)
    s = np.empty((group, pos.max() + 1), dtype=np.float32)
    for job in range(q.shape[0] * n_kv):
        m = job // n_kv
        _row_job(q, kd, ks, vd, vs, tab, slots[m], pos[m], np.float32(scale), window, m, job % n_kv, out, buf, s)


@numba.njit(cache=True, fastmath=ROW_MATH, error_model="numpy", inline="always")
def _row_job(q, kd, ks, vd, vs, tab, slot, p, sc, window, m, kvh, out, buf, s):
    """One (row, kv head) job: the vector kernel when D is a multiple of 16, else the scalar one (buf [group, D])."""
    if q.shape[2] % 16 == 0:
        _attend_row_vec(q, kd, ks, vd, vs, tab, slot, p, sc, window, m, kvh, out, buf, s)
    else:
        _attend_row(q, kd, ks, vd, vs, tab, slot, p, sc, window, m, kvh, out, buf[0], s)


@numba.njit(cache=True, fastmath=False, error_model="numpy")
def store_rows(x, data, slots, pos):
    """Rows x [M, H, D] f32 -> an f32 or f16 (u16 bits, rounded to nearest even as numpy's astype) cache
    tensor at (slots[m], :, pos[m]); 16 values at a time where D allows."""
    dim = x.shape[2]
    for m in range(x.shape[0]):
        for h in range(x.shape[1]):
            row = x[m, h]
            o = _flat(data, slots[m], h, pos[m])
            _store16(data, o, row, dim - dim % 16)
            for d in range(dim - dim % 16, dim):
                data[slots[m], h, pos[m], d] = _cache_value(data, row[d])


def _store16(data, o, row, n):
    """data.flat[o : o + n] = row[:n] in the cache's element type, 16 at a time (n a multiple of 16)."""


@overload(_store16, inline="always")
def _ov_store16(data, o, row, n):
    """f32 copy or f16 rounding, picked at compile time."""
    if data.dtype == types.uint16:
        def f16(data, o, row, n):
            for d in range(0, n, 16):
                vstore_f16(data, o + d, vload(row, d))
        return f16
    if data.dtype == types.float32:
        def f32(data, o, row, n):
            for d in range(0, n, 16):
                vstore(data, o + d, vload(row, d))
        return f32
    return None


def _cache_value(data, v):
    """One f32 value in the cache's element type (f32, or f16 bits)."""


@overload(_cache_value, inline="always")
def _ov_cache_value(data, v):
    """Identity for f32 caches, f16 bits for u16 ones."""
    if data.dtype == types.uint16:
        return lambda data, v: f16_bits(v)
    return lambda data, v: v


@numba.njit(cache=True, fastmath=False, error_model="numpy")
def store_q8_0(x, data, d_out, slots, pos):
    """Rows x [M, H, D] f32 -> q8_0 quants at (slots[m], :, pos[m]) as ggml's quantize_row_q8_0_ref does;
    the f32 block scales go to d_out [M, H, D / 32] (the caller rounds them to fp16, as ggml does)."""
    for m in range(x.shape[0]):
        for h in range(x.shape[1]):
            for b in range(x.shape[2] // QBLOCK):
                amax = np.float32(0.0)
                for j in range(QBLOCK):
                    amax = max(amax, abs(x[m, h, b * QBLOCK + j]))
                d = amax / np.float32(127.0)
                inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
                d_out[m, h, b] = d
                for j in range(QBLOCK):
                    data[slots[m], h, pos[m], b * QBLOCK + j] = np.int8(_roundf(x[m, h, b * QBLOCK + j] * inv))


@numba.njit(cache=True, fastmath=False, error_model="numpy")
def store_q4_0(x, data, d_out, slots, pos):
    """Rows x [M, H, D] f32 -> q4_0 nibbles at (slots[m], :, pos[m]) as ggml's quantize_row_q4_0_ref does;
    the f32 block scales go to d_out [M, H, D / 32]."""
    half = QBLOCK // 2
    for m in range(x.shape[0]):
        for h in range(x.shape[1]):
            for b in range(x.shape[2] // QBLOCK):
                amax = np.float32(0.0)
                vmax = np.float32(0.0)
                for j in range(QBLOCK):
                    v = x[m, h, b * QBLOCK + j]
                    if amax < abs(v):
                        amax = abs(v)
                        vmax = v
                d = vmax / np.float32(-8.0)
                inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
                d_out[m, h, b] = d
                for j in range(half):
                    lo = min(15, np.int32(x[m, h, b * QBLOCK + j] * inv + np.float32(8.5)))
                    hi = min(15, np.int32(x[m, h, b * QBLOCK + half + j] * inv + np.float32(8.5)))
                    data[slots[m], h, pos[m], b * half + j] = np.uint8(lo | (hi << 4))


@numba.njit(cache=True, inline="always")
def _roundf(v):
    """C's roundf: halves away from zero."""
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


# ---------------------------------------------------------------------------------------------------------
# Tiled attention of a prefill chunk (flash-style: online softmax over key tiles).

QT = 16  # query positions per tile (times the group of query heads that share a kv head)
KT = 64  # keys per tile: 4 vectors of 16 lanes

NO_MAX = np.float32(-1e30)  # the running max before any key (finite: the kernels assume no infinities)


@numba.njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _store_row(a, i, v0, v1, v2, v3):
    """a.flat[i : i + 64] = v0, v1, v2, v3."""
    vstore(a, i, v0)
    vstore(a, i + 16, v1)
    vstore(a, i + 32, v2)
    vstore(a, i + 48, v3)


@numba.njit(cache=True, fastmath=True, error_model="numpy")
def _flash_tile(q, kc, vc, base, n_kv, pos0, scale, window, out, r0, r1, kvh, qs, s, o, mx, lsum, alpha):
    """Query rows r0 .. r1 - 1 (positions pos0 + r) of the query heads of kv head kvh -> out, over that head's
    keys decoded to f32 from position base on (kc [D, cap]: keys transposed; vc [cap, D]: values).

    Scratch: qs [R, D] (scaled queries, R = QT * group + 3 rows, row i = position i // group, head i % group),
    s [R, KT] scores / probabilities, o [R, D] running outputs, mx / lsum / alpha [R] running max, sum and
    rescale factor.
    """
    dim = q.shape[2]
    group = q.shape[1] // n_kv
    cap = kc.shape[1]
    h0 = kvh * group
    rows = (r1 - r0) * group
    rp = (rows + 3) // 4 * 4  # rows in fours: zero pad rows at the end
    for i in range(rp):
        mx[i] = NO_MAX
        lsum[i] = 0.0
        for d in range(dim):
            o[i, d] = 0.0
            qs[i, d] = q[r0 + i // group, h0 + i % group, d] * scale if i < rows else 0.0
    p_first = pos0 + r0
    p_last = pos0 + r1 - 1
    k_lo = max(0, p_first + 1 - window) if window > 0 else 0
    nv = dim // 16
    for k0 in range(k_lo - k_lo % KT, p_last + 1, KT):
        n = min(KT, p_last + 1 - k0)
        ko = k0 - base  # this tile's first column of kc, row of vc
        # scores of four rows at a time against the 64 keys (16 accumulators: each key vector serves 4 rows)
        for i in range(0, rp, 4):
            a0 = vzero()
            a1 = vzero()
            a2 = vzero()
            a3 = vzero()
            b0 = vzero()
            b1 = vzero()
            b2 = vzero()
            b3 = vzero()
            c0 = vzero()
            c1 = vzero()
            c2 = vzero()
            c3 = vzero()
            e0 = vzero()
            e1 = vzero()
            e2 = vzero()
            e3 = vzero()
            for d in range(dim):
                x = vsplat(qs[i, d])
                y = vsplat(qs[i + 1, d])
                z = vsplat(qs[i + 2, d])
                w = vsplat(qs[i + 3, d])
                k = vload(kc, d * cap + ko)
                a0 = vfma(x, k, a0)
                b0 = vfma(y, k, b0)
                c0 = vfma(z, k, c0)
                e0 = vfma(w, k, e0)
                k = vload(kc, d * cap + ko + 16)
                a1 = vfma(x, k, a1)
                b1 = vfma(y, k, b1)
                c1 = vfma(z, k, c1)
                e1 = vfma(w, k, e1)
                k = vload(kc, d * cap + ko + 32)
                a2 = vfma(x, k, a2)
                b2 = vfma(y, k, b2)
                c2 = vfma(z, k, c2)
                e2 = vfma(w, k, e2)
                k = vload(kc, d * cap + ko + 48)
                a3 = vfma(x, k, a3)
                b3 = vfma(y, k, b3)
                c3 = vfma(z, k, c3)
                e3 = vfma(w, k, e3)
            _store_row(s, i * KT, a0, a1, a2, a3)
            _store_row(s, (i + 1) * KT, b0, b1, b2, b3)
            _store_row(s, (i + 2) * KT, c0, c1, c2, c3)
            _store_row(s, (i + 3) * KT, e0, e1, e2, e3)
        # online softmax: keys lo .. hi - 1 of this tile are visible to row i
        for i in range(rp):
            p = p_first + i // group
            hi = min(n, p + 1 - k0) if i < rows else 0
            lo = max(0, p + 1 - window - k0) if window > 0 else 0
            if hi <= lo:
                alpha[i] = 1.0
                for t in range(KT):
                    s[i, t] = 0.0
                continue
            if lo == 0 and hi == KT:  # a whole tile (most of them): 16 lanes at a time
                best = vhmax(vmax(vmax(vload(s, i * KT), vload(s, i * KT + 16)),
                                  vmax(vload(s, i * KT + 32), vload(s, i * KT + 48))))
            else:
                best = s[i, lo]
                for t in range(lo + 1, hi):
                    best = max(best, s[i, t])
            m_new = max(mx[i], best)
            alpha[i] = np.exp(mx[i] - m_new)
            mx[i] = m_new
            ms = vsplat(-m_new)
            for j in range(KT // 16):
                vstore(s, i * KT + 16 * j, vexp(vadd(vload(s, i * KT + 16 * j), ms)))
            for t in range(lo):
                s[i, t] = 0.0
            for t in range(hi, KT):
                s[i, t] = 0.0
            tot = vsum(vload(s, i * KT)) + vsum(vload(s, i * KT + 16)) + vsum(vload(s, i * KT + 32)) \
                + vsum(vload(s, i * KT + 48))
            lsum[i] = lsum[i] * alpha[i] + tot
        # o = o * alpha + p @ v, four rows and up to 64 values of a row at a time
        for i in range(0, rp, 4):
            ax = vsplat(alpha[i])
            ay = vsplat(alpha[i + 1])
            az = vsplat(alpha[i + 2])
            aw = vsplat(alpha[i + 3])
            j = 0
            while j + 4 <= nv:
                c = 16 * j
                a0 = vmul(vload(o, i * dim + c), ax)
                a1 = vmul(vload(o, i * dim + c + 16), ax)
                a2 = vmul(vload(o, i * dim + c + 32), ax)
                a3 = vmul(vload(o, i * dim + c + 48), ax)
                b0 = vmul(vload(o, (i + 1) * dim + c), ay)
                b1 = vmul(vload(o, (i + 1) * dim + c + 16), ay)
                b2 = vmul(vload(o, (i + 1) * dim + c + 32), ay)
                b3 = vmul(vload(o, (i + 1) * dim + c + 48), ay)
                c0 = vmul(vload(o, (i + 2) * dim + c), az)
                c1 = vmul(vload(o, (i + 2) * dim + c + 16), az)
                c2 = vmul(vload(o, (i + 2) * dim + c + 32), az)
                c3 = vmul(vload(o, (i + 2) * dim + c + 48), az)
                e0 = vmul(vload(o, (i + 3) * dim + c), aw)
                e1 = vmul(vload(o, (i + 3) * dim + c + 16), aw)
                e2 = vmul(vload(o, (i + 3) * dim + c + 32), aw)
                e3 = vmul(vload(o, (i + 3) * dim + c + 48), aw)
                for t in range(n):
                    x = vsplat(s[i, t])
                    y = vsplat(s[i + 1, t])
                    z = vsplat(s[i + 2, t])
                    w = vsplat(s[i + 3, t])
                    v = vload(vc, (ko + t) * dim + c)
                    a0 = vfma(x, v, a0)
                    b0 = vfma(y, v, b0)
                    c0 = vfma(z, v, c0)
                    e0 = vfma(w, v, e0)
                    v = vload(vc, (ko + t) * dim + c + 16)
                    a1 = vfma(x, v, a1)
                    b1 = vfma(y, v, b1)
                    c1 = vfma(z, v, c1)
                    e1 = vfma(w, v, e1)
                    v = vload(vc, (ko + t) * dim + c + 32)
                    a2 = vfma(x, v, a2)
                    b2 = vfma(y, v, b2)
                    c2 = vfma(z, v, c2)
                    e2 = vfma(w, v, e2)
                    v = vload(vc, (ko + t) * dim + c + 48)
                    a3 = vfma(x, v, a3)
                    b3 = vfma(y, v, b3)
                    c3 = vfma(z, v, c3)
                    e3 = vfma(w, v, e3)
                _store_row(o, i * dim + c, a0, a1, a2, a3)
                _store_row(o, (i + 1) * dim + c, b0, b1, b2, b3)
                _store_row(o, (i + 2) * dim + c, c0, c1, c2, c3)
                _store_row(o, (i + 3) * dim + c, e0, e1, e2, e3)
                j += 4
            while j < nv:
                c = 16 * j
                a0 = vmul(vload(o, i * dim + c), ax)
                b0 = vmul(vload(o, (i + 1) * dim + c), ay)
                c0 = vmul(vload(o, (i + 2) * dim + c), az)
                e0 = vmul(vload(o, (i + 3) * dim + c), aw)
                for t in range(n):
                    v = vload(vc, (ko + t) * dim + c)
                    a0 = vfma(vsplat(s[i, t]), v, a0)
                    b0 = vfma(vsplat(s[i + 1, t]), v, b0)
                    c0 = vfma(vsplat(s[i + 2, t]), v, c0)
                    e0 = vfma(vsplat(s[i + 3, t]), v, e0)
                vstore(o, i * dim + c, a0)
                vstore(o, (i + 1) * dim + c, b0)
                vstore(o, (i + 2) * dim + c, c0)
                vstore(o, (i + 3) * dim + c, e0)
                j += 1
    for i in range(rows):
        inv = np.float32(1.0) / lsum[i]
        for d in range(dim):
            out[r0 + i // group, h0 + i % group, d] = o[i, d] * inv


def attention_flash(q, kd, ks, vd, vs, tab, slot: int, pos0: int, scale: float, window: int, out,
                    n_chunks: int) -> None:
    """Causal GQA attention of a chunk of one sequence: rows q [M, H, D] at positions pos0 .. pos0 + M - 1 of
    slot `slot` -> out [M, H, D] (D a multiple of 16); one job per (kv head, tile of QT rows), dealt in turn
    to n_chunks chunks (later tiles see more keys, so turns even the load out).

    The chunks run on Python threads (`flash_jobs` releases the GIL): one call per layer and chunk is long
    enough that a thread pool's start costs nothing measurable, and no numba parallel driver is compiled (a
    parfor around these loops compiled for 4 s of a fresh install's first prompt).
    """
    n_kv = kd.shape[1]
    n_jobs = -(-q.shape[0] // QT) * n_kv
    n_par = max(1, min(n_jobs, int(n_chunks)))
    args = (q, kd, ks, vd, vs, tab, int(slot), int(pos0), np.float32(scale), int(window), out)
    run_shares(flash_jobs, args, n_par)


@numba.njit(cache=True, fastmath=True, error_model="numpy", nogil=True)
def _first_key(pos0, r0, window):
    """The first key a tile starting at row r0 sees, rounded down to a whole key tile."""
    k_lo = max(0, pos0 + r0 + 1 - window) if window > 0 else 0
    return k_lo - k_lo % KT


@numba.njit(cache=True, fastmath=True, error_model="numpy", nogil=True)
def _decode_keys(kd, ks, vd, vs, tab, slot, kvh, t_from, t_to, base, kc, vc, kbuf):
    """Keys and values t_from .. t_to - 1 of (slot, kvh) as f32: key t into column t - base of kc [D, cap]
    (transposed), value t into row t - base of vc [cap, D]; 16 values at a time (f16: vcvtph2ps)."""
    dim = kc.shape[0]
    for t in range(t_from, t_to):
        j = t - base
        for c in range(0, dim, 16):
            vstore(kbuf, c, load16(kd, ks, tab, slot, kvh, t, c))
            vstore(vc, j * dim + c, load16(vd, vs, tab, slot, kvh, t, c))
        for d in range(dim):
            kc[d, j] = kbuf[d]


@numba.njit(cache=True, fastmath=True, error_model="numpy", nogil=True)
def flash_jobs(q, kd, ks, vd, vs, tab, slot, pos0, scale, window, out, c, n_par):
    """Jobs c, c + n_par, ... of attention_flash (job = kv head * tiles + tile), with this chunk's own scratch
    (runs without the GIL). A chunk's tiles of one kv head come in order, so it decodes each of that head's
    keys once, as its tiles first need them (before: once per tile, ~16x on a 512-token prompt)."""
    dim = q.shape[2]
    n_kv = kd.shape[1]
    r = QT * (q.shape[1] // n_kv) + 3  # rows padded to a multiple of 4
    qs = np.zeros((r, dim), np.float32)
    o = np.zeros((r, dim), np.float32)
    s = np.zeros((r, KT), np.float32)
    mx = np.zeros(r, np.float32)
    lsum = np.zeros(r, np.float32)
    alpha = np.zeros(r, np.float32)
    kbuf = np.zeros(dim, np.float32)
    m = q.shape[0]
    n_tiles = (m + QT - 1) // QT
    base0 = _first_key(pos0, 0, window)
    cap = (pos0 + m - base0 + KT - 1) // KT * KT
    kc = np.zeros((dim, cap), np.float32)
    vc = np.zeros((cap, dim), np.float32)
    head = -1
    base = 0
    done = 0  # keys < done of this head are in kc / vc
    for job in range(c, n_tiles * n_kv, n_par):
        kvh = job // n_tiles
        t = job % n_tiles
        r0 = t * QT
        r1 = min(m, r0 + QT)
        first = _first_key(pos0, r0, window)
        if kvh != head:
            head = kvh
            base = first
            done = first
        done = max(done, first)  # a sliding window's earlier keys are not needed again
        _decode_keys(kd, ks, vd, vs, tab, slot, kvh, done, pos0 + r1, base, kc, vc, kbuf)
        done = pos0 + r1
        _flash_tile(q, kc, vc, base, n_kv, pos0, scale, window, out, r0, r1, kvh, qs, s, o, mx, lsum, alpha)
