"""Vector loads and decoders of the payload layouts (qf.quant.formats `int` and `fp8`), for cpu_payload.py.

Integer codes: a row is int32 words, code i in bits [i*bits, (i+1)*bits) (32 / bits codes per word). A
vector holds 16 consecutive *words* (from word w0); code position k of every lane is one shift and mask, so
lane l of position k is input (w0 + l) * per_word + k (the activations are laid out to match, see
cpu_payload.py). For rows decoded to f32, `code16` reads 16 consecutive codes in input order instead. The
bit width and the words per scale group are compile-time constants carried by a `PayloadKind` (numba type
name), as cpu_drivers.Kind does for ggml types.

FP8 e4m3fn, two decodes. `ld_e4m3`: the byte b becomes the f32 (sext(b) << 20) & 0x87F00000 (sign kept,
exponent and mantissa moved into the f32 fields), exactly 2^-120 * e4m3(b); three integer operations per 16
bytes, but e4m3 subnormals become f32 subnormals, which cost a microcode assist per vector in an FMA.
`ld_e4m3_x2`: the IEEE half (sext(b) << 7) & 0xBFFF, exactly 2^-8 * e4m3(b), subnormals included (as half
subnormals, which widen to normal f32 in hardware, vcvtph2ps). S.1111.111 (NaN in e4m3fn) is selected to
a NaN when the weight holds any (`Fp8Kind(nan=True)`); a weight checked at load to hold none skips that
compare and select.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import NativeValue, intrinsic, models, overload, register_model, typeof_impl, unbox

from qf.runtime.kernels.cpu_simd import LANES, byte_fields, f32x16

E4M3_SCALE = 256.0  # the f16 decode gives e4m3(b) / E4M3_SCALE; kernels fold it into the scales
E4M3_WIDE = 2.0 ** 60  # ld_e4m3 gives e4m3(b) * 2^-120: the fused kernel takes 2^60 into x, 2^60 into the scales

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I16 = ir.IntType(16)
_VF = ir.VectorType(_F32, LANES)
_VI32 = ir.VectorType(_I32, LANES)
_V32I8 = ir.VectorType(ir.IntType(8), 2 * LANES)
_V32I16 = ir.VectorType(_I16, 2 * LANES)
_V32H = ir.VectorType(ir.HalfType(), 2 * LANES)
_VB = ir.VectorType(ir.IntType(1), LANES)
_FAST = ("contract",)


def _source_stamp() -> str:
    """Short hash of this module and cpu_simd.py (part of every kind's numba type name: a stale cached
    kernel, compiled against older intrinsics, is never picked up)."""
    h = hashlib.sha1()
    here = Path(__file__).parent
    try:
        for name in ("cpu_payload_simd.py", "cpu_simd.py"):
            h.update((here / name).read_bytes())
    except OSError:
        return "nosrc"
    return h.hexdigest()[:12]


_STAMP = _source_stamp()


class PayloadKindType(types.Type):
    """numba type of a PayloadKind: bits per code and scale lanes (words per group, 16 = one group per
    vector); 0 bits tags the fp8 kernels."""

    def __init__(self, bits: int, lanes: int) -> None:
        self.bits, self.lanes = int(bits), int(lanes)
        super().__init__(name=f"qf_payload_kind({self.bits},{self.lanes},{_STAMP})")


register_model(PayloadKindType)(models.OpaqueModel)


@unbox(PayloadKindType)
def _unbox_kind(typ, obj, c):
    """A kind carries no run-time data: its type is the whole message."""
    return NativeValue(c.context.get_dummy_value())


class PayloadKind:
    """Compile-time tag of a payload kernel: bits per code and words per scale group seen by one vector."""

    __slots__ = ("bits", "lanes", "_numba_type_")

    def __init__(self, bits: int, lanes: int) -> None:
        if lanes not in (1, 2, 4, 8, 16):
            raise ValueError(f"scale lanes must be 1, 2, 4, 8 or 16, not {lanes}")
        self.bits, self.lanes = bits, lanes
        self._numba_type_ = PayloadKindType(bits, lanes)

    def __repr__(self) -> str:
        return f"PayloadKind(bits={self.bits}, lanes={self.lanes})"


@typeof_impl.register(PayloadKind)
def _typeof_kind(val, c):
    """numba type of a PayloadKind instance."""
    return val._numba_type_


class U32x16Type(types.Type):
    """numba type of 16 packed u32 words held in a register."""

    def __init__(self) -> None:
        super().__init__(name="u32x16")


u32x16 = U32x16Type()


@register_model(U32x16Type)
class _U32x16Model(models.PrimitiveModel):
    """Lowered as an LLVM <16 x i32> value."""

    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, _VI32)


def _ptr(context, builder, aryty, ary, idx, idxty, elem_ty):
    """Pointer to ary.data[idx] (element units), cast to elem_ty*."""
    a = context.make_array(aryty)(context, builder, ary)
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.bitcast(builder.gep(a.data, [i]), elem_ty.as_pointer())


def _splat(builder, scalar, vty):
    """Broadcast a scalar into every lane of vty."""
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_I32, vty.count),
                                                                                  [0] * vty.count))


def _masked_load(builder, ptr, vty, n, align):
    """Lanes [0, n) of the integer vector vty loaded from ptr, the others 0; nothing past lane n - 1 is read."""
    lanes = ir.Constant(ir.VectorType(_I32, vty.count), list(range(vty.count)))
    mask = builder.icmp_unsigned("<", lanes, _splat(builder, n, ir.VectorType(_I32, vty.count)))
    fnty = ir.FunctionType(vty, [ptr.type, _I32, mask.type, vty])
    name = f"llvm.masked.load.v{vty.count}i{vty.element.width}.p0"
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, [ptr, ir.Constant(_I32, align), mask, ir.Constant(vty, None)])


# ------------------------------------------------------------------ integer codes

@intrinsic
def ld_words(typingctx, row, w):
    """row[w : w + 16] of a u32 row."""
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _VI32), align=4)
    return u32x16(row, w), codegen


@intrinsic
def ld_words_n(typingctx, row, w, n):
    """row[w : w + n] of a u32 row in lanes 0 .. n - 1 (n <= 16), zeros after; reads nothing past them."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _VI32)
        return _masked_load(builder, p, _VI32, context.cast(builder, args[2], sig.args[2], types.int32), 4)
    return u32x16(row, w, n), codegen


@intrinsic
def word_code(typingctx, kind, v, k):
    """Code position k of 16 words as f32: ((v >> k * bits) & (2^bits - 1)), lanewise."""
    bits = kind.bits

    def codegen(context, builder, sig, args):
        sh = builder.mul(context.cast(builder, args[2], sig.args[2], types.int32), ir.Constant(_I32, bits))
        q = builder.lshr(args[1], _splat(builder, sh, _VI32))
        return builder.uitofp(builder.and_(q, ir.Constant(_VI32, [(1 << bits) - 1] * LANES)), _VF)
    return f32x16(kind, v, k), codegen


@intrinsic
def ld_scales(typingctx, kind, srow, g0):
    """The scale of each lane's group: lane l gets srow[g0 + l // lanes] (lanes = the kind's words per group;
    16: srow[g0] in all lanes). Reads srow[g0 : g0 + 16 // lanes]."""
    lanes = kind.lanes
    n = LANES // lanes

    def codegen(context, builder, sig, args):
        vn = ir.VectorType(_F32, n)
        src = builder.load(_ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2], vn), align=4)
        pick = ir.Constant(_VI32, [lane // lanes for lane in range(LANES)])
        return builder.shuffle_vector(src, ir.Constant(vn, ir.Undefined), pick)
    return f32x16(kind, srow, g0), codegen


def per_word(kind):
    """Codes per u32 word of the kind (a compile-time constant)."""


@overload(per_word, inline="always")
def _ov_per_word(kind):
    n = 32 // kind.bits
    return lambda kind: n


def _code_gather(bits: int):
    """An intrinsic (u8 row, byte offset) -> f32x16 of the 16 consecutive codes starting at that byte."""
    a = tuple(lane * bits // 8 for lane in range(LANES))
    sh = tuple(lane * bits % 8 for lane in range(LANES))
    return byte_fields(a, sh, ((1 << bits) - 1,) * LANES, a, (0,) * LANES, (0,) * LANES, 0)


_GATHERS = {bits: _code_gather(bits) for bits in (2, 4, 8)}


def code16(kind, row8, off):
    """Codes c .. c + 15 of a row viewed as bytes (off = c * bits / 8), as f32x16."""


@overload(code16, inline="always")
def _ov_code16(kind, row8, off):
    fn = _GATHERS[kind.bits]
    return lambda kind, row8, off: fn(row8, off)


# ------------------------------------------------------------------ fp8 e4m3fn

class Fp8KindType(types.Type):
    """numba type of an Fp8Kind: whether the decode must turn S.1111.111 bytes into NaN."""

    def __init__(self, nan: bool) -> None:
        self.nan = bool(nan)
        super().__init__(name=f"qf_fp8_kind({int(self.nan)},{_STAMP})")


register_model(Fp8KindType)(models.OpaqueModel)


@unbox(Fp8KindType)
def _unbox_fp8_kind(typ, obj, c):
    """A kind carries no run-time data: its type is the whole message."""
    return NativeValue(c.context.get_dummy_value())


class Fp8Kind:
    """Compile-time tag of the fp8 kernels: nan=False for weights known to hold no NaN pattern (the decode then
    skips the compare and select)."""

    __slots__ = ("nan", "_numba_type_")

    def __init__(self, nan: bool) -> None:
        self.nan = bool(nan)
        self._numba_type_ = Fp8KindType(self.nan)

    def __repr__(self) -> str:
        return f"Fp8Kind(nan={self.nan})"


@typeof_impl.register(Fp8Kind)
def _typeof_fp8_kind(val, c):
    """numba type of an Fp8Kind instance."""
    return val._numba_type_


def _e4m3_x2(builder, q, nan: bool):
    """<32 x i8> e4m3fn bytes -> two f32x16 of e4m3(b) / E4M3_SCALE (with nan: NaN patterns -> NaN; without,
    they would read as +-480, so callers pass nan=False only for weights checked to hold none).

    The half is (sext(b) << 7) & 0xBFFF: sign from the extension, exponent and mantissa moved up by 7."""
    w = builder.sext(q, _V32I16)
    h = builder.and_(builder.shl(w, ir.Constant(_V32I16, [7] * 32)), ir.Constant(_V32I16, [0xBFFF] * 32))
    if nan:
        nan_lanes = builder.icmp_unsigned("==", builder.and_(w, ir.Constant(_V32I16, [0x7F] * 32)),
                                          ir.Constant(_V32I16, [0x7F] * 32))
        h = builder.select(nan_lanes, ir.Constant(_V32I16, [0x7E00] * 32), h)
    f = builder.fpext(builder.bitcast(h, _V32H), ir.VectorType(_F32, 2 * LANES))
    return [builder.shuffle_vector(f, ir.Constant(f.type, ir.Undefined),
                                   ir.Constant(_VI32, list(range(16 * k, 16 * k + 16)))) for k in range(2)]


@intrinsic
def ld_e4m3_x2(typingctx, kind, row, off):
    """The 32 e4m3fn bytes row[off : off + 32] as two f32x16, each value e4m3(b) / E4M3_SCALE."""
    nan = kind.nan

    def codegen(context, builder, sig, args):
        q = builder.load(_ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2], _V32I8), align=1)
        return context.make_tuple(builder, sig.return_type, _e4m3_x2(builder, q, nan))
    return types.UniTuple(f32x16, 2)(kind, row, off), codegen


@intrinsic
def ld_e4m3_x2_n(typingctx, kind, row, off, n):
    """As ld_e4m3_x2 for the n (< 32) bytes row[off : off + n]; lanes from n on are 0."""
    nan = kind.nan

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2], _V32I8)
        q = _masked_load(builder, p, _V32I8, context.cast(builder, args[3], sig.args[3], types.int32), 1)
        return context.make_tuple(builder, sig.return_type, _e4m3_x2(builder, q, nan))
    return types.UniTuple(f32x16, 2)(kind, row, off, n), codegen


def _i32(v: int) -> int:
    """A u32 bit pattern as the signed value an LLVM i32 constant takes."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _e4m3_f32(builder, q, nan: bool):
    """<16 x i8> e4m3fn bytes -> f32x16 of e4m3(b) * 2^-120, exact (subnormals become f32 subnormals).

    The f32 bits are ((b & 0x80) << 24) | ((b & 0x7F) << 20): (sext(b) << 20) & 0x87F00000, sign from the
    extension, exponent and mantissa moved into the f32 fields (the exponent bias 127 - 7 is the 2^-120)."""
    w = builder.sext(q, _VI32)
    f = builder.and_(builder.shl(w, ir.Constant(_VI32, [20] * LANES)), ir.Constant(_VI32, [_i32(0x87F00000)] * LANES))
    if nan:
        nan_lanes = builder.icmp_unsigned("==", builder.and_(w, ir.Constant(_VI32, [0x7F] * LANES)),
                                          ir.Constant(_VI32, [0x7F] * LANES))
        f = builder.select(nan_lanes, ir.Constant(_VI32, [0x7FC00000] * LANES), f)
    return builder.bitcast(f, _VF)


_V16I8 = ir.VectorType(ir.IntType(8), LANES)


@intrinsic
def ld_e4m3(typingctx, kind, row, off):
    """The 16 e4m3fn bytes row[off : off + 16] as f32x16, each value e4m3(b) * 2^-120 (see E4M3_WIDE)."""
    nan = kind.nan

    def codegen(context, builder, sig, args):
        q = builder.load(_ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2], _V16I8), align=1)
        return _e4m3_f32(builder, q, nan)
    return f32x16(kind, row, off), codegen


@intrinsic
def ld_e4m3_n(typingctx, kind, row, off, n):
    """As ld_e4m3 for the n (< 16) bytes row[off : off + n]; lanes from n on are 0, nothing past them read."""
    nan = kind.nan

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2], _V16I8)
        q = _masked_load(builder, p, _V16I8, context.cast(builder, args[3], sig.args[3], types.int32), 1)
        return _e4m3_f32(builder, q, nan)
    return f32x16(kind, row, off, n), codegen
