"""Portable SIMD for numba kernels: a 16 x f32 vector type and the loads that decode packed bytes into it.

numba's auto-vectorizer gives up on ggml's array-of-blocks layouts (or vectorizes the wrong loop with
gathers), so the kernels spell their vector work out with these intrinsics. They emit plain LLVM vector IR
(`<16 x float>`, `<16 x i8>`, ...), which LLVM lowers to whatever the host has: one zmm on AVX-512, two
ymm on AVX2, four xmm on SSE/NEON. Every intrinsic is inlined, so constant arguments (shifts, masks) fold.

Byte loads (`ld_*`) take a u8 array (a row of packed blocks) and a byte offset; `vload`/`vstore` take an
f32 array and an element index. Nothing checks bounds: callers index inside their rows.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16  # f32 lanes per vector

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_VF = ir.VectorType(_F32, LANES)
_VI32 = ir.VectorType(_I32, LANES)
_VI16 = ir.VectorType(ir.IntType(16), LANES)
_VI8 = ir.VectorType(ir.IntType(8), LANES)
# Arithmetic may fuse a*b+c into an FMA but is never reordered, so every kernel sums in the order it is
# written (results do not depend on batching or threads); only vsum's lane tree is reassociated.
_FAST = ("contract",)
_REDUCE = ("reassoc", "contract")


class F32x16Type(types.Type):
    """numba type of a 16-lane f32 vector held in registers."""

    def __init__(self) -> None:
        super().__init__(name="f32x16")


f32x16 = F32x16Type()


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    """Lowered as an LLVM <16 x float> value."""

    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, _VF)


# ------------------------------------------------------------------ codegen helpers

def _elem_ptr(context, builder, aryty, ary, idx, elem_ty):
    """Pointer to ary.data[idx] (element units of the array), cast to elem_ty*."""
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(builder.gep(a.data, [idx]), elem_ty.as_pointer())


def _splat(builder, scalar, vty):
    """Broadcast a scalar into every lane of vty."""
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    mask = ir.VectorType(_I32, vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(mask, [0] * vty.count))


def _as(context, builder, val, fromty, toty):
    """numba scalar cast (e.g. int64 offset -> intp, float64 -> float32)."""
    return context.cast(builder, val, fromty, toty)


def _bytes16(context, builder, sig, args, which):
    """The 16 bytes at byte offset args[which + 1] of the u8 array args[which], as <16 x i8>."""
    off = _as(context, builder, args[which + 1], sig.args[which + 1], types.intp)
    return builder.load(_elem_ptr(context, builder, sig.args[which], args[which], off, _VI8), align=1)


def _byte_field(context, builder, sig, args, which):
    """((bytes >> shift) & mask) as <16 x i32> for the (array, offset, shift, mask) args starting at which.

    Widening first and shifting 32-bit lanes measured faster than shifting bytes (x86 has no byte shifts).
    """
    q = builder.zext(_bytes16(context, builder, sig, args, which), _VI32)
    sh = _as(context, builder, args[which + 2], sig.args[which + 2], types.int32)
    mk = _as(context, builder, args[which + 3], sig.args[which + 3], types.int32)
    return builder.and_(builder.lshr(q, _splat(builder, sh, _VI32)), _splat(builder, mk, _VI32))


# ------------------------------------------------------------------ arithmetic

@intrinsic
def vzero(typingctx):
    """All-zero vector."""
    return f32x16(), lambda context, builder, sig, args: ir.Constant(_VF, None)


@intrinsic
def vsplat(typingctx, s):
    """Scalar broadcast to all lanes."""
    def codegen(context, builder, sig, args):
        return _splat(builder, _as(context, builder, args[0], sig.args[0], types.float32), _VF)
    return f32x16(s), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, lanewise (fused where the target has FMA)."""
    def codegen(context, builder, sig, args):
        return builder.fadd(builder.fmul(args[0], args[1], flags=_FAST), args[2], flags=_FAST)
    return f32x16(a, b, c), codegen


@intrinsic
def vmul(typingctx, a, b):
    """a * b, lanewise."""
    return f32x16(a, b), lambda context, builder, sig, args: builder.fmul(args[0], args[1], flags=_FAST)


@intrinsic
def vadd(typingctx, a, b):
    """a + b, lanewise."""
    return f32x16(a, b), lambda context, builder, sig, args: builder.fadd(args[0], args[1], flags=_FAST)


@intrinsic
def vdiv(typingctx, a, b):
    """a / b, lanewise."""
    return f32x16(a, b), lambda context, builder, sig, args: builder.fdiv(args[0], args[1], flags=_FAST)


def _vconst(v: float) -> ir.Constant:
    """A <16 x float> constant."""
    return ir.Constant(_VF, [float(v)] * 16)


@intrinsic
def vexp(typingctx, v):
    """exp of 16 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-7 polynomial; relative error
    ~1e-7); lanes below -87.3 give ~1e-38 rather than 0, above 88.38 ~2.4e38 rather than infinity; NaN lanes
    give garbage."""
    def codegen(context, builder, sig, args):
        x = args[0]
        lo, hi = _vconst(-87.33654), _vconst(88.3762626647949)
        x = builder.select(builder.fcmp_ordered("<", x, lo), lo, x)
        x = builder.select(builder.fcmp_ordered(">", x, hi), hi, x)
        floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF]), "llvm.floor.v16f32")
        fl = _FAST
        n = builder.call(floor, [builder.fadd(builder.fmul(x, _vconst(1.44269504088896341), flags=fl),
                                              _vconst(0.5), flags=fl)])
        r = builder.fsub(x, builder.fmul(n, _vconst(0.693359375), flags=fl), flags=fl)
        r = builder.fsub(r, builder.fmul(n, _vconst(-2.12194440e-4), flags=fl), flags=fl)
        y = _vconst(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            y = builder.fadd(builder.fmul(y, r, flags=fl), _vconst(c), flags=fl)
        y = builder.fadd(builder.fadd(builder.fmul(y, builder.fmul(r, r, flags=fl), flags=fl), r, flags=fl),
                         _vconst(1.0), flags=fl)
        e = builder.shl(builder.add(builder.fptosi(n, _VI32), ir.Constant(_VI32, [127] * 16)),
                        ir.Constant(_VI32, [23] * 16))
        return builder.fmul(y, builder.bitcast(e, _VF), flags=fl)
    return f32x16(v), codegen


@intrinsic
def vsum(typingctx, v):
    """Sum of the 16 lanes (tree order)."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_F32, [_F32, _VF])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [ir.Constant(_F32, 0.0), args[0]], fastmath=_REDUCE)
    return types.float32(v), codegen


@intrinsic
def vmax(typingctx, a, b):
    """max(a, b), lanewise (maxnum: a NaN lane takes the other operand)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF, _VF]), "llvm.maxnum.v16f32")
        return builder.call(fn, [args[0], args[1]])
    return f32x16(a, b), codegen


@intrinsic
def vhmax(typingctx, v):
    """The largest of the 16 lanes."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_F32, [_VF])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.vector.reduce.fmax.v16f32")
        return builder.call(fn, [args[0]])
    return types.float32(v), codegen


@intrinsic
def vhalves(typingctx, a, b):
    """Lanes 0-7 = a, lanes 8-15 = b."""
    def codegen(context, builder, sig, args):
        va = _splat(builder, _as(context, builder, args[0], sig.args[0], types.float32), _VF)
        vb = _splat(builder, _as(context, builder, args[1], sig.args[1], types.float32), _VF)
        return builder.shuffle_vector(va, vb, ir.Constant(_VI32, list(range(8)) + list(range(24, 32))))
    return f32x16(a, b), codegen


@intrinsic
def vlane(typingctx, v, i):
    """Lane i of v broadcast to all lanes."""
    def codegen(context, builder, sig, args):
        k = _as(context, builder, args[1], sig.args[1], types.int32)
        return _splat(builder, builder.extract_element(args[0], k), _VF)
    return f32x16(v, i), codegen


# ------------------------------------------------------------------ f32 arrays (element index)

@intrinsic
def vload(typingctx, arr, i):
    """arr[i : i + 16] of an f32 array."""
    def codegen(context, builder, sig, args):
        idx = _as(context, builder, args[1], sig.args[1], types.intp)
        return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], idx, _VF), align=4)
    return f32x16(arr, i), codegen


@intrinsic
def vstore(typingctx, arr, i, v):
    """arr[i : i + 16] = v for an f32 array."""
    def codegen(context, builder, sig, args):
        idx = _as(context, builder, args[1], sig.args[1], types.intp)
        builder.store(args[2], _elem_ptr(context, builder, sig.args[0], args[0], idx, _VF), align=4)
        return context.get_dummy_value()
    return types.none(arr, i, v), codegen


@intrinsic
def vstore_f16(typingctx, arr, i, v):
    """arr[i : i + 16] = v rounded to IEEE halves (to nearest even, as numpy's astype), for a u16 array."""
    def codegen(context, builder, sig, args):
        idx = _as(context, builder, args[1], sig.args[1], types.intp)
        h = builder.fptrunc(args[2], ir.VectorType(ir.HalfType(), LANES))
        builder.store(h, _elem_ptr(context, builder, sig.args[0], args[0], idx, h.type), align=2)
        return context.get_dummy_value()
    return types.none(arr, i, v), codegen


@intrinsic
def f16_bits(typingctx, x):
    """The IEEE half bits of f32 x rounded to nearest even (numpy's astype(float16)), as u16."""
    def codegen(context, builder, sig, args):
        h = builder.fptrunc(_as(context, builder, args[0], sig.args[0], types.float32), ir.HalfType())
        return builder.bitcast(h, ir.IntType(16))
    return types.uint16(x), codegen


# ------------------------------------------------------------------ packed rows (u8 array, byte offset)

@intrinsic
def f16_at(typingctx, row, off):
    """The little-endian IEEE half at byte offset off, as f32 (exact, subnormals included)."""
    def codegen(context, builder, sig, args):
        o = _as(context, builder, args[1], sig.args[1], types.intp)
        h = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], o, ir.HalfType()), align=1)
        return builder.fpext(h, _F32)
    return types.float32(row, off), codegen


@intrinsic
def f32_at(typingctx, row, off):
    """The little-endian f32 at byte offset off."""
    def codegen(context, builder, sig, args):
        o = _as(context, builder, args[1], sig.args[1], types.intp)
        return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], o, _F32), align=1)
    return types.float32(row, off), codegen


@intrinsic
def bf16_at(typingctx, row, off):
    """The little-endian bfloat16 at byte offset off, as f32."""
    def codegen(context, builder, sig, args):
        o = _as(context, builder, args[1], sig.args[1], types.intp)
        h = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], o, ir.IntType(16)), align=1)
        return builder.bitcast(builder.shl(builder.zext(h, _I32), ir.Constant(_I32, 16)), _F32)
    return types.float32(row, off), codegen


@intrinsic
def ld_f32(typingctx, row, off):
    """16 f32 stored at byte offset off."""
    def codegen(context, builder, sig, args):
        o = _as(context, builder, args[1], sig.args[1], types.intp)
        return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], o, _VF), align=1)
    return f32x16(row, off), codegen


@intrinsic
def ld_f16(typingctx, row, off):
    """16 IEEE halves at byte offset off, widened to f32."""
    def codegen(context, builder, sig, args):
        o = _as(context, builder, args[1], sig.args[1], types.intp)
        vh = ir.VectorType(ir.HalfType(), LANES)
        return builder.fpext(builder.load(_elem_ptr(context, builder, sig.args[0], args[0], o, vh), align=1), _VF)
    return f32x16(row, off), codegen


@intrinsic
def ld_bf16(typingctx, row, off):
    """16 bfloat16 at byte offset off, widened to f32 (the 16 bits become the high half)."""
    def codegen(context, builder, sig, args):
        o = _as(context, builder, args[1], sig.args[1], types.intp)
        h = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], o, _VI16), align=1)
        w = builder.shl(builder.zext(h, _VI32), _splat(builder, ir.Constant(_I32, 16), _VI32))
        return builder.bitcast(w, _VF)
    return f32x16(row, off), codegen


@intrinsic
def ld_i8(typingctx, row, off):
    """16 signed bytes at byte offset off, as f32."""
    def codegen(context, builder, sig, args):
        return builder.sitofp(_bytes16(context, builder, sig, args, 0), _VF)
    return f32x16(row, off), codegen


@intrinsic
def ld_bits(typingctx, row, off, shift, mask):
    """Lane i = (row[off + i] >> shift) & mask, as f32: one bit field of 16 consecutive bytes."""
    def codegen(context, builder, sig, args):
        return builder.uitofp(_byte_field(context, builder, sig, args, 0), _VF)
    return f32x16(row, off, shift, mask), codegen


_VI8x32 = ir.VectorType(ir.IntType(8), 2 * LANES)


def _bytes_field32(context, builder, sig, args, which):
    """((bytes >> shift) & mask) of the 32 bytes at (array, offset, shift, mask) args[which:], as <32 x i8>."""
    off = _as(context, builder, args[which + 1], sig.args[which + 1], types.intp)
    q = builder.load(_elem_ptr(context, builder, sig.args[which], args[which], off, _VI8x32), align=1)
    sh = _as(context, builder, args[which + 2], sig.args[which + 2], types.int8)
    mk = _as(context, builder, args[which + 3], sig.args[which + 3], types.int8)
    return builder.and_(builder.lshr(q, _splat(builder, sh, _VI8x32)), _splat(builder, mk, _VI8x32))


def _widen_halves(builder, q):
    """<32 x i8> (signed) -> [f32x16 of bytes 0-15, f32x16 of bytes 16-31]."""
    out = []
    for k in range(2):
        part = builder.shuffle_vector(q, ir.Constant(_VI8x32, ir.Undefined),
                                      ir.Constant(_VI32, list(range(16 * k, 16 * k + 16))))
        out.append(builder.sitofp(builder.sext(part, _VI32), _VF))
    return out


@intrinsic
def ld_bits2_x2(typingctx, row, off_a, shift_a, mask_a, off_b, shift_b, mask_b, up, bias):
    """Lane i of 32 = (fa | fb << up) - bias, with fa = (row[off_a+i] >> shift_a) & mask_a and fb likewise,
    returned as two f32x16 (lanes 0-15, 16-31).

    The fields are combined in 8-bit lanes (32 elements per operation instead of 16) and widened once;
    every K-quant value fits a signed byte: (fa | fb << up) < 128 and minus bias >= -64.
    """
    def codegen(context, builder, sig, args):
        lo = _bytes_field32(context, builder, sig, args, 0)
        hi = _bytes_field32(context, builder, sig.replace(args=(sig.args[0],) + sig.args[4:7]),
                            (args[0],) + tuple(args[4:7]), 0)
        u = _as(context, builder, args[7], sig.args[7], types.int8)
        bias = _as(context, builder, args[8], sig.args[8], types.int8)
        q = builder.sub(builder.or_(lo, builder.shl(hi, _splat(builder, u, _VI8x32))),
                        _splat(builder, bias, _VI8x32))
        return context.make_tuple(builder, sig.return_type, _widen_halves(builder, q))
    return types.UniTuple(f32x16, 2)(row, off_a, shift_a, mask_a, off_b, shift_b, mask_b, up, bias), codegen


@intrinsic
def ld_bits_flag_x2(typingctx, row, off_a, shift_a, mask_a, off_b, bit, value, bias):
    """Two f32x16 (bytes 0-15, 16-31): fa + (bit `bit` of row[off_b+i] set ? value : 0) - bias per lane,
    with fa = (row[off_a+i] >> shift_a) & mask_a. In 8-bit lanes; the flag is a byte test (a lane mask)."""
    def codegen(context, builder, sig, args):
        lo = _bytes_field32(context, builder, sig, args, 0)
        off = _as(context, builder, args[4], sig.args[4], types.intp)
        hb = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], off, _VI8x32), align=1)
        i8 = ir.IntType(8)
        one = builder.shl(ir.Constant(i8, 1), _as(context, builder, args[5], sig.args[5], types.int8))
        flag = builder.icmp_unsigned("!=", builder.and_(hb, _splat(builder, one, _VI8x32)),
                                     ir.Constant(_VI8x32, None))
        val = _splat(builder, _as(context, builder, args[6], sig.args[6], types.int8), _VI8x32)
        bias = _splat(builder, _as(context, builder, args[7], sig.args[7], types.int8), _VI8x32)
        q = builder.sub(builder.add(lo, builder.select(flag, val, ir.Constant(_VI8x32, None))), bias)
        return context.make_tuple(builder, sig.return_type, _widen_halves(builder, q))
    return types.UniTuple(f32x16, 2)(row, off_a, shift_a, mask_a, off_b, bit, value, bias), codegen


@intrinsic
def ld_nib_qh(typingctx, row, off_qs, shift, off_qh, bit0):
    """Lane i = ((row[off_qs+i] >> shift) & 15) | (bit (bit0 + i) of the LE u32 at off_qh) << 4, as f32.

    The 5-bit quants of Q5_0/Q5_1: 4 bits in a nibble, the fifth in a 32-bit mask per block. bit0 is 0 or
    16: the 16 mask bits become a <16 x i1> lane mask (one k-register move on AVX-512) that selects 16.
    """
    def codegen(context, builder, sig, args):
        lo = _byte_field(context, builder, sig.replace(args=sig.args[:3] + (types.int32,)),
                         tuple(args[:3]) + (ir.Constant(_I32, 15),), 0)
        o = _as(context, builder, args[3], sig.args[3], types.intp)
        qh = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], o, _I32), align=1)
        b0 = _as(context, builder, args[4], sig.args[4], types.int32)
        bits = builder.trunc(builder.lshr(qh, b0), ir.IntType(16))
        mask = builder.bitcast(bits, ir.VectorType(ir.IntType(1), LANES))
        hi = builder.select(mask, _splat(builder, ir.Constant(_I32, 16), _VI32), ir.Constant(_VI32, None))
        return builder.uitofp(builder.or_(lo, hi), _VF)
    return f32x16(row, off_qs, shift, off_qh, bit0), codegen


def byte_fields(a: tuple[int, ...], shift_a: tuple[int, ...], mask_a: tuple[int, ...],
                b: tuple[int, ...], shift_b: tuple[int, ...], mask_b: tuple[int, ...], up: int):
    """An intrinsic (row, off) -> f32x16 gathering one bit field per lane from a few packed bytes.

    Lane i = fa | fb << up with fa = (row[off + a[i]] >> shift_a[i]) & mask_a[i] and fb likewise from the
    b tables. The tables are compile-time constants (e.g. the 6-bit scales of a K-quant block); only the bytes the
    tables name are read (max(a + b) + 1 of them).
    """
    tables = (a, shift_a, mask_a, b, shift_b, mask_b)
    if any(len(t) != LANES for t in tables):
        raise ValueError(f"byte_fields tables need {LANES} entries each")
    n = max(a + b) + 1
    vn = ir.VectorType(ir.IntType(8), n)

    def field(builder, src, idx, sh, mk):
        picked = builder.shuffle_vector(src, ir.Constant(vn, ir.Undefined), ir.Constant(_VI32, list(idx)))
        q = builder.lshr(builder.zext(picked, _VI32), ir.Constant(_VI32, list(sh)))
        return builder.and_(q, ir.Constant(_VI32, list(mk)))

    @intrinsic
    def gather(typingctx, row, off):
        def codegen(context, builder, sig, args):
            o = _as(context, builder, args[1], sig.args[1], types.intp)
            src = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], o, vn), align=1)
            hi = builder.shl(field(builder, src, b, shift_b, mask_b), ir.Constant(_VI32, [up] * LANES))
            return builder.uitofp(builder.or_(field(builder, src, a, shift_a, mask_a), hi), _VF)
        return f32x16(row, off), codegen

    return gather


@intrinsic
def prefetch(typingctx, row, off):
    """Hint the cache to fetch the line holding byte off of row (may lie past the row: never faults)."""
    def codegen(context, builder, sig, args):
        o = _as(context, builder, args[1], sig.args[1], types.intp)
        i8p = ir.IntType(8).as_pointer()
        a = context.make_array(sig.args[0])(context, builder, args[0])
        p = builder.bitcast(a.data, i8p)
        p = builder.gep(p, [o])  # raw byte address; no bounds: prefetches are hints
        fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return types.none(row, off), codegen
