"""Integer prefill: activations quantized once per matmul to 8 bits, weights read as unsigned 8-bit panels.

The algorithm (llama.cpp's for its Q8_0 / Q8_K activations, in a layout of our own):

1. `quantize_kernel`: each token's activations, per 32 values, become Q8_0 blocks as ggml makes them:
   qa = round(x * 127 / amax) (int8), da = amax / 127 (f32), plus da * sum(qa) per 16 and per 32 values.
2. `matmul_kernel`: the weight rows are cut into panels of 16 rows; each thread decodes its panels one
   at a time (cpu_idecode.py: unsigned quants q, scale s and offset m per sub-block) into a per-thread
   scratch of n_in * 16 bytes, transposed so that one 64-byte slice holds 4 consecutive quants of each of the
   16 rows. Then, for 4 tokens at a time, each unit of 32 weights costs 8 integer dot products (`idot`:
   one `vpdpbusd` per slice with AVX-512 VNNI, the token's 4 activation bytes broadcast to the 16 rows) and
   a few f32 lane operations: acc += f32(dot) * s * da + m * (da * sum qa). A lane of the accumulator is one
   output row; the 16 rows of a token are stored as one vector.

`matmul_kernel` takes up to three weights of one type that share the activations (Q, K and V; gate and
up): their panels form one parallel call, one fork-join instead of three.

Weights are never copied beyond a panel (the mmap stays the only copy): the decode is repeated per matmul,
once per 16 rows, and is amortised over the tokens (M >= INT8_MIN_TOKENS in cpu.py).

Each output depends on its own token's activations only, and is summed in one fixed order (units in
order, the integer part exactly): results do not depend on M, on the thread count or on the token's
position in its group of 4.
"""

from __future__ import annotations

from numba import njit, prange
from numba.extending import overload

from qf.format.ggml_types import GGMLType
from qf.runtime.kernels.cpu_decoder import FASTMATH
from qf.runtime.kernels.cpu_idecode import IDECODERS, IntDecoder
from qf.runtime.kernels.cpu_isimd import (LO_BITS, iadd, icvt, idot, ishl, izero, panel_transpose, q8_block, q8x2_block, q_store,
                                          vget, wload)
from qf.runtime.kernels.cpu_simd import vfma, vload, vmul, vsplat, vstore, vzero

PANEL = 16  # weight rows per panel (= f32 lanes of an accumulator)
UNIT = 32  # weights per unit (= activation block)
UNIT_BYTES = PANEL * UNIT  # bytes of one unit of a panel
TOKENS = 4  # tokens sharing each decoded slice in registers


# ------------------------------------------------------------------ per-kind dispatch (compile time)

def ihead(kind, row, b):
    """Decoded scales of block b (the f32 decoders' head)."""


def iquants(kind, row, b, j, h):
    """Unsigned quants of unit j of block b, as q8x32."""


def iscales(kind, h, j):
    """(s0, m0, s1, m1) of unit j."""


def iunits_per_block(kind):
    """Units per block (a compile-time constant)."""


def isubs(kind):
    """Sub-blocks per unit: 1 (one scale per 32 weights) or 2 (per 16)."""


def _idecoder(kind) -> IntDecoder:
    """The integer decoder of a kind's type."""
    return IDECODERS[GGMLType(kind.qtype)]


@overload(ihead, inline="always")
def _ov_ihead(kind, row, b):
    fn = _idecoder(kind).head
    return lambda kind, row, b: fn(row, b)


@overload(iquants, inline="always")
def _ov_iquants(kind, row, b, j, h):
    fn = _idecoder(kind).quants
    return lambda kind, row, b, j, h: fn(row, b, j, h)


@overload(iscales, inline="always")
def _ov_iscales(kind, h, j):
    fn = _idecoder(kind).scales
    return lambda kind, h, j: fn(h, j)


@overload(iunits_per_block, inline="always")
def _ov_iunits_per_block(kind):
    n = _idecoder(kind).units_per_block
    return lambda kind: n


@overload(isubs, inline="always")
def _ov_isubs(kind):
    n = _idecoder(kind).subs
    return lambda kind: n


# ------------------------------------------------------------------ activations

@njit(parallel=True, fastmath=FASTMATH, cache=True)
def quantize_kernel(isa, x, qx, dx, sx16, sx32):
    """x f32 [M, n_in] -> qx int8 [M, n_in] (one part) or [2, M, n_in] (two: x ~ dx (2^LO_BITS q0 + q1)),
    dx [M, n_in / 32], sx16 / sx32 = dx * (sum of the integer values) per 16 / 32; isa: the source-stamped
    tag (keeps numba's cache fresh)."""
    for t in prange(x.shape[0]):
        quantize_row(x, qx, dx, sx16, sx32, t)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def quantize_row(x, qx, dx, sx16, sx32, t):
    """Token t of quantize_kernel (shared with the serial quantizer of short batches, cpu_repack.py)."""
    n_in = x.shape[1]
    for u in range(n_in // UNIT):
        i = t * n_in + UNIT * u
        if qx.ndim == 3:
            d, s0, s1 = q8x2_block(x, i, qx[0], i, qx[1])
        else:
            d, s0, s1 = q8_block(x, i, qx, i)
        dx[t, u] = d
        sx16[t, 2 * u] = d * s0
        sx16[t, 2 * u + 1] = d * s1
        sx32[t, u] = d * (s0 + s1)


# ------------------------------------------------------------------ weight panels

@njit(inline="always", fastmath=FASTMATH, cache=True)
def _build_panel(kind, w, r0, buf, sc, mn):
    """Rows r0 .. r0 + 15 of w (past the end: the last row again) -> buf in slice layout, sc / mn [sub, 16]."""
    n_out = w.shape[0]
    upb = iunits_per_block(kind)
    nsub = isubs(kind)
    n_units = buf.shape[0] // UNIT_BYTES
    for i in range(PANEL):
        row = w[min(r0 + i, n_out - 1)]
        for b in range(n_units // upb):
            h = ihead(kind, row, b)
            for j in range(upb):
                u = b * upb + j
                q_store(buf, UNIT_BYTES * u + UNIT * i, iquants(kind, row, b, j, h))
                s0, m0, s1, m1 = iscales(kind, h, j)
                k = nsub * u * PANEL + i
                sc[k] = s0
                mn[k] = m0
                if nsub == 2:
                    sc[k + PANEL] = s1
                    mn[k + PANEL] = m1
    for u in range(n_units):
        panel_transpose(buf, UNIT_BYTES * u)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def unpack_kernel(kind, w, q, s, m):
    """Every row as integers: q u8 [n_out, n_in], s / m f32 [n_out, sub-blocks] (tests and tools)."""
    upb = iunits_per_block(kind)
    nsub = isubs(kind)
    n_units = q.shape[1] // UNIT
    for r in prange(w.shape[0]):
        row = w[r]
        for b in range(n_units // upb):
            h = ihead(kind, row, b)
            for j in range(upb):
                u = b * upb + j
                q_store(q[r], UNIT * u, iquants(kind, row, b, j, h))
                s0, m0, s1, m1 = iscales(kind, h, j)
                s[r, nsub * u] = s0
                m[r, nsub * u] = m0
                if nsub == 2:
                    s[r, 2 * u + 1] = s1
                    m[r, 2 * u + 1] = m1


# ------------------------------------------------------------------ the dot products of one token

@njit(inline="always", fastmath=FASTMATH, cache=True)
def _dot4(isa, i, w0, w1, w2, w3, qx, a):
    """i + the dot products of 4 panel slices with the activation bytes a .. a + 15 (flat index of qx)."""
    i = idot(isa, i, w0, qx, a)
    i = idot(isa, i, w1, qx, a + 4)
    i = idot(isa, i, w2, qx, a + 8)
    return idot(isa, i, w3, qx, a + 12)


def _dot16(isa, w0, w1, w2, w3, qx, a, plane):
    """Integer dot of 16 weights (4 slices) with the token's activations at flat index a; with two parts
    (qx [2, M, n_in]), 2^LO_BITS * (first part) + second part (plane: flat offset of the second part)."""


def _dot32(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, a, plane):
    """Integer dot of a 32-weight unit (8 slices), as _dot16."""


@overload(_dot16)
def _ov_dot16(isa, w0, w1, w2, w3, qx, a, plane):
    if qx.ndim == 2:
        return lambda isa, w0, w1, w2, w3, qx, a, plane: _dot4(isa, izero(), w0, w1, w2, w3, qx, a)

    def two(isa, w0, w1, w2, w3, qx, a, plane):  # two independent chains, joined once
        hi = _dot4(isa, izero(), w0, w1, w2, w3, qx, a)
        return iadd(ishl(hi, LO_BITS), _dot4(isa, izero(), w0, w1, w2, w3, qx, a + plane))
    return two


@overload(_dot32)
def _ov_dot32(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, a, plane):
    if qx.ndim == 2:
        def one(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, a, plane):
            return _dot4(isa, _dot4(isa, izero(), w0, w1, w2, w3, qx, a), w4, w5, w6, w7, qx, a + 16)
        return one

    def two(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, a, plane):
        hi = _dot4(isa, _dot4(isa, izero(), w0, w1, w2, w3, qx, a), w4, w5, w6, w7, qx, a + 16)
        lo = _dot4(isa, _dot4(isa, izero(), w0, w1, w2, w3, qx, a + plane), w4, w5, w6, w7, qx, a + plane + 16)
        return iadd(ishl(hi, LO_BITS), lo)
    return two


@njit(inline="always", fastmath=FASTMATH, cache=True)
def apply1(i, s0, m0, d, sx0, acc):
    """acc + a 32-weight unit's integer dot i (i32x16) scaled: the f32 part of _unit1 (shared with the AMX
    tiles of cpu_repack.py, so that both give the same bits)."""
    return vfma(m0, vsplat(sx0), vfma(icvt(i), vmul(s0, vsplat(d)), acc))


@njit(inline="always", fastmath=FASTMATH, cache=True)
def apply2(lo, hi, s0, s1, m0, m1, d, sx0, sx1, acc):
    """acc + a unit's two 16-weight integer dots lo, hi scaled: the f32 part of _unit2."""
    vd = vsplat(d)
    acc = vfma(icvt(lo), vmul(s0, vd), acc)
    acc = vfma(icvt(hi), vmul(s1, vd), acc)
    return vfma(m1, vsplat(sx1), vfma(m0, vsplat(sx0), acc))


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, a, plane, s0, m0, d, sx0, acc):
    """acc + one 32-weight unit of one token; a: flat index of its activations; d: its scale; s0, m0: the
    unit's factors; sx0: d * the sum of its activations."""
    return apply1(_dot32(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, a, plane), s0, m0, d, sx0, acc)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _unit2(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, a, plane, s0, s1, m0, m1, d, sx0, sx1, acc):
    """As _unit1 for a type that scales every 16 weights: factors and sums of the two halves."""
    lo = _dot16(isa, w0, w1, w2, w3, qx, a, plane)
    hi = _dot16(isa, w4, w5, w6, w7, qx, a + 16, plane)
    return apply2(lo, hi, s0, s1, m0, m1, d, sx0, sx1, acc)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _store(out, t, r0, f):
    """out[t, r0 : r0 + 16] = f (fewer lanes at the end of a row)."""
    n_out = out.shape[1]
    if r0 + PANEL <= n_out:
        vstore(out, t * n_out + r0, f)
    else:
        for i in range(n_out - r0):
            out[t, r0 + i] = vget(f, i)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _tokens(qx, t):
    """(n_tok, n_in, flat offset of the second part, tokens t .. t + 3 clamped to the last one)."""
    n_tok = qx.shape[-2]
    n_in = qx.shape[-1]
    last = n_tok - 1
    return n_tok, n_in, n_tok * n_in, t, min(t + 1, last), min(t + 2, last), min(t + 3, last)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _store4(out, n_tok, t, r0, f0, f1, f2, f3):
    """The 4 tokens' rows r0 .. r0 + 15 (tokens past n_tok are not stored)."""
    _store(out, t, r0, f0)
    if t + 1 < n_tok:
        _store(out, t + 1, r0, f1)
    if t + 2 < n_tok:
        _store(out, t + 2, r0, f2)
    if t + 3 < n_tok:
        _store(out, t + 3, r0, f3)


@njit(fastmath=FASTMATH, cache=True)
def tile1(isa, buf, sc, mn, qx, dx, sx, out, t, r0):
    """Tokens t .. t + 3 against a decoded panel whose types scale every 32 weights (sx: sums per 32).

    Not specialised on the weight type: compiled once per instruction set and activation layout, shared
    by every type with one scale per unit (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K).
    """
    n_tok, n_in, plane, t0, t1, t2, t3 = _tokens(qx, t)
    f0 = vzero()
    f1 = vzero()
    f2 = vzero()
    f3 = vzero()
    for u in range(n_in // UNIT):
        p = UNIT_BYTES * u
        w0 = wload(buf, p)
        w1 = wload(buf, p + 64)
        w2 = wload(buf, p + 128)
        w3 = wload(buf, p + 192)
        w4 = wload(buf, p + 256)
        w5 = wload(buf, p + 320)
        w6 = wload(buf, p + 384)
        w7 = wload(buf, p + 448)
        a = UNIT * u
        s = vload(sc, PANEL * u)
        m = vload(mn, PANEL * u)
        f0 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t0 * n_in + a, plane, s, m, dx[t0, u], sx[t0, u], f0)
        f1 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t1 * n_in + a, plane, s, m, dx[t1, u], sx[t1, u], f1)
        f2 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t2 * n_in + a, plane, s, m, dx[t2, u], sx[t2, u], f2)
        f3 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t3 * n_in + a, plane, s, m, dx[t3, u], sx[t3, u], f3)
    _store4(out, n_tok, t, r0, f0, f1, f2, f3)


@njit(fastmath=FASTMATH, cache=True)
def tile2(isa, buf, sc, mn, qx, dx, sx, out, t, r0):
    """As tile1 for the types that scale every 16 weights (Q2_K, Q3_K, Q6_K; sx: sums per 16)."""
    n_tok, n_in, plane, t0, t1, t2, t3 = _tokens(qx, t)
    f0 = vzero()
    f1 = vzero()
    f2 = vzero()
    f3 = vzero()
    for u in range(n_in // UNIT):
        p = UNIT_BYTES * u
        w0 = wload(buf, p)
        w1 = wload(buf, p + 64)
        w2 = wload(buf, p + 128)
        w3 = wload(buf, p + 192)
        w4 = wload(buf, p + 256)
        w5 = wload(buf, p + 320)
        w6 = wload(buf, p + 384)
        w7 = wload(buf, p + 448)
        a = UNIT * u
        k = 2 * PANEL * u
        s0 = vload(sc, k)
        s1 = vload(sc, k + PANEL)
        m0 = vload(mn, k)
        m1 = vload(mn, k + PANEL)
        v = 2 * u
        f0 = _unit2(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t0 * n_in + a, plane, s0, s1, m0, m1, dx[t0, u],
                    sx[t0, v], sx[t0, v + 1], f0)
        f1 = _unit2(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t1 * n_in + a, plane, s0, s1, m0, m1, dx[t1, u],
                    sx[t1, v], sx[t1, v + 1], f1)
        f2 = _unit2(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t2 * n_in + a, plane, s0, s1, m0, m1, dx[t2, u],
                    sx[t2, v], sx[t2, v + 1], f2)
        f3 = _unit2(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t3 * n_in + a, plane, s0, s1, m0, m1, dx[t3, u],
                    sx[t3, v], sx[t3, v + 1], f3)
    _store4(out, n_tok, t, r0, f0, f1, f2, f3)


def _tile(kind, isa, buf, sc, mn, qx, dx, sx16, sx32, out, t, r0):
    """The token tile of the kind's scale layout (tile1 or tile2, chosen at compile time)."""


@overload(_tile, inline="always")
def _ov_tile(kind, isa, buf, sc, mn, qx, dx, sx16, sx32, out, t, r0):
    if _idecoder(kind).subs == 1:
        return lambda kind, isa, buf, sc, mn, qx, dx, sx16, sx32, out, t, r0: tile1(
            isa, buf, sc, mn, qx, dx, sx32, out, t, r0)
    return lambda kind, isa, buf, sc, mn, qx, dx, sx16, sx32, out, t, r0: tile2(
        isa, buf, sc, mn, qx, dx, sx16, out, t, r0)


@njit(fastmath=FASTMATH, cache=True)
def _panel(kind, isa, w, r0, buf, sc, mn, qx, dx, sx16, sx32, out):
    """Rows r0 .. r0 + 15 for every token: decode the panel, then 4 tokens at a time.

    A plain (not parallel) function: the parallel driver only calls it, so numba's parfor passes never see
    the unrolled tile (a fraction of the compile time).
    """
    _build_panel(kind, w, r0, buf, sc, mn)
    for t in range(0, qx.shape[-2], TOKENS):
        _tile(kind, isa, buf, sc, mn, qx, dx, sx16, sx32, out, t, r0)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_kernel(kind, isa, w0, w1, w2, qx, dx, sx16, sx32, out0, out1, out2, qbuf, fbuf):
    """out_i = x @ w_i.T for up to three weights of one type on the same quantized activations, in one
    parallel call (a weight of 0 rows is none); qbuf u8 [items, n_in * 16], fbuf f32 [items, 2, subs * n_in / 2].

    The panels (16 rows each) of w0, w1 and w2, in that order, are cut into even shares, one per work item;
    item c decodes its panels into qbuf[c] / fbuf[c]. A row's result does not depend on the other weights.
    """
    n_items = qbuf.shape[0]
    n0 = (w0.shape[0] + PANEL - 1) // PANEL
    n1 = (w1.shape[0] + PANEL - 1) // PANEL
    n_panels = n0 + n1 + (w2.shape[0] + PANEL - 1) // PANEL
    per = (n_panels + n_items - 1) // n_items
    for c in prange(n_items):
        _panels(kind, isa, w0, w1, w2, n0, n1, c * per, min(n_panels, (c + 1) * per), qbuf[c], fbuf[c, 0], fbuf[c, 1],
                qx, dx, sx16, sx32, out0, out1, out2)


@njit(fastmath=FASTMATH, cache=True)
def _panels(kind, isa, w0, w1, w2, n0, n1, p0, p1, buf, sc, mn, qx, dx, sx16, sx32, out0, out1, out2):
    """Panels p0 .. p1 - 1 of the sequence w0 (n0 panels), w1 (n1 panels), w2."""
    for p in range(p0, p1):
        if p < n0:
            _panel(kind, isa, w0, PANEL * p, buf, sc, mn, qx, dx, sx16, sx32, out0)
        elif p < n0 + n1:
            _panel(kind, isa, w1, PANEL * (p - n0), buf, sc, mn, qx, dx, sx16, sx32, out1)
        else:
            _panel(kind, isa, w2, PANEL * (p - n0 - n1), buf, sc, mn, qx, dx, sx16, sx32, out2)
