"""Repacked weights: the integer kernel's 16-row panels built once at load, for decode and prefill alike.

The integer matmul (cpu_int8.py) decodes each 16-row panel of a weight into a transposed scratch (4
consecutive quants of each of the 16 rows per 64-byte slice, plus f32 scale and offset vectors) on every
call; over a long prompt that is amortised, over one decode token it is not, so decode keeps the f32
kernels. `repack` builds every panel once, in memory of its own (llama.cpp's repacking of Q4_0 into
block_q4_0x8 and friends is the same idea): then one token costs 8 integer dot products per unit of 16 rows
and 32 weights (16 with two activation parts) instead of 32 decoded f32 vectors, and no fork-join is spent
on decoding panels.

This is an explicit choice (`CpuBackend(repack=True)`, `qrun/qbench --repack`), never a default: the
panels are RAM next to the mmap. Types whose quants fit 4 bits (Q4_0, Q4_1, Q4_K, Q3_K, Q2_K) keep them as
nibbles, two slices per 64 bytes (0.5 byte per weight); the others keep a byte per weight. Each panel
also holds f32 scale and offset vectors (8 bytes per 32 weights, 16 for the types that scale every 16):
Q4_0 and Q4_K take 0.75 byte per weight (1.33x the file), Q8_0 1.25 (1.18x), Q6_K 1.5 (1.83x).
`repack_bytes` gives the figure before anything is built (the planner prints it).

The results are bit for bit those of `cpu.matmul_q8` on the same activations (the same panels, the same
sums in the same order), for any token count: a row depends on its own token only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import NativeValue, intrinsic, models, overload, register_model, typeof_impl, unbox

from qf.format.errors import QFError
from qf.format.ggml_types import GGMLType
from qf.runtime.kernels import cpu, cpu_registry
from qf.runtime.kernels.cpu_decoder import FASTMATH
from qf.runtime.kernels.cpu_idecode import IDECODERS
from qf.runtime.kernels.cpu_int8 import (PANEL, UNIT, UNIT_BYTES, _build_panel, _store, _store4, _tokens, _unit1, _unit2,
                                         quantize_row)
from qf.runtime.kernels.cpu_isimd import q8x64, wload
from qf.runtime.kernels.cpu_simd import f32x16, vload, vmul, vsplat, vzero

# ggml types whose unsigned quants fit in 4 bits: their panels hold nibbles (the other integer types: bytes).
NIBBLE_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q3_K, GGMLType.Q2_K})

# types whose offset is a fixed multiple of the scale (m = coef * s): only the scales are stored
OFFSET_COEF: dict[GGMLType, float] = {GGMLType.Q4_0: -8.0, GGMLType.Q5_0: -16.0, GGMLType.Q8_0: -128.0,
                                      GGMLType.Q3_K: -4.0, GGMLType.Q6_K: -32.0}

# types whose scales and offsets are f16 values of the file (legacy blocks): stored as halves
HALF_SCALE_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0})

# the types `repack` builds panels for by default (where decode measured faster than the f32 kernels)
DEFAULT_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q5_0, GGMLType.Q5_1,
                           GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q3_K, GGMLType.Q2_K})

SERIAL_TOKENS = 8  # batches of at most this many tokens are quantized in the calling thread (no fork-join)


class _StampType(types.Type):
    """numba type of the module's source tag: the hash of every kernel source its kernels inline (cpu_int8.py
    and below), so that numba's disk cache (which only watches this file) never serves a stale kernel."""

    def __init__(self) -> None:
        super().__init__(name=f"qf_repack({cpu_registry.source_stamp(extra=('cpu_int8', 'cpu_repack'))})")


register_model(_StampType)(models.OpaqueModel)


@unbox(_StampType)
def _unbox_stamp(typ, obj, c):
    """The tag carries no run-time data."""
    return NativeValue(c.context.get_dummy_value())


class _Stamp:
    """The source tag every kernel of this module takes first."""

    _numba_type_ = _StampType()


@typeof_impl.register(_Stamp)
def _typeof_stamp(val, c):
    """numba type of the tag."""
    return val._numba_type_


STAMP = _Stamp()


class RepackError(QFError, ValueError):
    """A weight cannot be repacked (not an integer-kernel type) or repacked weights were misused."""


# ------------------------------------------------------------------ 4-bit slices

@intrinsic
def nib_lo(typingctx, v):
    """Low nibble of each byte of a q8x64."""
    def codegen(context, builder, sig, args):
        return builder.and_(args[0], ir.Constant(ir.VectorType(ir.IntType(8), 64), [15] * 64))
    return q8x64(v), codegen


@intrinsic
def nib_hi(typingctx, v):
    """High nibble of each byte of a q8x64."""
    def codegen(context, builder, sig, args):
        return builder.lshr(args[0], ir.Constant(ir.VectorType(ir.IntType(8), 64), [4] * 64))
    return q8x64(v), codegen


@intrinsic
def vload_f16(typingctx, arr, i):
    """arr[i : i + 16] of a u16 array of IEEE halves, as f32x16 (exact)."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(a.data, [idx]), ir.VectorType(ir.HalfType(), 16).as_pointer())
        return builder.fpext(builder.load(ptr, align=2), ir.VectorType(ir.FloatType(), 16))
    return f32x16(arr, i), codegen


def _scale(sc, k):
    """sc[k : k + 16] as f32x16 (sc: f32, or u16 holding halves)."""


@overload(_scale, inline="always")
def _ov_scale(sc, k):
    if sc.dtype == types.uint16:
        return lambda sc, k: vload_f16(sc, k)
    return lambda sc, k: vload(sc, k)


def _offset(s, mn, k, coef):
    """The offsets of the 16 rows: mn[k : k + 16], or coef * s where the type's offset is a multiple of its
    scale (mn then has no columns)."""


@overload(_offset, inline="always")
def _ov_offset(s, mn, k, coef):
    def offset(s, mn, k, coef):
        if mn.shape[0] == 0:
            return vmul(s, vsplat(coef))
        return _scale(mn, k)
    return offset


def _slices(buf, p):
    """The 8 slices (q8x64) of the panel unit at byte p of buf (a panel's row of the repacked array)."""


@overload(_slices, inline="always")
def _ov_slices(buf, p):
    if buf.dtype == types.int8:  # nibble panels (held as int8 so that the array type picks this loader)
        def nibbles(buf, p):
            a = wload(buf, p)
            b = wload(buf, p + 64)
            c = wload(buf, p + 128)
            d = wload(buf, p + 192)
            return nib_lo(a), nib_hi(a), nib_lo(b), nib_hi(b), nib_lo(c), nib_hi(c), nib_lo(d), nib_hi(d)
        return nibbles

    def whole(buf, p):
        return (wload(buf, p), wload(buf, p + 64), wload(buf, p + 128), wload(buf, p + 192), wload(buf, p + 256),
                wload(buf, p + 320), wload(buf, p + 384), wload(buf, p + 448))
    return whole


def _unit_bytes(buf):
    """Bytes of one panel unit in buf's layout (256 for nibbles, 512 for bytes)."""


@overload(_unit_bytes, inline="always")
def _ov_unit_bytes(buf):
    n = UNIT_BYTES // 2 if buf.dtype == types.int8 else UNIT_BYTES
    return lambda buf: n


# ------------------------------------------------------------------ token tiles over a stored panel

@njit(fastmath=FASTMATH, cache=True)
def rtile1(stamp, isa, q, sc, mn, coef, qx, dx, sx, out, t, r0):
    """Tokens t .. t + 3 against a stored panel of a type with one scale per 32 weights (cpu_int8.tile1)."""
    n_tok, n_in, plane, t0, t1, t2, t3 = _tokens(qx, t)
    ub = _unit_bytes(q)
    f0 = vzero()
    f1 = vzero()
    f2 = vzero()
    f3 = vzero()
    for u in range(n_in // UNIT):
        w0, w1, w2, w3, w4, w5, w6, w7 = _slices(q, ub * u)
        a = UNIT * u
        s = _scale(sc, PANEL * u)
        m = _offset(s, mn, PANEL * u, coef)
        f0 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t0 * n_in + a, plane, s, m, dx[t0, u], sx[t0, u], f0)
        f1 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t1 * n_in + a, plane, s, m, dx[t1, u], sx[t1, u], f1)
        f2 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t2 * n_in + a, plane, s, m, dx[t2, u], sx[t2, u], f2)
        f3 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t3 * n_in + a, plane, s, m, dx[t3, u], sx[t3, u], f3)
    _store4(out, n_tok, t, r0, f0, f1, f2, f3)


@njit(fastmath=FASTMATH, cache=True)
def rone1(stamp, isa, q, sc, mn, coef, qx, dx, sx, out, t, r0):
    """Token t alone, as rtile1 computes each of its tokens (a decode step; the last tokens of a batch)."""
    n_tok, n_in, plane, t0, t1, t2, t3 = _tokens(qx, t)
    ub = _unit_bytes(q)
    f0 = vzero()
    for u in range(n_in // UNIT):
        w0, w1, w2, w3, w4, w5, w6, w7 = _slices(q, ub * u)
        s = _scale(sc, PANEL * u)
        m = _offset(s, mn, PANEL * u, coef)
        f0 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t0 * n_in + UNIT * u, plane, s, m, dx[t0, u], sx[t0, u],
                    f0)
    _store(out, t, r0, f0)


@njit(fastmath=FASTMATH, cache=True)
def rtile2(stamp, isa, q, sc, mn, coef, qx, dx, sx, out, t, r0):
    """As rtile1 for the types that scale every 16 weights (cpu_int8.tile2; sx: sums per 16)."""
    n_tok, n_in, plane, t0, t1, t2, t3 = _tokens(qx, t)
    ub = _unit_bytes(q)
    f0 = vzero()
    f1 = vzero()
    f2 = vzero()
    f3 = vzero()
    for u in range(n_in // UNIT):
        w0, w1, w2, w3, w4, w5, w6, w7 = _slices(q, ub * u)
        a = UNIT * u
        k = 2 * PANEL * u
        s0 = _scale(sc, k)
        s1 = _scale(sc, k + PANEL)
        m0 = _offset(s0, mn, k, coef)
        m1 = _offset(s1, mn, k + PANEL, coef)
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


@njit(fastmath=FASTMATH, cache=True)
def rone2(stamp, isa, q, sc, mn, coef, qx, dx, sx, out, t, r0):
    """Token t alone, as rtile2 computes each of its tokens."""
    n_tok, n_in, plane, t0, t1, t2, t3 = _tokens(qx, t)
    ub = _unit_bytes(q)
    f0 = vzero()
    for u in range(n_in // UNIT):
        w0, w1, w2, w3, w4, w5, w6, w7 = _slices(q, ub * u)
        k = 2 * PANEL * u
        v = 2 * u
        s0 = _scale(sc, k)
        s1 = _scale(sc, k + PANEL)
        f0 = _unit2(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t0 * n_in + UNIT * u, plane, s0, s1,
                    _offset(s0, mn, k, coef), _offset(s1, mn, k + PANEL, coef), dx[t0, u], sx[t0, v], sx[t0, v + 1], f0)
    _store(out, t, r0, f0)


def _rpanel(stamp, kind, isa, q, sc, mn, coef, qx, dx, sx16, sx32, out, r0):
    """Rows r0 .. r0 + 15 of a stored panel for every token: 4 tokens at a time, the rest one by one."""


@overload(_rpanel, inline="always")
def _ov_rpanel(stamp, kind, isa, q, sc, mn, coef, qx, dx, sx16, sx32, out, r0):
    if IDECODERS[GGMLType(kind.qtype)].subs == 1:
        def panel1(stamp, kind, isa, q, sc, mn, coef, qx, dx, sx16, sx32, out, r0):
            n_tok = qx.shape[-2]
            full = n_tok - n_tok % 4
            for t in range(0, full, 4):
                rtile1(stamp, isa, q, sc, mn, coef, qx, dx, sx32, out, t, r0)
            for t in range(full, n_tok):
                rone1(stamp, isa, q, sc, mn, coef, qx, dx, sx32, out, t, r0)
        return panel1

    def panel2(stamp, kind, isa, q, sc, mn, coef, qx, dx, sx16, sx32, out, r0):
        n_tok = qx.shape[-2]
        full = n_tok - n_tok % 4
        for t in range(0, full, 4):
            rtile2(stamp, isa, q, sc, mn, coef, qx, dx, sx16, out, t, r0)
        for t in range(full, n_tok):
            rone2(stamp, isa, q, sc, mn, coef, qx, dx, sx16, out, t, r0)
    return panel2


@njit(fastmath=FASTMATH, cache=True)
def _rpanels(stamp, kind, isa, q0, q1, q2, sc0, sc1, sc2, mn0, mn1, mn2, coef, p0, p1, qx, dx, sx16, sx32, out0, out1, out2):
    """Panels p0 .. p1 - 1 of the sequence q0, q1, q2 (a plain function: the parallel driver only calls it)."""
    n0 = q0.shape[0]
    n1 = q1.shape[0]
    for p in range(p0, p1):
        if p < n0:
            _rpanel(stamp, kind, isa, q0[p], sc0[p], mn0[p], coef, qx, dx, sx16, sx32, out0, PANEL * p)
        elif p < n0 + n1:
            k = p - n0
            _rpanel(stamp, kind, isa, q1[k], sc1[k], mn1[k], coef, qx, dx, sx16, sx32, out1, PANEL * k)
        else:
            k = p - n0 - n1
            _rpanel(stamp, kind, isa, q2[k], sc2[k], mn2[k], coef, qx, dx, sx16, sx32, out2, PANEL * k)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_kernel(stamp, kind, isa, q0, q1, q2, sc0, sc1, sc2, mn0, mn1, mn2, coef, qx, dx, sx16, sx32, out0, out1, out2, n_items):
    """out_i = x @ w_i.T for up to three repacked weights of one type (0 panels: none), panels cut into n_items
    even shares; q_i [panels, units * 256 or 512], sc_i / mn_i f32 [panels, subs * units * 16]."""
    n_panels = q0.shape[0] + q1.shape[0] + q2.shape[0]
    per = (n_panels + n_items - 1) // n_items
    for c in prange(n_items):
        _rpanels(stamp, kind, isa, q0, q1, q2, sc0, sc1, sc2, mn0, mn1, mn2, coef, c * per, min(n_panels, (c + 1) * per), qx, dx,
                 sx16, sx32, out0, out1, out2)


# ------------------------------------------------------------------ building the panels (at load)

@njit(parallel=True, fastmath=FASTMATH, cache=True)
def build_kernel(stamp, kind, w, q, sc, mn, scratch, nibbles):
    """Every panel of w: q u8 [panels, units * (256 if nibbles else 512)], sc / mn f32 [panels, subs * units * 16];
    scratch u8 [items, units * 512] (one 8-bit panel per work item)."""
    n_panels = q.shape[0]
    n_items = scratch.shape[0]
    n_units = scratch.shape[1] // UNIT_BYTES
    per = (n_panels + n_items - 1) // n_items
    for c in prange(n_items):
        buf = scratch[c]
        for p in range(c * per, min(n_panels, (c + 1) * per)):
            _build_panel(kind, w, PANEL * p, buf, sc[p], mn[p])
            dst = q[p]
            if nibbles:  # slices 2k, 2k + 1 of a unit -> low, high nibbles of 64 bytes
                for u in range(n_units):
                    for k in range(4):
                        s = UNIT_BYTES * u + 128 * k
                        o = 256 * u + 64 * k
                        for j in range(64):
                            dst[o + j] = buf[s + j] | (buf[s + 64 + j] << 4)
            else:
                dst[:] = buf


@njit(fastmath=FASTMATH, cache=True)
def quantize_serial(stamp, isa, x, qx, dx, sx16, sx32):
    """cpu_int8.quantize_kernel in the calling thread (a decode step: no fork-join for one row)."""
    for t in range(x.shape[0]):
        quantize_row(x, qx, dx, sx16, sx32, t)


# ------------------------------------------------------------------ Python side

def _aligned(rows: int, cols: int, dtype: type) -> np.ndarray:
    """A zeroed [rows, cols] array whose rows start on 64-byte boundaries (cols * itemsize a multiple of 64)."""
    item = np.dtype(dtype).itemsize
    raw = np.zeros(rows * cols * item + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip:skip + rows * cols * item].view(dtype).reshape(rows, cols)


def repackable(t: GGMLType | int) -> bool:
    """Whether the integer kernels have a decoder for t (so that its panels can be stored)."""
    try:
        return GGMLType(t) in IDECODERS
    except ValueError:
        return False


def _layout(t: GGMLType, n_in: int, n_out: int) -> tuple[int, int, int]:
    """(panels, panel bytes, scale values per panel) of a repacked [n_out, n_in] weight of type t."""
    units = n_in // UNIT
    unit = UNIT_BYTES // 2 if t in NIBBLE_TYPES else UNIT_BYTES
    return -(-n_out // PANEL), units * unit, IDECODERS[t].subs * units * PANEL


def repack_bytes(t: GGMLType | int, n_in: int, n_out: int) -> int:
    """RAM that repacking a [n_out, n_in] weight of type t takes (0 for a type that is not repacked)."""
    t = GGMLType(t)
    if not repackable(t) or n_in % UNIT:
        return 0
    panels, qb, fl = _layout(t, n_in, n_out)
    per = 2 if t in HALF_SCALE_TYPES else 4
    return panels * (qb + per * fl * (1 if t in OFFSET_COEF else 2))


def _compact(t: GGMLType, sc: np.ndarray, mn: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(scales, offsets, coef) as stored: halves (u16) for HALF_SCALE_TYPES when exact, and no offsets
    (0 columns) where they are coef * scale."""
    coef = OFFSET_COEF.get(t)
    if coef is not None and np.array_equal(mn, sc * np.float32(coef)):
        mn = mn[:, :0]
    else:
        coef = 0.0
    if t in HALF_SCALE_TYPES:
        h, hm = sc.astype(np.float16), mn.astype(np.float16)
        if np.array_equal(h.astype(np.float32), sc) and np.array_equal(hm.astype(np.float32), mn):
            sc, mn = h.view(np.uint16), hm.view(np.uint16)
    return np.ascontiguousarray(sc), np.ascontiguousarray(mn), float(coef)


@dataclass(frozen=True, eq=False)
class RepackedMatrix:
    """A weight's integer panels, built once: q [panels, bytes] (int8 view for nibble panels, u8 otherwise),
    sc / mn [panels, subs * units * 16] (f32, or u16 halves; mn with 0 columns: coef * sc); base is the mmap'd
    QMatrix (embedding rows, f32 fallbacks)."""

    base: cpu.QMatrix
    q: np.ndarray
    sc: np.ndarray
    mn: np.ndarray
    coef: float = 0.0  # offsets = coef * scales when mn has no columns

    @property
    def type(self) -> GGMLType:
        """The ggml type of the packed weight."""
        return self.base.type

    @property
    def n_in(self) -> int:
        """Input features."""
        return self.base.n_in

    @property
    def n_out(self) -> int:
        """Output features."""
        return self.base.n_out

    @property
    def shape(self) -> tuple[int, int]:
        """(n_out, n_in)."""
        return self.base.shape

    @property
    def kind(self):
        """The base matrix's compile-time type tag."""
        return self.base.kind

    @property
    def nbytes(self) -> int:
        """RAM the panels take (beyond the mmap'd weight)."""
        return int(self.q.nbytes + self.sc.nbytes + self.mn.nbytes)


def repack(w: cpu.QMatrix) -> RepackedMatrix:
    """Build w's integer panels (parallel over panels); RepackError for a type without integer kernels."""
    if not isinstance(w, cpu.QMatrix):
        raise RepackError(f"only quantized kernel matrices can be repacked; got {type(w).__name__}")
    if not repackable(w.type):
        raise RepackError(f"no integer kernel to repack {w.type.name} for")
    panels, qb, fl = _layout(w.type, w.n_in, w.n_out)
    q = _aligned(panels, qb, np.uint8)
    sc = np.empty((panels, fl), np.float32)
    mn = np.empty((panels, fl), np.float32)
    n_items = max(1, min(numba.get_num_threads(), panels))
    scratch = _aligned(n_items, w.n_in // UNIT * UNIT_BYTES, np.uint8)
    nib = w.type in NIBBLE_TYPES
    build_kernel(STAMP, w.kind, w.data, q, sc, mn, scratch, nib)
    sc, mn, coef = _compact(w.type, sc, mn)
    for a in (q, sc, mn):
        a.flags.writeable = False  # one numba specialisation (read-only) for every caller, like the mmap
    return RepackedMatrix(w, q.view(np.int8) if nib else q, sc, mn, coef)


def quantize(x: np.ndarray, parts: int | None = None) -> cpu.Q8Activations:
    """cpu.quantize_q8, in the calling thread for short batches (bit for bit the same)."""
    if x.shape[0] > SERIAL_TOKENS:
        return cpu.quantize_q8(x, parts)
    parts = cpu.INT8_PARTS if parts is None else int(parts)
    m, n = x.shape
    planes = np.empty((m, n) if parts == 1 else (2, m, n), np.int8)
    xq = cpu.Q8Activations(planes, np.empty((m, n // 32), np.float32), np.empty((m, n // 16), np.float32),
                           np.empty((m, n // 32), np.float32))
    quantize_serial(STAMP, cpu.ISA, x, planes, xq.d, xq.s16, xq.s32)
    return xq


_NONE_Y = np.empty((0, 0), np.float32)


def _call(ws: Sequence[RepackedMatrix], xq: cpu.Q8Activations, ys: Sequence[np.ndarray]) -> None:
    """ys[i] = xq @ ws[i].T for 1-3 repacked weights of one type, in one parallel call."""
    w = ws[0]
    n_panels = sum(v.q.shape[0] for v in ws)
    n_items = max(1, min(numba.get_num_threads(), n_panels))
    none = (w.q[:0], w.sc[:0], w.mn[:0], np.empty((xq.shape[0], 0), np.float32))
    qs = [v.q for v in ws] + [none[0]] * (3 - len(ws))
    scs = [v.sc for v in ws] + [none[1]] * (3 - len(ws))
    mns = [v.mn for v in ws] + [none[2]] * (3 - len(ws))
    os_ = list(ys) + [none[3]] * (3 - len(ys))
    matmul_kernel(STAMP, w.kind, cpu.ISA, qs[0], qs[1], qs[2], scs[0], scs[1], scs[2], mns[0], mns[1], mns[2],
                  np.float32(w.coef), xq.planes, xq.d,
                  xq.s16, xq.s32, os_[0], os_[1], os_[2], n_items)


def _x(x: np.ndarray, n_in: int) -> np.ndarray:
    """x as C-contiguous f32 [M, n_in], or RepackError."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise RepackError(f"activations must be [M, n_in] with n_in={n_in}; got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def matmul(w: RepackedMatrix, x: np.ndarray, xq: cpu.Q8Activations | None = None) -> np.ndarray:
    """x @ w.T: x f32 [M, n_in] -> f32 [M, n_out] on 8-bit activations (xq: x already quantized)."""
    x = _x(x, w.n_in)
    y = np.empty((x.shape[0], w.n_out), np.float32)
    if x.shape[0]:
        _call((w,), quantize(x) if xq is None else xq, (y,))
    return y


def matmul_many(ws: Sequence[RepackedMatrix], x: np.ndarray) -> list[np.ndarray]:
    """[matmul(w, x) for w in ws] with x quantized once and the weights of one type in one parallel call each
    (up to three per call): Q, K and V, gate and up of a decode step. Each result equals matmul(w, x)'s."""
    if not ws:
        return []
    x = _x(x, ws[0].n_in)
    ys = [np.empty((x.shape[0], w.n_out), np.float32) for w in ws]
    if not x.shape[0]:
        return ys
    if any(w.n_in != x.shape[1] for w in ws):
        raise RepackError("matmul_many needs weights of one input size")
    xq = quantize(x)
    by_type: dict[GGMLType, list[int]] = {}
    for i, w in enumerate(ws):
        by_type.setdefault(w.type, []).append(i)
    for idx in by_type.values():
        for k in range(0, len(idx), 3):
            part = idx[k:k + 3]
            _call([ws[i] for i in part], xq, [ys[i] for i in part])
    return ys


__all__ = ["DEFAULT_TYPES", "NIBBLE_TYPES", "RepackError", "RepackedMatrix", "matmul", "matmul_many", "quantize",
           "repack", "repack_bytes", "repackable"]
