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
sums in the same order), for any token count: a row depends on its own token only. `MergedCall(ws, parts=1)`
quantizes in one part instead (ggml's Q8_0, as llama.cpp; half the dot products, but a whole-model KLD
against the f32 path of ~1e-3 per matrix role on SmolLM2, benchmarks/bench_int8_parts.py: not a default).

With QF_AMX=1 where the host has AMX-INT8 (`cpu_amx.enabled()`), a prefill batch runs each 16-token group of
a panel of a one-scale type (Q4_0, Q4_1, Q8_0, Q4_K) as tile products (`tdpbsud`: 16 tokens x 16 rows x 32
weights per instruction) into the same integer dots, scaled by the same f32 code (cpu_int8.apply1): the same
bits as the VNNI tiles, which take the remaining tokens. Opt-in: per matmul (1 thread, SmolLM2 shapes, M = 64
and 512) it measured +15-20% on a loaded 2-core host, the whole pp512 +4-12% CPU for Q4_0 and nothing
steady for Q8_0 / Q4_K_M; the per-unit tile store and reload of the results, not the tile products, bound it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import NativeValue, intrinsic, models, overload, register_model, typeof_impl, unbox

from qf.format.errors import QFError
from qf.format.ggml_types import GGMLType
from qf.runtime.kernels import cpu, cpu_amx, cpu_registry
from qf.runtime.kernels.cpu_amx import tile_config, tile_dot, tile_load, tile_release, tile_store, tile_zero
from qf.runtime.kernels.cpu_call import entry_point
from qf.runtime.kernels.cpu_decoder import FASTMATH
from qf.runtime.kernels.cpu_idecode import IDECODERS
from qf.runtime.kernels.cpu_int8 import (PANEL, UNIT, UNIT_BYTES, _build_panel, _store, _store4, _tokens, _unit1, _unit2,
                                         apply1, quantize_row)
from qf.runtime.kernels.cpu_isimd import LO_BITS, iadd, iload, ishl, q8x64, wload, wstore
from qf.runtime.kernels.cpu_simd import f32x16, prefetch, vload, vmul, vsplat, vstore, vzero

# ggml types whose unsigned quants fit in 4 bits: their panels hold nibbles (the other integer types: bytes).
NIBBLE_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q3_K, GGMLType.Q2_K})

# types whose offset is a fixed multiple of the scale (m = coef * s): only the scales are stored
OFFSET_COEF: dict[GGMLType, float] = {GGMLType.Q4_0: -8.0, GGMLType.Q5_0: -16.0, GGMLType.Q8_0: -128.0,
                                      GGMLType.Q3_K: -4.0, GGMLType.Q6_K: -32.0}

# types whose scales and offsets are f16 values of the file (legacy blocks): stored as halves
HALF_SCALE_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0})

# the types a repacking backend repacks: those whose panels take at most about 1.5x the file (the legacy
# 4- and 8-bit types at 1x, the Q4_K_M mix's Q4_K 1.33x and Q6_K 1.52x, and Q5_0 1.55x: the Q4_K_M mix's
# fallback for rows that are not a multiple of 256, most of SmolLM2's matrices; repacked, its decode measured
# 1.05-1.12x); repack() itself takes any integer-kernel type
DEFAULT_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K})

PREFETCH = 2048  # decode: bytes ahead of the unit being read (as the f32 kernels, cpu_drivers.py)
SERIAL_TOKENS = 8  # batches of at most this many tokens are quantized in the calling thread (no fork-join)
PARTS = 2  # default 8-bit activation parts of a repacked product (cpu.INT8_PARTS' meaning)


class _StampType(types.Type):
    """numba type of the module's source tag: the hash of every kernel source its kernels inline (cpu_int8.py
    and below), so that numba's disk cache (which only watches this file) never serves a stale kernel; and
    the number of 8-bit activation parts (1 or 2) the kernels it is passed to quantize into."""

    def __init__(self, parts: int, amx: bool) -> None:
        self.parts = parts
        self.amx = amx
        stamp = cpu_registry.source_stamp(extra=("cpu_int8", "cpu_repack", "cpu_amx"))
        super().__init__(name=f"qf_repack({stamp},{parts}{',amx' if amx else ''})")


register_model(_StampType)(models.OpaqueModel)


@unbox(_StampType)
def _unbox_stamp(typ, obj, c):
    """The tag carries no run-time data."""
    return NativeValue(c.context.get_dummy_value())


class _Stamp:
    """The source tag every kernel of this module takes first (one per activation-part count)."""

    __slots__ = ("parts", "_numba_type_")

    def __init__(self, parts: int, amx: bool) -> None:
        self.parts = parts
        self._numba_type_ = _StampType(parts, amx)


@typeof_impl.register(_Stamp)
def _typeof_stamp(val, c):
    """numba type of the tag."""
    return val._numba_type_


AMX = cpu_amx.enabled()  # prefill tiles of 16 tokens on AMX (tdpbsud): opt-in, QF_AMX=1
STAMPS = {1: _Stamp(1, AMX), 2: _Stamp(2, AMX)}  # activation parts -> tag
STAMP = STAMPS[2]


def _planes(stamp, m, n_in):
    """int8 [M, n_in] (one activation part) or [2, M, n_in] (two), as the stamp's type says."""


@overload(_planes, inline="always")
def _ov_planes(stamp, m, n_in):
    if stamp.parts == 1:
        return lambda stamp, m, n_in: np.empty((m, n_in), np.int8)
    return lambda stamp, m, n_in: np.empty((2, m, n_in), np.int8)


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


# ------------------------------------------------------------------ AMX: 16 tokens x 16 rows per tile product

GROUP = 16  # tokens per AMX tile (its rows)


def _stamp_consts(stamp):
    """(parts, amx) of a stamp, as compile-time constants."""


@overload(_stamp_consts, inline="always")
def _ov_stamp_consts(stamp):
    parts, amx = stamp.parts, stamp.amx
    return lambda stamp: (parts, amx)


def _tiles(stamp, kind):
    """Whether the panels of this kind run their 16-token groups on AMX: the stamp has AMX and the type one
    scale per 32 weights (two-scale types, Q6_K, Q3_K, Q2_K, measured no faster: they stay on VNNI)."""


@overload(_tiles, inline="always")
def _ov_tiles(stamp, kind):
    on = stamp.amx and IDECODERS[GGMLType(kind.qtype)].subs == 1
    return lambda stamp, kind: on


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _amx_config():
    """The tile configuration: tiles 0-3 i32 results [16 tokens x 16 rows], 4-5 activations [16 tokens x 32
    bytes], 6-7 weights [8 slices x 64 bytes]."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = UNIT if 4 <= t < 6 else 64
        cfg[48 + t] = UNIT // 4 if t >= 6 else GROUP
    return cfg


def _unpacked(q, wbuf):
    """The panel's quants as bytes in slice layout (512 per unit): nibble panels unpacked into wbuf, byte
    panels as they are."""


@overload(_unpacked, inline="always")
def _ov_unpacked(q, wbuf):
    if q.dtype == types.int8:
        def nibbles(q, wbuf):
            for u in range(wbuf.shape[0] // UNIT_BYTES):
                for k in range(4):
                    a = wload(q, 256 * u + 64 * k)
                    o = UNIT_BYTES * u + 128 * k
                    wstore(wbuf, o, nib_lo(a))
                    wstore(wbuf, o + 64, nib_hi(a))
            return wbuf
        return nibbles
    return lambda q, wbuf: q


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _issue1(parts, slot, qx, a, plane, n_in, src, b, cbuf):
    """One unit's tile products of a one-scale type into result slot `slot`, stored at cbuf[256 slot :]:
    one part: slots 0-3 (tile = slot, weights in tile 6 + slot % 2); two parts: slots 0-1 holding tiles
    (0, 1) or (2, 3), the first part's dots then the second's (weights in tile 6 or 7)."""
    if parts == 1:
        if slot == 0:
            tile_zero(0)
            tile_load(6, src, b, 64)
            tile_load(4, qx, a, n_in)
            tile_dot(0, 4, 6)
            tile_store(0, cbuf, 0, 64)
        elif slot == 1:
            tile_zero(1)
            tile_load(7, src, b, 64)
            tile_load(5, qx, a, n_in)
            tile_dot(1, 5, 7)
            tile_store(1, cbuf, 1024, 64)
        elif slot == 2:
            tile_zero(2)
            tile_load(6, src, b, 64)
            tile_load(4, qx, a, n_in)
            tile_dot(2, 4, 6)
            tile_store(2, cbuf, 2048, 64)
        else:
            tile_zero(3)
            tile_load(7, src, b, 64)
            tile_load(5, qx, a, n_in)
            tile_dot(3, 5, 7)
            tile_store(3, cbuf, 3072, 64)
    elif slot == 0:
        tile_zero(0)
        tile_zero(1)
        tile_load(6, src, b, 64)
        tile_load(4, qx, a, n_in)
        tile_load(5, qx, plane + a, n_in)
        tile_dot(0, 4, 6)
        tile_dot(1, 5, 6)
        tile_store(0, cbuf, 0, 64)
        tile_store(1, cbuf, 1024, 64)
    else:
        tile_zero(2)
        tile_zero(3)
        tile_load(7, src, b, 64)
        tile_load(4, qx, a, n_in)
        tile_load(5, qx, plane + a, n_in)
        tile_dot(2, 4, 7)
        tile_dot(3, 5, 7)
        tile_store(2, cbuf, 2048, 64)
        tile_store(3, cbuf, 3072, 64)


@njit(fastmath=FASTMATH, cache=True)
def amx_group1(stamp, kind, q, src, qx, dx, sx32, out, t, r0, cbuf, facc):
    """Tokens t .. t + 15 against a stored panel of a one-scale type (src: its quants as bytes) on AMX: per
    unit one tdpbsud per activation part gives the integer dots idot gives, scaled as rtile1 does (apply1):
    the same bits. The products of unit u + 1 are issued before unit u is scaled (two result slots)."""
    parts, amx = _stamp_consts(stamp)
    n_tok = qx.shape[-2]
    n_in = qx.shape[-1]
    plane = n_tok * n_in
    n_units, qb, fl = _geometry(q, n_in)
    for j in range(GROUP):
        vstore(facc, PANEL * j, vzero())
    slots = 4 // parts  # results in flight: unit u is scaled while units u + 1 .. u + slots - 1 are multiplied
    for u in range(min(slots - 1, n_units)):
        _issue1(parts, u, qx, t * n_in + UNIT * u, plane, n_in, src, UNIT_BYTES * u, cbuf)
    for u in range(n_units):
        v = u + slots - 1
        if v < n_units:
            _issue1(parts, v % slots, qx, t * n_in + UNIT * v, plane, n_in, src, UNIT_BYTES * v, cbuf)
        c = 256 * parts * (u % slots)
        s, m = _scales(kind, q, qb, fl, PANEL * u)
        for j in range(GROUP):
            i = iload(cbuf, c + PANEL * j)
            if parts == 2:
                i = iadd(ishl(i, LO_BITS), iload(cbuf, c + 256 + PANEL * j))
            vstore(facc, PANEL * j, apply1(i, s, m, dx[t + j, u], sx32[t + j, u], vload(facc, PANEL * j)))
    for j in range(GROUP):
        _store(out, t + j, r0, vload(facc, PANEL * j))


@njit(fastmath=FASTMATH, cache=True)
def amx_groups(stamp, kind, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc):
    """The whole groups of 16 tokens of a stored panel of a one-scale type on AMX; returns the first token left
    (a multiple of 16)."""
    n_tok = qx.shape[-2]
    src = _unpacked(q, wbuf)
    t0 = n_tok - n_tok % GROUP
    for t in range(0, t0, GROUP):
        amx_group1(stamp, kind, q, src, qx, dx, sx32, out, t, r0, cbuf, facc)
    return t0


def _groups(stamp, kind, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc):
    """amx_groups where the stamp has AMX and the batch 16 tokens or more; else 0 (no token done)."""


@overload(_groups, inline="always")
def _ov_groups(stamp, kind, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc):
    if not (stamp.amx and IDECODERS[GGMLType(kind.qtype)].subs == 1):
        return lambda stamp, kind, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc: 0

    def groups(stamp, kind, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc):
        if qx.shape[-2] < GROUP:
            return 0
        return amx_groups(stamp, kind, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc)
    return groups


def _rpanel(stamp, kind, isa, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc):
    """Rows r0 .. r0 + 15 of a stored panel for every token: 16 tokens at a time on AMX (where the stamp
    says), then 4 at a time, the rest one by one; wbuf, cbuf, facc: the AMX scratch of this thread."""


@overload(_rpanel, inline="always")
def _ov_rpanel(stamp, kind, isa, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc):
    if IDECODERS[GGMLType(kind.qtype)].subs == 1:
        def panel1(stamp, kind, isa, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc):
            n_tok = qx.shape[-2]
            t0 = _groups(stamp, kind, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc)
            full = n_tok - n_tok % 4
            for t in range(t0, full, 4):
                rtile1(stamp, kind, isa, q, qx, dx, sx32, out, t, r0)
            for t in range(full, n_tok):
                rone1(stamp, kind, isa, q, qx, dx, sx32, out, t, r0)
        return panel1

    def panel2(stamp, kind, isa, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc):
        n_tok = qx.shape[-2]
        t0 = _groups(stamp, kind, q, qx, dx, sx16, sx32, out, r0, wbuf, cbuf, facc)
        full = n_tok - n_tok % 4
        for t in range(t0, full, 4):
            rtile2(stamp, kind, isa, q, qx, dx, sx16, out, t, r0)
        for t in range(full, n_tok):
            rone2(stamp, kind, isa, q, qx, dx, sx16, out, t, r0)
    return panel2


@njit(fastmath=FASTMATH, cache=True)
def _rpanels(stamp, kind, isa, w0, w1, w2, p0, p1, qx, dx, sx16, sx32, out0, out1, out2):
    """Panels p0 .. p1 - 1 of the sequence w0, w1, w2 (a plain function: the parallel driver only calls it);
    with AMX and 16 tokens or more, this thread configures its tiles first and releases them after."""
    n0 = w0.shape[0]
    n1 = w1.shape[0]
    n_in = qx.shape[-1]
    tiles = _tiles(stamp, kind) and qx.shape[-2] >= GROUP
    wbuf = np.empty((n_in // UNIT) * UNIT_BYTES if tiles else 0, np.uint8)
    cbuf = np.empty(1024 if tiles else 0, np.int32)
    facc = np.empty(GROUP * PANEL if tiles else 0, np.float32)
    if tiles:
        tile_config(_amx_config())
    for p in range(p0, p1):
        if p < n0:
            _rpanel(stamp, kind, isa, w0[p], qx, dx, sx16, sx32, out0, PANEL * p, wbuf, cbuf, facc)
        elif p < n0 + n1:
            _rpanel(stamp, kind, isa, w1[p - n0], qx, dx, sx16, sx32, out1, PANEL * (p - n0), wbuf, cbuf, facc)
        else:
            _rpanel(stamp, kind, isa, w2[p - n0 - n1], qx, dx, sx16, sx32, out2, PANEL * (p - n0 - n1), wbuf, cbuf,
                    facc)
    if tiles:
        tile_release()


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_kernel(stamp, kind, isa, w0, w1, w2, n0, n1, n2, x, n_threads):
    """(x @ w0.T, x @ w1.T, x @ w2.T) for up to three repacked weights of one type (0 panels: none) with n0, n1,
    n2 rows, on n_threads threads; x f32 [M, n_in] is quantized here (two 8-bit parts: in this thread for a short batch, else in
    parallel), then the panels are cut into even shares, one per thread. One call: no Python between."""
    m, n_in = x.shape
    qx = _planes(stamp, m, n_in)
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

    __slots__ = ("n_in", "n_out", "calls", "parts", "stamp", "entries")

    def __init__(self, ws: Sequence[RepackedMatrix], parts: int | None = None) -> None:
        if not ws or any(w.n_in != ws[0].n_in for w in ws):
            raise RepackError("merged products need one or more weights of one input size")
        self.parts = PARTS if parts is None else int(parts)
        if self.parts not in STAMPS:
            raise RepackError(f"activations are quantized in 1 or 2 8-bit parts; got {parts}")
        self.stamp = STAMPS[self.parts]
        self.n_in = ws[0].n_in
        self.n_out = len(ws)
        by_type: dict[GGMLType, list[int]] = {}
        for i, w in enumerate(ws):
            by_type.setdefault(w.type, []).append(i)
        self.calls: list[tuple[tuple[int, ...], tuple[Any, ...]]] = []  # (result indices, leading kernel arguments)
        for idx in by_type.values():
            for k in range(0, len(idx), 3):
                part = [ws[i] for i in idx[k:k + 3]]
                none = _none(part[0].panels)
                p = [v.panels for v in part] + [none] * (3 - len(part))
                n = [v.n_out for v in part] + [0] * (3 - len(part))
                self.calls.append((tuple(idx[k:k + 3]), (self.stamp, part[0].base.kind, cpu.ISA, *p, *n)))
        self.entries: list[Any] | None = None  # matmul_kernel's compiled entry point per call (cpu_call.py)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """[x @ w.T for w in the weights], x f32 [M, n_in]."""
        x = _x(x, self.n_in)
        if not x.flags.writeable:  # one numba type for x: the entry points are resolved for writable arrays
            x = x.copy()
        th = cpu.get_threads()
        if self.entries is None:
            self.entries = [entry_point(matmul_kernel, (*args, x, th)) for _, args in self.calls]
        if len(self.calls) == 1:
            idx, args = self.calls[0]
            return list(self.entries[0](*args, x, th)[:len(idx)])
        ys: list[np.ndarray] = [None] * self.n_out  # type: ignore[list-item]
        for (idx, args), run in zip(self.calls, self.entries):
            for i, y in zip(idx, run(*args, x, th)):
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
