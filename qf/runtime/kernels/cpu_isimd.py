"""Integer SIMD for numba kernels: 8-bit quant vectors, the u8 x s8 dot product and the panel transpose.

The integer matmul (cpu_int8.py) works on three vector types, held in registers as LLVM vectors:

    q8x32   <32 x i8>   the 32 unsigned quants of one weight unit, as a decoder returns them
    q8x64   <64 x i8>   one 64-byte slice of a weight panel: 4 consecutive quants of 16 rows
    i32x16  <16 x i32>  integer dot products, one lane per weight row

`idot(isa, acc, w, x, off)` adds to each lane i the dot product of the 4 unsigned bytes of lane i of w with
the 4 signed bytes x[off:off + 4] (broadcast to every lane). How it is emitted is chosen by `isa`, a
compile-time tag (see `Isa`): `vpdpbusd` on 512-bit registers (AVX-512 VNNI), two 256-bit `vpdpbusd`
(AVX-VNNI), or plain widening multiplies and adds that any LLVM target lowers (the portable fallback). No
path saturates: each lane adds four products of at most 255 * 128.

Decoder helpers (`q_*`) build a unit's quants from packed bytes; like cpu_simd.py they take a u8 array and
a byte offset and check no bounds.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import NativeValue, intrinsic, models, register_model, typeof_impl, unbox

from qf.runtime.kernels.cpu_simd import f32x16

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_V32I8 = ir.VectorType(_I8, 32)
_V64I8 = ir.VectorType(_I8, 64)
_V16I32 = ir.VectorType(_I32, 16)
_V16F = ir.VectorType(_F32, 16)


class _VecType(types.Type):
    """numba type of an LLVM vector value held in registers."""

    def __init__(self, name: str, llty: ir.VectorType) -> None:
        self.llty = llty
        super().__init__(name=name)


q8x32 = _VecType("q8x32", _V32I8)
q8x64 = _VecType("q8x64", _V64I8)
i32x16 = _VecType("i32x16", _V16I32)


class _VecModel(models.PrimitiveModel):
    """Lowered as the LLVM vector type the numba type names."""

    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, fe_type.llty)


register_model(_VecType)(_VecModel)


# ------------------------------------------------------------------ the instruction-set tag

# How idot is emitted, best first: (name, LLVM host features it needs).
ISAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("avx512vnni", ("avx512vnni", "avx512bw", "avx512f")),
    ("avxvnni", ("avxvnni", "avx2")),
    ("generic", ()),
)
NATIVE_ISAS = frozenset({"avx512vnni", "avxvnni"})  # the ones that beat f32 BLAS on prefill


class IsaType(types.Type):
    """numba type of an Isa: the instruction set is part of the type (and so of every cached kernel), as is
    the hash of the inlined sources (numba's cache only watches the kernel's own file; see cpu_drivers.py)."""

    def __init__(self, isa: str) -> None:
        from qf.runtime.kernels.cpu_drivers import _STAMP

        self.isa = isa
        super().__init__(name=f"qf_isa({isa},{_STAMP})")


register_model(IsaType)(models.OpaqueModel)


@unbox(IsaType)
def _unbox_isa(typ, obj, c):
    """An Isa carries no run-time data: its type is the whole message."""
    return NativeValue(c.context.get_dummy_value())


class Isa:
    """Compile-time tag choosing how idot is emitted (one compiled kernel per tag)."""

    __slots__ = ("name", "_numba_type_")

    def __init__(self, name: str) -> None:
        if name not in dict(ISAS):
            raise ValueError(f"unknown integer-dot instruction set {name!r}; known: {', '.join(dict(ISAS))}")
        self.name = name
        self._numba_type_ = IsaType(name)

    def __repr__(self) -> str:
        return f"Isa({self.name})"


@typeof_impl.register(Isa)
def _typeof_isa(val, c):
    """numba type of an Isa instance."""
    return val._numba_type_


@lru_cache(maxsize=None)
def _target_features() -> frozenset[str]:
    """LLVM features numba compiles for (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES override the host's)."""
    if config.CPU_NAME:
        feats = config.CPU_FEATURES or ""
        return frozenset(f[1:] for f in feats.split(",") if f.startswith("+"))
    return frozenset(k for k, on in llvm.get_host_cpu_features().items() if on)


def best_isa() -> Isa:
    """The best instruction set numba's target has for idot (QF_INT8_ISA=name forces one)."""
    forced = os.environ.get("QF_INT8_ISA")
    if forced:
        return Isa(forced)
    have = _target_features()
    return Isa(next(name for name, need in ISAS if all(f in have for f in need)))


# ------------------------------------------------------------------ codegen helpers

def _ptr(context, builder, aryty, ary, off, llty):
    """Pointer to byte (u8/i8 arrays) or element offset off of ary, cast to llty*."""
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(builder.gep(a.data, [off]), llty.as_pointer())


def _intp(context, builder, val, ty):
    """A numba integer value as intp."""
    return context.cast(builder, val, ty, types.intp)


def _splat(builder, scalar, vty):
    """Broadcast a scalar into every lane of vty."""
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), mask)


def _shuffle(builder, a, b, idx):
    """shufflevector(a, b, idx) with a Python list of lane indices."""
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(idx)), list(idx)))


def _const8(v: int):
    """A <32 x i8> constant with every lane v."""
    return ir.Constant(_V32I8, [v & 255] * 32)


# ------------------------------------------------------------------ unit quants (q8x32)

@intrinsic
def q_field(typingctx, row, off, shift, mask, up):
    """Lane i = ((row[off + i] >> shift) & mask) << up, for 32 consecutive bytes (compile-time shifts fold)."""
    def codegen(context, builder, sig, args):
        o = _intp(context, builder, args[1], sig.args[1])
        q = builder.load(_ptr(context, builder, sig.args[0], args[0], o, _V32I8), align=1)
        vals = [context.cast(builder, v, t, types.uint8) for v, t in zip(args[2:], sig.args[2:])]
        sh, mk, u = (_splat(builder, v, _V32I8) for v in vals)
        return builder.shl(builder.and_(builder.lshr(q, sh), mk), u)
    return q8x32(row, off, shift, mask, up), codegen


@intrinsic
def q_nibbles(typingctx, row, off):
    """Lanes 0-15 = low nibbles of the 16 bytes at off, lanes 16-31 = their high nibbles (ggml's order)."""
    def codegen(context, builder, sig, args):
        o = _intp(context, builder, args[1], sig.args[1])
        v16 = ir.VectorType(_I8, 16)
        q = builder.load(_ptr(context, builder, sig.args[0], args[0], o, v16), align=1)
        both = _shuffle(builder, q, q, list(range(16)) * 2)
        return builder.and_(builder.lshr(both, ir.Constant(_V32I8, [0] * 16 + [4] * 16)), _const8(15))
    return q8x32(row, off), codegen


@intrinsic
def q_bits32(typingctx, row, off, value):
    """Lane i = value if bit i of the little-endian u32 at off is set, else 0 (Q5_0/Q5_1's fifth bits)."""
    def codegen(context, builder, sig, args):
        o = _intp(context, builder, args[1], sig.args[1])
        bits = builder.load(_ptr(context, builder, sig.args[0], args[0], o, _I32), align=1)
        mask = builder.bitcast(bits, ir.VectorType(ir.IntType(1), 32))
        v = _splat(builder, context.cast(builder, args[2], sig.args[2], types.uint8), _V32I8)
        return builder.select(mask, v, ir.Constant(_V32I8, None))
    return q8x32(row, off, value), codegen


@intrinsic
def q_flag(typingctx, row, off, bit, value):
    """Lane i = value if bit `bit` of row[off + i] is set, else 0, for 32 consecutive bytes."""
    def codegen(context, builder, sig, args):
        o = _intp(context, builder, args[1], sig.args[1])
        q = builder.load(_ptr(context, builder, sig.args[0], args[0], o, _V32I8), align=1)
        one = builder.shl(ir.Constant(_I8, 1), context.cast(builder, args[2], sig.args[2], types.uint8))
        hit = builder.icmp_unsigned("!=", builder.and_(q, _splat(builder, one, _V32I8)), ir.Constant(_V32I8, None))
        v = _splat(builder, context.cast(builder, args[3], sig.args[3], types.uint8), _V32I8)
        return builder.select(hit, v, ir.Constant(_V32I8, None))
    return q8x32(row, off, bit, value), codegen


@intrinsic
def q_or(typingctx, a, b):
    """a | b, lanewise."""
    return q8x32(a, b), lambda context, builder, sig, args: builder.or_(args[0], args[1])


@intrinsic
def q_xor(typingctx, a, c):
    """a ^ c for a compile-time byte c (Q8_0: ^ 0x80 maps a signed byte w to w + 128)."""
    def codegen(context, builder, sig, args):
        return builder.xor(args[0], _splat(builder, context.cast(builder, args[1], sig.args[1], types.uint8), _V32I8))
    return q8x32(a, c), codegen


@intrinsic
def q_store(typingctx, buf, off, v):
    """buf[off : off + 32] = v (u8 array, byte offset)."""
    def codegen(context, builder, sig, args):
        o = _intp(context, builder, args[1], sig.args[1])
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], o, _V32I8), align=1)
        return context.get_dummy_value()
    return types.none(buf, off, v), codegen


# ------------------------------------------------------------------ panels

def _transpose_plan() -> list[list[tuple[int, int, list[int]]]]:
    """Three butterfly stages turning 8 vectors of [2 rows x 8 words] into 8 of [16 rows x 1 word].

    Each stage lists (source a, source b, lane indices into a ++ b) per output vector; words are labelled
    (row, word) and followed through the stages, so the masks are derived, not hand-written.
    """
    vecs = [[(2 * v + lane // 8, lane % 8) for lane in range(16)] for v in range(8)]
    stages = []
    # stage s keeps in each output the words whose index has bit (2 - s) equal to h, from sources 2i, 2i+1
    for s in range(3):
        bit = 4 >> s
        out, plan = [], []
        for i in range(4):
            a, b = vecs[2 * i], vecs[2 * i + 1]
            for h in (0, 1):
                want = sorted((lab for lab in a + b if bool(lab[1] & bit) == bool(h)), key=lambda t: (t[1], t[0]))
                plan.append((2 * i, 2 * i + 1, [(a + b).index(lab) for lab in want]))
                out.append(want)
        # reorder so that the next stage pairs vectors holding the same words
        order = sorted(range(8), key=lambda k: (min(w for _, w in out[k]), out[k][0][0]))
        vecs = [out[k] for k in order]
        stages.append([plan[k] for k in order])
    assert all(v == [(r, k) for r in range(16)] for k, v in enumerate(vecs)), "transpose plan"
    return stages


_PLAN = _transpose_plan()


@intrinsic
def panel_transpose(typingctx, buf, off):
    """In place on the 512 bytes at off: 16 rows x 32 quants -> 8 slices of [16 rows x 4 quants].

    Slice k (bytes off + 64 k ...) holds quants 4k .. 4k + 3 of row r in its lane r: the layout idot reads.
    """
    def codegen(context, builder, sig, args):
        o = _intp(context, builder, args[1], sig.args[1])
        base = _ptr(context, builder, sig.args[0], args[0], o, _V16I32)
        vecs = [builder.load(builder.gep(base, [ir.Constant(_I32, v)]), align=1) for v in range(8)]
        for stage in _PLAN:
            vecs = [_shuffle(builder, vecs[a], vecs[b], idx) for a, b, idx in stage]
        for k, v in enumerate(vecs):
            builder.store(v, builder.gep(base, [ir.Constant(_I32, k)]), align=1)
        return context.get_dummy_value()
    return types.none(buf, off), codegen


@intrinsic
def wload(typingctx, buf, off):
    """The 64 bytes at byte offset off of a u8 array, as a panel slice."""
    def codegen(context, builder, sig, args):
        o = _intp(context, builder, args[1], sig.args[1])
        return builder.load(_ptr(context, builder, sig.args[0], args[0], o, _V64I8), align=64)
    return q8x64(buf, off), codegen


@intrinsic
def wstore(typingctx, buf, off, v):
    """buf[off : off + 64] = v (a panel slice; u8 array, byte offset)."""
    def codegen(context, builder, sig, args):
        o = _intp(context, builder, args[1], sig.args[1])
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], o, _V64I8), align=1)
        return context.get_dummy_value()
    return types.none(buf, off, v), codegen


@intrinsic
def iload(typingctx, arr, i):
    """arr[i : i + 16] of an int32 array, as i32x16."""
    def codegen(context, builder, sig, args):
        o = _intp(context, builder, args[1], sig.args[1])
        return builder.load(_ptr(context, builder, sig.args[0], args[0], o, _V16I32), align=4)
    return i32x16(arr, i), codegen


# ------------------------------------------------------------------ the integer dot product

def _dot_vnni512(builder, acc, w, x):
    """acc + vpdpbusd(w, x) on one zmm."""
    fnty = ir.FunctionType(_V16I32, [_V16I32, _V64I8, _V64I8])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, w, x])


def _dot_vnni256(builder, acc, w, x):
    """acc + vpdpbusd(w, x) as two ymm halves (AVX-VNNI: no 512-bit registers)."""
    v8, v32 = ir.VectorType(_I32, 8), ir.VectorType(_I8, 32)
    fnty = ir.FunctionType(v8, [v8, v32, v32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.256")
    halves = []
    for h in (0, 1):
        a = _shuffle(builder, acc, acc, range(8 * h, 8 * h + 8))
        wh = _shuffle(builder, w, w, range(32 * h, 32 * h + 32))
        xh = _shuffle(builder, x, x, range(32 * h, 32 * h + 32))
        halves.append(builder.call(fn, [a, wh, xh]))
    return _shuffle(builder, halves[0], halves[1], range(16))


def _dot_generic(builder, acc, w, x):
    """acc + sum of 4 u8 x s8 products per lane, in plain widening IR (exact in i16: |product| <= 32640)."""
    v64i16 = ir.VectorType(ir.IntType(16), 64)
    p = builder.mul(builder.zext(w, v64i16), builder.sext(x, v64i16))
    v32i32 = ir.VectorType(_I32, 32)
    pairs = builder.add(builder.sext(_shuffle(builder, p, p, range(0, 64, 2)), v32i32),
                        builder.sext(_shuffle(builder, p, p, range(1, 64, 2)), v32i32))
    quads = builder.add(_shuffle(builder, pairs, pairs, range(0, 32, 2)), _shuffle(builder, pairs, pairs, range(1, 32, 2)))
    return builder.add(acc, quads)


_DOTS: dict[str, Callable] = {"avx512vnni": _dot_vnni512, "avxvnni": _dot_vnni256, "generic": _dot_generic}


@intrinsic
def idot(typingctx, isa, acc, w, x, off):
    """acc + (lane i: the 4 u8 of w's lane i . the 4 s8 at x[off:off+4]); x: int8 array, off: element index."""
    emit = _DOTS[isa.isa]

    def codegen(context, builder, sig, args):
        o = _intp(context, builder, args[4], sig.args[4])
        word = builder.load(_ptr(context, builder, sig.args[3], args[3], o, _I32), align=1)
        xv = builder.bitcast(_splat(builder, word, _V16I32), _V64I8)
        return emit(builder, args[1], args[2], xv)
    return i32x16(isa, acc, w, x, off), codegen


@intrinsic
def izero(typingctx):
    """All-zero i32x16."""
    return i32x16(), lambda context, builder, sig, args: ir.Constant(_V16I32, None)


@intrinsic
def icvt(typingctx, v):
    """i32x16 -> f32x16 (exact below 2^24, which every unit's dot product is)."""
    return f32x16(v), lambda context, builder, sig, args: builder.sitofp(args[0], _V16F)


@intrinsic
def ishl(typingctx, v, n):
    """v << n, lanewise (n a compile-time constant)."""
    def codegen(context, builder, sig, args):
        return builder.shl(args[0], _splat(builder, context.cast(builder, args[1], sig.args[1], types.int32), _V16I32))
    return i32x16(v, n), codegen


@intrinsic
def iadd(typingctx, a, b):
    """a + b, lanewise (i32x16)."""
    return i32x16(a, b), lambda context, builder, sig, args: builder.add(args[0], args[1])


@intrinsic
def vget(typingctx, v, i):
    """Lane i of an f32x16, as a scalar."""
    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], context.cast(builder, args[1], sig.args[1], types.int32))
    return types.float32(v, i), codegen


# ------------------------------------------------------------------ activations: 32 f32 -> 32 s8

def _absmax(builder, a, b):
    """max |lane| over the 32 lanes of two f32x16, compared as integers (a NaN wins over inf: NaN spreads)."""
    mag = ir.Constant(_V16I32, [0x7FFFFFFF] * 16)
    ia = builder.and_(builder.bitcast(a, _V16I32), mag)
    ib = builder.and_(builder.bitcast(b, _V16I32), mag)
    both = builder.select(builder.icmp_unsigned(">", ia, ib), ia, ib)
    red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_V16I32]),
                                         "llvm.vector.reduce.umax.v16i32")
    return builder.bitcast(builder.call(red, [both]), _F32)


LO_BITS = 7  # a second activation part counts in steps of d / 2**LO_BITS (|q_lo| <= 64)


def _q8_codegen(parts: int):
    """Codegen of q8_block (parts = 1) or q8x2_block (parts = 2)."""
    def codegen(context, builder, sig, args):
        xo = _intp(context, builder, args[1], sig.args[1])
        p = _ptr(context, builder, sig.args[0], args[0], xo, _V16F)
        halves = [builder.load(p, align=4), builder.load(builder.gep(p, [ir.Constant(_I32, 1)]), align=4)]
        amax = _absmax(builder, *halves)
        zero = ir.Constant(_F32, 0.0)
        nz = builder.fcmp_unordered("!=", amax, zero)  # NaN: not zero, so it spreads through d and id
        vi = _splat(builder, builder.select(nz, builder.fdiv(ir.Constant(_F32, 127.0), amax), zero), _V16F)
        d = builder.fdiv(amax, ir.Constant(_F32, 127.0 * (1 << LO_BITS) if parts == 2 else 127.0))
        mod = builder.module
        rint = cgutils.get_or_insert_function(mod, ir.FunctionType(_V16F, [_V16F]), "llvm.roundeven.v16f32")
        red = cgutils.get_or_insert_function(mod, ir.FunctionType(_I32, [_V16I32]), "llvm.vector.reduce.add.v16i32")
        v16i8 = ir.VectorType(_I8, 16)
        vzero = ir.Constant(_V16F, None)

        def to_int(v):  # |v| <= 127 or NaN (inf or NaN inputs): NaN -> 0 so that fptosi is defined
            return builder.fptosi(builder.select(builder.fcmp_ordered("ord", v, v), v, vzero), _V16I32)

        def store(q, which, h):
            o = _intp(context, builder, args[which + 1], sig.args[which + 1])
            qp = _ptr(context, builder, sig.args[which], args[which], o, v16i8)
            builder.store(builder.trunc(q, v16i8), builder.gep(qp, [ir.Constant(_I32, h)]), align=1)

        sums = []
        for h, x in enumerate(halves):
            v = builder.fmul(x, vi)
            r = builder.call(rint, [v])
            hi = to_int(r)
            store(hi, 2, h)
            if parts == 2:  # v - r is exact (|v - r| <= 0.5), and so is the scaling by a power of two
                lo = to_int(builder.call(rint, [builder.fmul(builder.fsub(v, r), _splat(
                    builder, ir.Constant(_F32, float(1 << LO_BITS)), _V16F))]))
                builder.store(builder.trunc(lo, v16i8), builder.gep(
                    _ptr(context, builder, sig.args[4], args[4], _intp(context, builder, args[3], sig.args[3]), v16i8),
                    [ir.Constant(_I32, h)]), align=1)
                hi = builder.add(builder.shl(hi, _splat(builder, ir.Constant(_I32, LO_BITS), _V16I32)), lo)
            sums.append(builder.call(red, [hi]))
        return context.make_tuple(builder, sig.return_type, [d] + sums)
    return codegen


_Q8_RESULT = types.Tuple((types.float32, types.int32, types.int32))


@intrinsic
def q8_block(typingctx, x, xi, q, qi):
    """Quantize x[xi : xi + 32] (f32) to q[qi : qi + 32] (int8) as ggml's Q8_0 does: d = amax / 127,
    q = round-half-even(x * (127 / amax)); returns (d, sum of q[0:16], sum of q[16:32]) (d = 0 for zeros)."""
    return _Q8_RESULT(x, xi, q, qi), _q8_codegen(1)


@intrinsic
def q8x2_block(typingctx, x, xi, q, qi, q_lo):
    """Two-part 8-bit quantization of x[xi : xi + 32]: q as q8_block, plus q_lo[qi + i] = round((v - q) * 128)
    with v = x * (127 / amax), so that x ~ d * (128 q + q_lo) with d = amax / (127 * 128); returns (d, and
    the sums of 128 q + q_lo over elements 0-15 and 16-31)."""
    return _Q8_RESULT(x, xi, q, qi, q_lo), _q8_codegen(2)
