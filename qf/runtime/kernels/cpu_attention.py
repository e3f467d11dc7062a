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
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

QBLOCK = 32  # elements per q8_0 / q4_0 block
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
        best = s[g, 0]
        for t in range(1, n_keys):
            best = max(best, s[g, t])
        total = np.float32(0.0)
        for t in range(n_keys):
            e = np.exp(s[g, t] - best)
            s[g, t] = e
            total += e
        inv = np.float32(1.0) / total
        for t in range(n_keys):
            s[g, t] *= inv
        for d in range(dim):
            out[m, h0 + g, d] = 0.0
    for t in range(n_keys):
        read_row(vd, vs, tab, slot, kvh, t0 + t, kbuf)
        for g in range(group):
            pr = s[g, t]
            for d in range(dim):
                out[m, h0 + g, d] += pr * kbuf[d]


# Two separately named functions: numba's cache is keyed by function, not by the `parallel` flag.
@numba.njit(cache=True, parallel=True, fastmath=True, error_model="numpy")
def attention_parallel(q, kd, ks, vd, vs, tab, slots, pos, scale, window, out):
    """Causal GQA attention of rows q [M, H, D] at (slots[m], pos[m]) -> out [M, H, D]; one job per (row, kv head)."""
    n_kv = kd.shape[1]
    group = q.shape[1] // n_kv
    for job in numba.prange(q.shape[0] * n_kv):
        m = job // n_kv
        kbuf = np.empty(q.shape[2], dtype=np.float32)
        s = np.empty((group, pos[m] + 1), dtype=np.float32)
        _attend_row(q, kd, ks, vd, vs, tab, slots[m], pos[m], np.float32(scale), window, m, job % n_kv, out, kbuf, s)


@numba.njit(cache=True, fastmath=True, error_model="numpy")
def attention_serial(q, kd, ks, vd, vs, tab, slots, pos, scale, window, out):
    """The same attention on the calling thread (small problems: a decode step over a short context)."""
    n_kv = kd.shape[1]
    group = q.shape[1] // n_kv
    kbuf = np.empty(q.shape[2], dtype=np.float32)
    s = np.empty((group, pos.max() + 1), dtype=np.float32)
    for job in range(q.shape[0] * n_kv):
        m = job // n_kv
        _attend_row(q, kd, ks, vd, vs, tab, slots[m], pos[m], np.float32(scale), window, m, job % n_kv, out, kbuf, s)


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
