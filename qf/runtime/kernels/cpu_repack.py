"""Repacked weights: the integer kernel's 16-row panels built once, for decode steps and prefill alike.

The integer matmul (cpu_int8.py) decodes each 16-row panel of a weight into a transposed scratch (4
consecutive quants of each of the 16 rows per 64-byte slice, plus scale and offset vectors) on every call;
over a long prompt that is amortised, over one decode token it is not, so decode keeps the f32 kernels.
`repack` builds every panel once, in memory of its own (llama.cpp's repacking of Q4_0 into block_q4_0x8 and
friends is the same idea): one token then costs 16 integer dot products (two activation parts) per unit of
16 rows x 32 weights instead of decoding 32 f32 vectors, and a decode step quantizes its activations, runs
up to three weights (Q, K, V; gate, up) and returns in one numba call.

This is an explicit choice (`CpuBackend(repack=True)`, `qrun/qbench --repack`), never a default: the
panels are RAM next to the mmap (`repack_bytes`, `planner.repack_ram` before loading). A panel row holds
the quants (nibbles, two slices per 64 bytes, for the types whose quants fit 4 bits; else bytes), then the
16-row scale vectors (f16 for the legacy types, whose scales are the file's halves; f32 for K-quants) and
offset vectors (none where the offset is a fixed multiple of the scale): Q4_0, Q4_1 and Q8_0 take exactly
the file's bytes, Q4_K 0.75 byte per weight (1.33x), Q6_K 1.25 (1.52x); the other types (Q5_*, Q3_K,
Q2_K: 1.55-3x) are not repacked by default.

The results are bit for bit those of `cpu.matmul_q8` on two-part activations (the same panels, the same
sums in the same order), for any token count: a row depends on its own token only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from qf.runtime.kernels.cpu_simd import f32x16, prefetch, vmul, vsplat, vzero

# ggml types whose unsigned quants fit in 4 bits: their panels hold nibbles (the other integer types: bytes).
NIBBLE_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q3_K, GGMLType.Q2_K})

# types whose offset is a fixed multiple of the scale (m = coef * s): only the scales are stored
OFFSET_COEF: dict[GGMLType, float] = {GGMLType.Q4_0: -8.0, GGMLType.Q5_0: -16.0, GGMLType.Q8_0: -128.0,
                                      GGMLType.Q3_K: -4.0, GGMLType.Q6_K: -32.0}

# types whose scales and offsets are f16 values of the file (legacy blocks): stored as halves
HALF_SCALE_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0})

# the types a repacking backend repacks: those whose panels take at most about 1.5x the file (the legacy
# 4- and 8-bit types at 1x, the Q4_K_M mix's Q4_K and Q6_K); repack() itself takes any integer-kernel type
DEFAULT_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K})

PREFETCH = 2048  # decode: bytes ahead of the unit being read (as the f32 kernels, cpu_drivers.py)
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


def _vec16_codegen(half: bool):
    """Codegen loading 16 f16 (half) or f32 values at a byte offset of a byte array, as <16 x float>."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        o = context.cast(builder, args[1], sig.args[1], types.intp)
        elem = ir.HalfType() if half else ir.FloatType()
        ptr = builder.bitcast(builder.gep(a.data, [o]), ir.VectorType(elem, 16).as_pointer())
        v = builder.load(ptr, align=2 if half else 4)
        return builder.fpext(v, ir.VectorType(ir.FloatType(), 16)) if half else v
    return codegen


@intrinsic
def vec16_f16(typingctx, buf, off):
    """16 IEEE halves at byte offset off of a byte array, as f32x16 (exact)."""
    return f32x16(buf, off), _vec16_codegen(True)


@intrinsic
def vec16_f32(typingctx, buf, off):
    """16 f32 at byte offset off of a byte array."""
    return f32x16(buf, off), _vec16_codegen(False)


def _scales(kind, q, qb, fl, k):
    """(scale, offset) f32x16 of the 16 rows at scale index k of a panel row q whose quants take qb bytes and
    whose scale vectors hold fl values (the type's storage: f16 or f32, offsets stored or coef * scale)."""


@overload(_scales, inline="always")
def _ov_scales(kind, q, qb, fl, k):
    t = GGMLType(kind.qtype)
    load = vec16_f16 if t in HALF_SCALE_TYPES else vec16_f32
    es = 2 if t in HALF_SCALE_TYPES else 4
    coef = OFFSET_COEF.get(t)
    if coef is not None:
        c = np.float32(coef)

        def derived(kind, q, qb, fl, k):
            s = load(q, qb + es * k)
            return s, vmul(s, vsplat(c))
        return derived

    def stored(kind, q, qb, fl, k):
        return load(q, qb + es * k), load(q, qb + es * (fl + k))
    return stored


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

@njit(inline="always", fastmath=FASTMATH, cache=True)
def _geometry(q, n_in):
    """(units, bytes of the quants, values per scale vector) of a panel row for n_in inputs (one scale per 32)."""
    n_units = n_in // UNIT
    return n_units, n_units * _unit_bytes(q), n_units * PANEL


@njit(fastmath=FASTMATH, cache=True)
def rtile1(stamp, kind, isa, q, qx, dx, sx, out, t, r0):
    """Tokens t .. t + 3 against a stored panel of a type with one scale per 32 weights (cpu_int8.tile1)."""
    n_tok, n_in, plane, t0, t1, t2, t3 = _tokens(qx, t)
    n_units, qb, fl = _geometry(q, n_in)
    ub = _unit_bytes(q)
    f0 = vzero()
    f1 = vzero()
    f2 = vzero()
    f3 = vzero()
    for u in range(n_units):
        w0, w1, w2, w3, w4, w5, w6, w7 = _slices(q, ub * u)
        a = UNIT * u
        s, m = _scales(kind, q, qb, fl, PANEL * u)
        f0 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t0 * n_in + a, plane, s, m, dx[t0, u], sx[t0, u], f0)
        f1 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t1 * n_in + a, plane, s, m, dx[t1, u], sx[t1, u], f1)
        f2 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t2 * n_in + a, plane, s, m, dx[t2, u], sx[t2, u], f2)
        f3 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t3 * n_in + a, plane, s, m, dx[t3, u], sx[t3, u], f3)
    _store4(out, n_tok, t, r0, f0, f1, f2, f3)


@njit(fastmath=FASTMATH, cache=True)
def rone1(stamp, kind, isa, q, qx, dx, sx, out, t, r0):
    """Token t alone, as rtile1 computes each of its tokens (a decode step; the last tokens of a batch)."""
    n_tok, n_in, plane, t0, t1, t2, t3 = _tokens(qx, t)
    n_units, qb, fl = _geometry(q, n_in)
    ub = _unit_bytes(q)
    f0 = vzero()
    for u in range(n_units):
        for k in range(0, ub, 64):  # a decode step streams the panels once: fetch ahead
            prefetch(q, ub * u + PREFETCH + k)
        w0, w1, w2, w3, w4, w5, w6, w7 = _slices(q, ub * u)
        s, m = _scales(kind, q, qb, fl, PANEL * u)
        f0 = _unit1(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t0 * n_in + UNIT * u, plane, s, m, dx[t0, u], sx[t0, u],
                    f0)
    _store(out, t, r0, f0)


@njit(fastmath=FASTMATH, cache=True)
def rtile2(stamp, kind, isa, q, qx, dx, sx, out, t, r0):
    """As rtile1 for the types that scale every 16 weights (cpu_int8.tile2; sx: sums per 16)."""
    n_tok, n_in, plane, t0, t1, t2, t3 = _tokens(qx, t)
    n_units, qb, fl = _geometry(q, n_in)
    fl *= 2
    ub = _unit_bytes(q)
    f0 = vzero()
    f1 = vzero()
    f2 = vzero()
    f3 = vzero()
    for u in range(n_units):
        w0, w1, w2, w3, w4, w5, w6, w7 = _slices(q, ub * u)
        a = UNIT * u
        k = 2 * PANEL * u
        s0, m0 = _scales(kind, q, qb, fl, k)
        s1, m1 = _scales(kind, q, qb, fl, k + PANEL)
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
def rone2(stamp, kind, isa, q, qx, dx, sx, out, t, r0):
    """Token t alone, as rtile2 computes each of its tokens."""
    n_tok, n_in, plane, t0, t1, t2, t3 = _tokens(qx, t)
    n_units, qb, fl = _geometry(q, n_in)
    fl *= 2
    ub = _unit_bytes(q)
    f0 = vzero()
    for u in range(n_units):
        for k in range(0, ub, 64):  # a decode step streams the panels once: fetch ahead
            prefetch(q, ub * u + PREFETCH + k)
        w0, w1, w2, w3, w4, w5, w6, w7 = _slices(q, ub * u)
        k = 2 * PANEL * u
        v = 2 * u
        s0, m0 = _scales(kind, q, qb, fl, k)
        s1, m1 = _scales(kind, q, qb, fl, k + PANEL)
        f0 = _unit2(isa, w0, w1, w2, w3, w4, w5, w6, w7, qx, t0 * n_in + UNIT * u, plane, s0, s1, m0, m1, dx[t0, u],
                    sx[t0, v], sx[t0, v + 1], f0)
    _store(out, t, r0, f0)


def _rpanel(stamp, kind, isa, q, qx, dx, sx16, sx32, out, r0):
    """Rows r0 .. r0 + 15 of a stored panel for every token: 4 tokens at a time, the rest one by one."""


@overload(_rpanel, inline="always")
def _ov_rpanel(stamp, kind, isa, q, qx, dx, sx16, sx32, out, r0):
    if IDECODERS[GGMLType(kind.qtype)].subs == 1:
        def panel1(stamp, kind, isa, q, qx, dx, sx16, sx32, out, r0):
            n_tok = qx.shape[-2]
            full = n_tok - n_tok % 4
            for t in range(0, full, 4):
                rtile1(stamp, kind, isa, q, qx, dx, sx32, out, t, r0)
            for t in range(full, n_tok):
                rone1(stamp, kind, isa, q, qx, dx, sx32, out, t, r0)
        return panel1

    def panel2(stamp, kind, isa, q, qx, dx, sx16, sx32, out, r0):
        n_tok = qx.shape[-2]
        full = n_tok - n_tok % 4
        for t in range(0, full, 4):
            rtile2(stamp, kind, isa, q, qx, dx, sx16, out, t, r0)
        for t in range(full, n_tok):
            rone2(stamp, kind, isa, q, qx, dx, sx16, out, t, r0)
    return panel2


@njit(fastmath=FASTMATH, cache=True)
def _rpanels(stamp, kind, isa, w0, w1, w2, p0, p1, qx, dx, sx16, sx32, out0, out1, out2):
    """Panels p0 .. p1 - 1 of the sequence w0, w1, w2 (a plain function: the parallel driver only calls it)."""
    n0 = w0.shape[0]
    n1 = w1.shape[0]
    for p in range(p0, p1):
        if p < n0:
            _rpanel(stamp, kind, isa, w0[p], qx, dx, sx16, sx32, out0, PANEL * p)
        elif p < n0 + n1:
            _rpanel(stamp, kind, isa, w1[p - n0], qx, dx, sx16, sx32, out1, PANEL * (p - n0))
        else:
            _rpanel(stamp, kind, isa, w2[p - n0 - n1], qx, dx, sx16, sx32, out2, PANEL * (p - n0 - n1))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_kernel(stamp, kind, isa, w0, w1, w2, n0, n1, n2, x, n_threads):
    """(x @ w0.T, x @ w1.T, x @ w2.T) for up to three repacked weights of one type (0 panels: none) with n0, n1,
    n2 rows, on n_threads threads; x f32 [M, n_in] is quantized here (two 8-bit parts: in this thread for a short batch, else in
    parallel), then the panels are cut into even shares, one per thread. One call: no Python between."""
    m, n_in = x.shape
    qx = np.empty((2, m, n_in), np.int8)
    dx = np.empty((m, n_in // UNIT), np.float32)
    sx16 = np.empty((m, n_in // 16), np.float32)
    sx32 = np.empty((m, n_in // UNIT), np.float32)
    if m <= SERIAL_TOKENS:
        for t in range(m):
            quantize_row(x, qx, dx, sx16, sx32, t)
    else:
        for t in prange(m):
            quantize_row(x, qx, dx, sx16, sx32, t)
    out0 = np.empty((m, n0), np.float32)
    out1 = np.empty((m, n1), np.float32)
    out2 = np.empty((m, n2), np.float32)
    n_panels = w0.shape[0] + w1.shape[0] + w2.shape[0]
    n_items = max(1, min(n_threads, n_panels))
    per = (n_panels + n_items - 1) // n_items
    for c in prange(n_items):
        _rpanels(stamp, kind, isa, w0, w1, w2, c * per, min(n_panels, (c + 1) * per), qx, dx, sx16, sx32, out0, out1,
                 out2)
    return out0, out1, out2


# ------------------------------------------------------------------ building the panels (at load)

@njit(parallel=True, fastmath=FASTMATH, cache=True)
def build_kernel(stamp, kind, w, q, sc, mn, scratch, nibbles):
    """Every panel of w: quants q u8 [panels, units * (256 if nibbles else 512)], sc / mn f32
    [panels, subs * units * 16]; scratch u8 [items, units * 512] (one 8-bit panel per work item)."""
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


# ------------------------------------------------------------------ Python side

def _aligned(rows: int, cols: int) -> np.ndarray:
    """A zeroed u8 [rows, cols] array whose rows start on 64-byte boundaries (cols a multiple of 64)."""
    raw = np.zeros(rows * cols + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip:skip + rows * cols].reshape(rows, cols)


def repackable(t: GGMLType | int) -> bool:
    """Whether the integer kernels have a decoder for t (so that its panels can be stored)."""
    try:
        return GGMLType(t) in IDECODERS
    except ValueError:
        return False


def _layout(t: GGMLType, n_in: int) -> tuple[int, int, int]:
    """(quant bytes, scale values per vector, row bytes with the scales, padded to 64) of one panel of type t."""
    units = n_in // UNIT
    qb = units * (UNIT_BYTES // 2 if t in NIBBLE_TYPES else UNIT_BYTES)
    fl = IDECODERS[t].subs * units * PANEL
    sb = fl * (2 if t in HALF_SCALE_TYPES else 4) * (1 if t in OFFSET_COEF else 2)
    return qb, fl, -(-(qb + sb) // 64) * 64


def repack_bytes(t: GGMLType | int, n_in: int, n_out: int) -> int:
    """RAM that repacking a [n_out, n_in] weight of type t takes (0 for a type that is not repacked)."""
    t = GGMLType(t)
    if not repackable(t) or n_in % UNIT:
        return 0
    return -(-n_out // PANEL) * _layout(t, n_in)[2]


@dataclass(frozen=True, eq=False)
class RepackedMatrix:
    """A weight's integer panels, built once: panels [n_panels, row bytes] (int8 view for nibble quants, u8
    otherwise), each row the panel's quants then its scale vectors (f16 for HALF_SCALE_TYPES, else f32) and
    offset vectors (none for OFFSET_COEF types); base is the mmap'd QMatrix (embedding rows, f32 fallbacks)."""

    base: cpu.QMatrix
    panels: np.ndarray
    call: "MergedCall" = field(init=False, repr=False)  # this weight alone, worked out once

    def __post_init__(self) -> None:
        object.__setattr__(self, "call", MergedCall([self]))

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
    def nbytes(self) -> int:
        """RAM the panels take (beyond the mmap'd weight)."""
        return int(self.panels.nbytes)


def _store_scales(t: GGMLType, panels: np.ndarray, qb: int, sc: np.ndarray, mn: np.ndarray) -> None:
    """Write each panel's scale (and offset) vectors after its quants, in the type's storage."""
    coef = OFFSET_COEF.get(t)
    if coef is not None and not np.array_equal(mn, sc * np.float32(coef)):
        raise RepackError(f"{t.name} offsets are not {coef} x the scales")  # a decoder changed: never silently
    dt = np.float16 if t in HALF_SCALE_TYPES else np.float32
    parts = [sc] if coef is not None else [sc, mn]
    for a in parts:
        if dt is np.float16 and not np.array_equal(a.astype(np.float16).astype(np.float32), a):
            raise RepackError(f"{t.name} scales are not exact halves")
    vals = np.concatenate([a.astype(dt) for a in parts], axis=1).view(np.uint8)
    panels[:, qb:qb + vals.shape[1]] = vals


def repack(w: cpu.QMatrix) -> RepackedMatrix:
    """Build w's integer panels (parallel over panels); RepackError for a type without integer kernels."""
    if not isinstance(w, cpu.QMatrix):
        raise RepackError(f"only quantized kernel matrices can be repacked; got {type(w).__name__}")
    if not repackable(w.type):
        raise RepackError(f"no integer kernel to repack {w.type.name} for")
    t = w.type
    qb, fl, rb = _layout(t, w.n_in)
    n_panels = -(-w.n_out // PANEL)
    panels = _aligned(n_panels, rb)
    sc = np.empty((n_panels, fl), np.float32)
    mn = np.empty((n_panels, fl), np.float32)
    n_items = max(1, min(numba.get_num_threads(), n_panels))
    scratch = _aligned(n_items, w.n_in // UNIT * UNIT_BYTES)
    nib = t in NIBBLE_TYPES
    build_kernel(STAMP, w.kind, w.data, panels[:, :qb], sc, mn, scratch, nib)
    _store_scales(t, panels, qb, sc, mn)
    panels.flags.writeable = False  # one numba specialisation (read-only) for every caller, like the mmap
    return RepackedMatrix(w, panels.view(np.int8) if nib else panels)


_NONE: dict[np.dtype, np.ndarray] = {}


def _none(like: np.ndarray) -> np.ndarray:
    """A read-only 0-panel array of like's dtype (the missing weights of a merged call)."""
    a = _NONE.get(like.dtype)
    if a is None:
        a = _NONE[like.dtype] = np.zeros((0, 64), like.dtype)
        a.flags.writeable = False
    return a


def _x(x: np.ndarray, n_in: int) -> np.ndarray:
    """x as C-contiguous f32 [M, n_in], or RepackError."""
    if x.__class__ is not np.ndarray or x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 2:
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise RepackError(f"activations must be [M, n_in] with n_in={n_in}; got shape {x.shape}")
    return x


class MergedCall:
    """matmul_many's kernel calls for fixed weights, worked out once (the per-step Python is a loop over them):
    the weights grouped by type, up to three per call."""

    __slots__ = ("n_in", "n_out", "calls")

    def __init__(self, ws: Sequence[RepackedMatrix]) -> None:
        if not ws or any(w.n_in != ws[0].n_in for w in ws):
            raise RepackError("merged products need one or more weights of one input size")
        self.n_in = ws[0].n_in
        self.n_out = len(ws)
        by_type: dict[GGMLType, list[int]] = {}
        for i, w in enumerate(ws):
            by_type.setdefault(w.type, []).append(i)
        self.calls = []
        for idx in by_type.values():
            for k in range(0, len(idx), 3):
                part = [ws[i] for i in idx[k:k + 3]]
                none = _none(part[0].panels)
                p = [v.panels for v in part] + [none] * (3 - len(part))
                n = [v.n_out for v in part] + [0] * (3 - len(part))
                self.calls.append((tuple(idx[k:k + 3]), (part[0].base.kind, *p, *n)))

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """[x @ w.T for w in the weights], x f32 [M, n_in]."""
        x = _x(x, self.n_in)
        th = numba.get_num_threads()
        if len(self.calls) == 1:
            idx, (kind, p0, p1, p2, n0, n1, n2) = self.calls[0]
            return list(matmul_kernel(STAMP, kind, cpu.ISA, p0, p1, p2, n0, n1, n2, x, th)[:len(idx)])
        ys: list[np.ndarray] = [None] * self.n_out  # type: ignore[list-item]
        for idx, (kind, p0, p1, p2, n0, n1, n2) in self.calls:
            for i, y in zip(idx, matmul_kernel(STAMP, kind, cpu.ISA, p0, p1, p2, n0, n1, n2, x, th)):
                ys[i] = y
        return ys


def matmul(w: RepackedMatrix, x: np.ndarray) -> np.ndarray:
    """x @ w.T: x f32 [M, n_in] -> f32 [M, n_out] on two-part 8-bit activations (one numba call)."""
    return w.call(x)[0]


def matmul_many(ws: Sequence[RepackedMatrix], x: np.ndarray) -> list[np.ndarray]:
    """[matmul(w, x) for w in ws] with the weights of one type in one parallel call each (up to three per call):
    Q, K and V, gate and up of a decode step. Each result equals matmul(w, x)'s bit for bit. Callers that
    repeat the same weights keep a MergedCall instead."""
    return MergedCall(ws)(x) if ws else []


__all__ = ["DEFAULT_TYPES", "MergedCall", "NIBBLE_TYPES", "RepackError", "RepackedMatrix", "matmul", "matmul_many", "repack",
           "repack_bytes", "repackable"]
