"""Prefill products on AMX-BF16 tiles, each value split in two bf16 halves: near f32 accuracy at tile speed.

Every value v (weight or activation) is written as hi + lo: hi is v rounded to the nearest bf16 (8
significant bits), lo = v - hi (exact in f32, |lo| <= 2^-8 |v|) rounded to bf16, so hi + lo is within 2^-17
of v. Then x . w = xh.wh + xh.wl + xl.wh, three `tdpbf16ps` per 32 inputs, summed in the tile's f32
accumulators over the whole row; the dropped xl.wl is at most 2^-16 of a product. A legacy weight d * q
(at most 15 significant bits) is exact in hi + lo. Against the integer path (two 8-bit parts, about 2^-15 of
a block's largest activation) the activations keep about 17 bits of each value's own magnitude.

No per-block scale is applied outside the tile unit (the integer tile path in cpu_repack.py stores and
rescales its i32 results every 32 inputs, which bounds it): a panel of 16 weight rows is decoded once into f32
by the type's decoder (cpu_drivers: every type the f32 kernels read) and split into two bf16 B operands
[n_in / 2 pairs x 16 rows] in a thread's scratch. Panels go two at a time against two 16-token groups: four
f32 result tiles, ten tile loads per twelve tile products (loads, ~16 ns per KiB on the host measured, bound
the loop), results stored straight into the output.

Used for prompt batches from MIN_TOKENS tokens (MIN_TOKENS_REPACKED for repacked weights) where `cpu_amx.supported_bf16()` (Sapphire Rapids and later)
unless QF_AMX=0. Results are not the integer path's bits: they are closer to the f32 path.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from qf.runtime.kernels import cpu_amx
from qf.runtime.kernels.cpu_amx import tile_config, tile_dot_bf16, tile_load, tile_release, tile_store, tile_zero
from qf.runtime.kernels.cpu_decoder import FASTMATH, UNIT
from qf.runtime.kernels.cpu_drivers import head, unit, units_per_block
from qf.runtime.kernels.cpu_isimd import panel_transpose
from qf.runtime.kernels.cpu_simd import vload

GROUP = 16  # tokens per tile (A and C rows)
PANEL = 16  # weight rows per tile (C columns)
STEP = 32  # inputs per tile product (16 bf16 pairs: 64 bytes per row)
# batches from this many tokens use the tiles: each call decodes and splits its weights' panels (~0.26 ns per
# weight per thread) and then loads ~10 tiles per 32 tokens x 32 rows x 32 inputs; on SmolLM2's shapes (2
# threads) they overtake the integer path from ~56 tokens and the repacked panels (decoded once, at load) from
# ~128 (tied there, 2.2x at 512)
MIN_TOKENS = 64
MIN_TOKENS_REPACKED = 128
CHUNK_STEPS = 64  # steps (2048 inputs) per chunk: a pair of 16-token groups and of panels take 512 KiB of L2


def enabled() -> bool:
    """Whether prefill products use the bf16 tiles: where the host has AMX-BF16, unless QF_AMX=0."""
    return os.environ.get("QF_AMX", "") != "0" and cpu_amx.supported_bf16()


def usable(n_in: int, n_tok: int, repacked: bool = False) -> bool:
    """Whether a product of n_tok tokens with n_in inputs (whole tile steps) runs on the tiles; repacked: the
    weight also has repacked integer panels (cpu_repack.py), which the tiles beat only on longer batches."""
    return n_tok >= (MIN_TOKENS_REPACKED if repacked else MIN_TOKENS) and n_in % STEP == 0 and ENABLED


@intrinsic
def halves16(typingctx, v, hi, lo, o):
    """The bf16 halves of the 16 f32 lanes of v into hi[o : o + 16], lo[o : o + 16] (u16): hi = each value
    rounded to the nearest bf16, lo = the value - hi (exact in f32) rounded likewise (ties to even; NaN and
    infinities are not kept apart: a product with one is not finite either way)."""
    def codegen(context, builder, sig, args):
        v16i32 = ir.VectorType(ir.IntType(32), 16)
        v16i16 = ir.VectorType(ir.IntType(16), 16)
        v16f32 = ir.VectorType(ir.FloatType(), 16)

        def ptr(k):
            a = context.make_array(sig.args[k])(context, builder, args[k])
            j = context.cast(builder, args[3], sig.args[3], types.intp)
            return builder.bitcast(builder.gep(a.data, [j]), v16i16.as_pointer())

        def splat(c):
            return ir.Constant(v16i32, [c] * 16)

        def nearest(u):  # f32 bits u -> the nearest bf16's bits, in the top half (ties to even)
            odd = builder.and_(builder.lshr(u, splat(16)), splat(1))
            return builder.and_(builder.add(builder.add(u, splat(0x7FFF)), odd), splat(0xFFFF0000))
        x = args[0]
        h = nearest(builder.bitcast(x, v16i32))
        r = nearest(builder.bitcast(builder.fsub(x, builder.bitcast(h, v16f32)), v16i32))
        builder.store(builder.trunc(builder.lshr(h, splat(16)), v16i16), ptr(1), align=2)
        builder.store(builder.trunc(builder.lshr(r, splat(16)), v16i16), ptr(2), align=2)
        return context.get_dummy_value()
    return types.none(v, hi, lo, o), codegen


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def split_kernel(x, ah, al):
    """Activations x f32 [M, n_in] -> bf16 halves ah, al u16 [M_pad, n_in] (rows from M: zeros)."""
    m, n_in = x.shape
    for t in prange(ah.shape[0]):
        if t < m:
            for i in range(0, n_in, 16):
                halves16(vload(x[t], i), ah[t], al[t], i)
        else:
            ah[t, :] = 0
            al[t, :] = 0


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _build_panel(kind, w, r0, rows, bh, bl):
    """Weight rows r0 .. r0 + rows - 1 (rows <= 16) as B operands: bh/bl u8 [32 n_in] holding, for each pair of
    inputs 2i, 2i + 1, the bf16 halves of both for the 16 rows (zeros past `rows`) in 64 bytes at 64 i. Each
    row is decoded unit by unit (32 values in registers) into 16-value chunks [16 rows x 32 bytes], which are
    then transposed in place."""
    n_in = bh.shape[0] // 32
    h16 = bh.view(np.uint16)
    l16 = bl.view(np.uint16)
    upb = units_per_block(kind)
    for n in range(PANEL):
        if n < rows:
            row = w[r0 + n]
            for b in range(n_in // (UNIT * upb)):
                h = head(kind, row, b)
                for j in range(upb):
                    v0, v1 = unit(kind, row, b, j, h)
                    o = 512 * (b * upb + j) + 16 * n  # chunk 2 (b upb + j): u16 offset 256 per chunk
                    halves16(v0, h16, l16, o)
                    halves16(v1, h16, l16, o + 256)
        else:
            for c in range(n_in // 16):
                for k in range(16):
                    h16[256 * c + 16 * n + k] = 0
                    l16[256 * c + 16 * n + k] = 0
    for c in range(n_in // 16):
        panel_transpose(bh, 512 * c)
        panel_transpose(bl, 512 * c)


@njit(inline="always", cache=True)
def _config():
    """Every tile 16 rows x 64 bytes: 0-3 f32 results (2 groups x 2 panels), 4-5 the groups' activation
    halves, 6-7 the panels' weight halves."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64
        cfg[48 + t] = GROUP
    return cfg


@njit(inline="always", cache=True)
def _dots():
    """The four products of a step: groups (tiles 4, 5) x panels (tiles 6, 7) into results 0-3."""
    tile_dot_bf16(0, 4, 6)
    tile_dot_bf16(1, 4, 7)
    tile_dot_bf16(2, 5, 6)
    tile_dot_bf16(3, 5, 7)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _copy(cbuf, out, t, r0, rows, m):
    """The valid part of a result tile held in cbuf [16 x 16] into out[t:, r0:]."""
    for j in range(min(GROUP, m - t)):
        for n in range(rows):
            out[t + j, r0 + n] = cbuf[PANEL * j + n]


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _steps(ah, al, b, t, s0, s1):
    """Tile steps s0 .. s1 - 1 (32 inputs each) of groups t, t + 16 against the two panels of b, into results
    0-3: hi.hi, lo.hi, hi.lo per step."""
    a_row = 2 * ah.shape[1]  # bytes per activation row
    for s in range(s0, s1):
        a0 = t * a_row + 2 * STEP * s
        a1 = a0 + GROUP * a_row
        o = 4 * PANEL * (STEP // 2) * s
        tile_load(6, b[0, 0], o, 64)
        tile_load(7, b[1, 0], o, 64)
        tile_load(4, ah, a0, a_row)
        tile_load(5, ah, a1, a_row)
        _dots()
        tile_load(4, al, a0, a_row)
        tile_load(5, al, a1, a_row)
        _dots()
        tile_load(6, b[0, 1], o, 64)
        tile_load(7, b[1, 1], o, 64)
        tile_load(4, ah, a0, a_row)
        tile_load(5, ah, a1, a_row)
        _dots()


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _partials(cacc, t, load):
    """Results 0-3 of groups t, t + 16 from (load) or into cacc f32 [M_pad, 32] (tile (g, p) at rows t + 16 g,
    columns 16 p)."""
    o = 4 * 32 * t
    g = 4 * 32 * GROUP
    if load:
        tile_load(0, cacc, o, 128)
        tile_load(1, cacc, o + 64, 128)
        tile_load(2, cacc, o + g, 128)
        tile_load(3, cacc, o + g + 64, 128)
    else:
        tile_store(0, cacc, o, 128)
        tile_store(1, cacc, o + 64, 128)
        tile_store(2, cacc, o + g, 128)
        tile_store(3, cacc, o + g + 64, 128)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _block(ah, al, b, m, out_a, ra, rows_a, out_b, rb, rows_b, cbuf, cacc):
    """Two panels (b [2, 2, 32 n_in] u8: panel, half) against every pair of 16-token groups into out_a[:, ra :
    ra + rows_a] and likewise b. Past CHUNK_STEPS steps the inputs go in chunks, each against every group
    (operands stay in L2), the results kept between chunks in cacc f32 [M_pad, 32]."""
    n_steps = ah.shape[1] // STEP
    for s0 in range(0, n_steps, CHUNK_STEPS):
        s1 = min(n_steps, s0 + CHUNK_STEPS)
        for t in range(0, ah.shape[0], 2 * GROUP):
            if s0 == 0:
                tile_zero(0)
                tile_zero(1)
                tile_zero(2)
                tile_zero(3)
            else:
                _partials(cacc, t, True)
            _steps(ah, al, b, t, s0, s1)
            if s1 < n_steps:
                _partials(cacc, t, False)
            else:
                whole = t + 2 * GROUP <= m
                _flush(out_a, out_b, t, ra, rb, rows_a, rows_b, whole and rows_a == PANEL,
                       whole and rows_b == PANEL, m, cbuf)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _flush(out_a, out_b, t, ra, rb, rows_a, rows_b, direct_a, direct_b, m, cbuf):
    """Results 0, 2 (panel a: groups t, t + 16) and 1, 3 (panel b) into their outputs."""
    _flush_panel(0, 2, out_a, t, ra, rows_a, direct_a, m, cbuf)
    _flush_panel(1, 3, out_b, t, rb, rows_b, direct_b, m, cbuf)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _flush_panel(k0, k1, out, t, r0, rows, direct, m, cbuf):
    """Result tiles k0 (groups t) and k1 (t + 16) of one panel into out[:, r0 : r0 + rows]: straight when
    whole, else through cbuf (a panel's short last rows, a batch's last tokens)."""
    o_row = 4 * out.shape[1]
    if direct:
        tile_store(k0, out, t * o_row + 4 * r0, o_row)
        tile_store(k1, out, (t + GROUP) * o_row + 4 * r0, o_row)
    elif rows > 0:
        tile_store(k0, cbuf, 0, 4 * PANEL)
        _copy(cbuf, out, t, r0, rows, m)
        tile_store(k1, cbuf, 0, 4 * PANEL)
        _copy(cbuf, out, t + GROUP, r0, rows, m)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _panels(kind, w0, w1, w2, ah, al, m, out0, out1, out2, c, n_par):
    """Share c of n_par of the 16-row panels of the sequence w0, w1, w2 (the last of a weight maybe fewer
    rows), two at a time, in this thread: its own tile configuration and B scratch. The tile products of a
    pair of panels (_block) compile once for every type (~1.7 s less per type); only the panel build is the
    type's."""
    n_in = ah.shape[1]
    q0 = (w0.shape[0] + PANEL - 1) // PANEL
    q1 = (w1.shape[0] + PANEL - 1) // PANEL
    n_panels = q0 + q1 + (w2.shape[0] + PANEL - 1) // PANEL
    size = ((n_panels + n_par - 1) // n_par + 1) // 2 * 2  # whole pairs of panels per share
    p0 = c * size
    p1 = min(n_panels, p0 + size)
    if p0 >= p1:
        return
    b = np.empty((2, 2, 32 * n_in), np.uint8)
    cbuf = np.empty(GROUP * PANEL, np.float32)
    cacc = np.empty((ah.shape[0] * 32) if n_in > STEP * CHUNK_STEPS else 0, np.float32)
    tile_config(_config())
    for p in range(p0, p1, 2):
        outs = []
        for j in range(2):
            q = p + j
            if q >= p1:
                _build_panel(kind, w0, 0, 0, b[j, 0], b[j, 1])
                outs.append((out0, 0, 0))
                continue
            if q < q0:
                w, out, r0 = w0, out0, PANEL * q
            elif q < q0 + q1:
                w, out, r0 = w1, out1, PANEL * (q - q0)
            else:
                w, out, r0 = w2, out2, PANEL * (q - q0 - q1)
            rows = min(PANEL, w.shape[0] - r0)
            _build_panel(kind, w, r0, rows, b[j, 0], b[j, 1])
            outs.append((out, r0, rows))
        out_a, ra, rows_a = outs[0]
        out_b, rb, rows_b = outs[1]
        _block(ah, al, b, m, out_a, ra, rows_a, out_b, rb, rows_b, cbuf, cacc)
    tile_release()


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_kernel(kind, w0, w1, w2, ah, al, m, out0, out1, out2, n_items):
    """(x @ w0.T, x @ w1.T, x @ w2.T) for up to three weights of one type (u8 rows; 0 rows: none) on their split
    activations ah, al u16 [M_pad, n_in] (M_pad a multiple of 32, rows from m zero); the 16-row panels in
    n_items even shares on the kernel threads (a Python thread pool measured 1.8x slower here: numba's
    OpenMP workers keep spinning on the cores after the activations' split)."""
    for c in prange(n_items):
        _panels(kind, w0, w1, w2, ah, al, m, out0, out1, out2, c, n_items)


def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x f32 [M, n_in] -> its bf16 halves u16 [M_pad, n_in], M_pad the next multiple of two tile groups."""
    m, n_in = x.shape
    m_pad = -(-m // (2 * GROUP)) * 2 * GROUP
    ah = np.empty((m_pad, n_in), np.uint16)
    al = np.empty((m_pad, n_in), np.uint16)
    split_kernel(x, ah, al)
    return ah, al


ENABLED = enabled()

__all__ = ["ENABLED", "MIN_TOKENS", "enabled", "matmul_kernel", "split", "usable"]
