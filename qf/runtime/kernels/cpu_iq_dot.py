"""Integer matvec (decode, one token) for the IQ types: 8-bit activations, one integer dot product per unit.

The f32 matvec (cpu_drivers.py) widens, converts and scales every grid byte; for the grid types that is most
of the work (IQ3_S, IQ2_XS: about half of Q4_K's speed). llama.cpp decodes them against 8-bit activations
instead, and so does this kernel:

1. the token is quantized once per call as for the integer prefill (cpu.quantize_q8: ggml's Q8_0 blocks of
   32, one 8-bit part, or two for ~15 bits);
2. each unit of 32 weights costs one `vpdpbusd` on 32 bytes (AVX-512 VNNI / AVX-VNNI, 256-bit; plain
   widening IR elsewhere) whose 8 lanes hold exact sums of 4 products, then one conversion and one
   multiply-add by (s0 da, s1 da) into an f32x8 accumulator (lanes 0-3: the unit's first 16 weights, 4-7:
   the second 16, so types scaling every 16 weights need nothing more). Two forms of the weights:
   - signed (`SIGNED`: IQ3_S, IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, as llama.cpp): the grid bytes (all >= 0) are
     the unsigned operand and the activations take the weights' sign bits (one masked negation); the sign
     bytes of ksigns-coded types are computed once per block (32 at a time), the 16 half-unit factors
     once per block as a vector (times the activation scales), so a unit is a gather, a negation, a dot;
   - q + 128 (the other types: IQ4_NL, IQ4_XS, IQ1_S, IQ1_M, through their integer decoders
     cpu_idecode.IntDecoder, w = s (q - 128)): the dot starts from c = -128 * (sum of each 4 activations),
     precomputed per call, so its lanes hold sums of (q - 128) qa.

Rows are summed unit by unit in a fixed order (two accumulators, even and odd units), so a row's result does
not depend on the thread count. Against the exact product of the weights and the dequantized activations
the error is the f32 rounding of each unit's scaling and accumulation (tests/test_iq_decode.py); against the
f32 matvec, that of the 8-bit activations (~1e-3 relative with one part, as llama.cpp's Q8_K; ~1e-5 with two).
Indices come from cpu_iq_low's loaders (masked to their tables), so arbitrary bytes read nothing outside them.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from typing import Callable, NamedTuple

from numba.extending import overload

from qf.format.ggml_types import GGMLType, type_size
from qf.runtime.kernels import cpu_iq_low as L
from qf.runtime.kernels.cpu_decoder import FASTMATH
from qf.runtime.kernels.cpu_int8 import ihead, iquants, iscales, iunits_per_block
from qf.runtime.kernels.cpu_isimd import LO_BITS, q8x32
from qf.runtime.kernels.cpu_simd import byte_fields, f16_at, f32x16, prefetch, vadd, vload, vmul, vsplat

# the types this kernel computes: their integer decoders give w = s (q - 128) (checked by the tests)
TYPES: tuple[GGMLType, ...] = (GGMLType.IQ4_NL, GGMLType.IQ4_XS, GGMLType.IQ3_XXS, GGMLType.IQ3_S,
                               GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S, GGMLType.IQ1_S, GGMLType.IQ1_M)
UNIT = 32  # weights per unit (= activation block)
PREFETCH = 2048  # bytes ahead of the block being decoded

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_V8I32 = ir.VectorType(_I32, 8)
_V8F = ir.VectorType(_F32, 8)
_V32I8 = ir.VectorType(_I8, 32)
_V16F = ir.VectorType(_F32, 16)
_V16I32 = ir.VectorType(_I32, 16)
_FAST = ("contract",)


class _F32x8Type(types.Type):
    """numba type of an 8-lane f32 accumulator held in a register."""

    def __init__(self) -> None:
        super().__init__(name="f32x8")


f32x8 = _F32x8Type()


@register_model(_F32x8Type)
class _F32x8Model(models.PrimitiveModel):
    """Lowered as an LLVM <8 x float> value."""

    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, _V8F)


# ------------------------------------------------------------------ intrinsics

def _ptr(context, builder, aryty, ary, off, llty):
    """Pointer to element offset off (flat, from the first element) of a C-contiguous array, as llty*."""
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(builder.gep(a.data, [off]), llty.as_pointer())


def _dot_vnni(builder, acc, w, x):
    """acc + vpdpbusd(w, x) on 256 bits (AVX-512 VNNI with VL, or AVX-VNNI)."""
    fnty = ir.FunctionType(_V8I32, [_V8I32, _V32I8, _V32I8])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.256")
    return builder.call(fn, [acc, w, x])


def _dot_generic(builder, acc, w, x):
    """acc + (lane k: sum of the 4 products u8 w[4k + i] * s8 x[4k + i]) in plain widening IR."""
    v32i32 = ir.VectorType(_I32, 32)
    p = builder.mul(builder.zext(w, v32i32), builder.sext(x, v32i32))

    def lanes(k):
        return builder.shuffle_vector(p, p, ir.Constant(_V8I32, list(range(k, 32, 4))))
    return builder.add(acc, builder.add(builder.add(lanes(0), lanes(1)), builder.add(lanes(2), lanes(3))))


_DOTS = {"avx512vnni": _dot_vnni, "avxvnni": _dot_vnni, "generic": _dot_generic}


def _scales(builder, s0, s1):
    """<8 x float> (s0 in lanes 0-3, s1 in lanes 4-7)."""
    v = ir.Constant(_V8F, ir.Undefined)
    for k in range(8):
        v = builder.insert_element(v, s0 if k < 4 else s1, ir.Constant(_I32, k))
    return v


@intrinsic
def unit_dot(typingctx, isa, acc, q, qx, a, nc, c, s0, s1):
    """acc + f32(I) * (s0 x4, s1 x4): I lane k = nc[c + k] + sum_i q[4k + i] qx[a + 4k + i] (one part), or
    with two parts (qx [2, 1, n_in], nc [2, n]) (I_hi << LO_BITS) + I_lo; a, c: flat offsets in part 0."""
    emit = _DOTS[isa.isa]
    two = qx.ndim == 3

    def codegen(context, builder, sig, args):
        intp = types.intp
        ao = context.cast(builder, args[4], sig.args[4], intp)
        co = context.cast(builder, args[6], sig.args[6], intp)

        def part(k):
            qa = context.make_array(sig.args[3])(context, builder, args[3])
            ca = context.make_array(sig.args[5])(context, builder, args[5])
            ap = builder.add(ao, cgutils.unpack_tuple(builder, qa.shape, 3)[2]) if k else ao
            cp = builder.add(co, cgutils.unpack_tuple(builder, ca.shape, 2)[1]) if k else co
            xv = builder.load(_ptr(context, builder, sig.args[3], args[3], ap, _V32I8), align=1)
            cv = builder.load(_ptr(context, builder, sig.args[5], args[5], cp, _V8I32), align=4)
            return emit(builder, cv, args[2], xv)

        i = part(0)
        if two:
            i = builder.add(builder.shl(i, ir.Constant(_V8I32, [LO_BITS] * 8)), part(1))
        f0 = context.cast(builder, args[7], sig.args[7], types.float32)
        f1 = context.cast(builder, args[8], sig.args[8], types.float32)
        prod = builder.fmul(builder.sitofp(i, _V8F), _scales(builder, f0, f1), flags=_FAST)
        return builder.fadd(prod, args[1], flags=_FAST)
    return f32x8(isa, acc, q, qx, a, nc, c, s0, s1), codegen


@intrinsic
def sunit_dot(typingctx, isa, acc, q, signs, qx, a, sd, j):
    """acc + f32(I) * (sd[2j] x4, sd[2j + 1] x4): I lane k = sum_i q[4k + i] * (+-qx[a + 4k + i]), the
    activation negated where bit 4k + i of signs is set; two parts (qx [2, 1, n_in]): (I_hi << LO_BITS) + I_lo."""
    emit = _DOTS[isa.isa]
    two = qx.ndim == 3

    def codegen(context, builder, sig, args):
        ao = context.cast(builder, args[5], sig.args[5], types.intp)
        mask = builder.bitcast(builder.trunc(context.cast(builder, args[3], sig.args[3], types.int64), _I32),
                               ir.VectorType(ir.IntType(1), 32))
        zero = ir.Constant(_V8I32, None)

        def part(k):
            qa = context.make_array(sig.args[4])(context, builder, args[4])
            ap = builder.add(ao, cgutils.unpack_tuple(builder, qa.shape, 3)[2]) if k else ao
            xv = builder.load(_ptr(context, builder, sig.args[4], args[4], ap, _V32I8), align=1)
            xs = builder.select(mask, builder.sub(ir.Constant(_V32I8, None), xv), xv)
            return emit(builder, zero, args[2], xs)

        i = part(0)
        if two:
            i = builder.add(builder.shl(i, ir.Constant(_V8I32, [LO_BITS] * 8)), part(1))
        jj = builder.trunc(context.cast(builder, args[7], sig.args[7], types.int64), _I32)
        j2 = builder.add(jj, jj)
        f0 = builder.extract_element(args[6], j2)
        f1 = builder.extract_element(args[6], builder.add(j2, ir.Constant(_I32, 1)))
        prod = builder.fmul(builder.sitofp(i, _V8F), _scales(builder, f0, f1), flags=_FAST)
        return builder.fadd(prod, args[1], flags=_FAST)
    return f32x8(isa, acc, q, signs, qx, a, sd, j), codegen


@intrinsic
def ksigns_block(typingctx, row, off):
    """ggml's ksigns of the 7-bit sign indices in the top bits of the 32 u16 at row[off:] (IQ2_XS), as 32
    bytes: the 7 bits plus their parity as bit 7 (byte 4j + k: the signs of group k of unit j)."""
    def codegen(context, builder, sig, args):
        o = context.cast(builder, args[1], sig.args[1], types.intp)
        v16 = ir.VectorType(ir.IntType(16), 32)
        w = builder.load(_ptr(context, builder, sig.args[0], args[0], o, v16), align=1)
        s = builder.trunc(builder.lshr(w, ir.Constant(v16, [9] * 32)), _V32I8)
        pop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I8, [_V32I8]), "llvm.ctpop.v32i8")
        par = builder.shl(builder.and_(builder.call(pop, [s]), ir.Constant(_V32I8, [1] * 32)),
                          ir.Constant(_V32I8, [7] * 32))
        return builder.or_(s, par)
    return q8x32(row, off), codegen


def ksigns_words(words: tuple[int, ...]):
    """An intrinsic (row, off) -> q8x32: byte 4j + k = ksigns of the 7-bit sign index k (bits 7k .. 7k + 6)
    of the u32 at row[off + 4 words[j]], j < 8 (IQ2_XXS, IQ3_XXS: the units' sign words of a block)."""
    n = max(words) + 1
    vn = ir.VectorType(_I32, n)
    v32 = ir.VectorType(_I32, 32)

    @intrinsic
    def load(typingctx, row, off):
        def codegen(context, builder, sig, args):
            o = context.cast(builder, args[1], sig.args[1], types.intp)
            v = builder.load(_ptr(context, builder, sig.args[0], args[0], o, vn), align=1)
            picked = builder.shuffle_vector(v, ir.Constant(vn, ir.Undefined),
                                            ir.Constant(v32, [words[i // 4] for i in range(32)]))
            sh = builder.lshr(picked, ir.Constant(v32, [7 * (i % 4) for i in range(32)]))
            sidx = builder.trunc(builder.and_(sh, ir.Constant(v32, [127] * 32)), _V32I8)
            pop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I8, [_V32I8]), "llvm.ctpop.v32i8")
            par = builder.shl(builder.and_(builder.call(pop, [sidx]), ir.Constant(_V32I8, [1] * 32)),
                              ir.Constant(_V32I8, [7] * 32))
            return builder.or_(sidx, par)
        return q8x32(row, off), codegen
    return load


@intrinsic
def q_word(typingctx, q, j):
    """Bytes 4j .. 4j + 3 of a q8x32 as a little-endian integer."""
    def codegen(context, builder, sig, args):
        words = builder.bitcast(args[0], _V8I32)
        jj = builder.trunc(context.cast(builder, args[1], sig.args[1], types.int64), _I32)
        return builder.zext(builder.extract_element(words, jj), ir.IntType(64))
    return types.int64(q, j), codegen


def u32_top4(words: tuple[int, ...]):
    """An intrinsic (row, off) -> f32x16: lane i = the top 4 bits of the u32 at row[off + 4 words[i]]."""
    n = max(words) + 1
    vn = ir.VectorType(_I32, n)

    @intrinsic
    def load(typingctx, row, off):
        def codegen(context, builder, sig, args):
            o = context.cast(builder, args[1], sig.args[1], types.intp)
            v = builder.load(_ptr(context, builder, sig.args[0], args[0], o, vn), align=1)
            picked = builder.shuffle_vector(v, ir.Constant(vn, ir.Undefined), ir.Constant(_V16I32, list(words)))
            return builder.uitofp(builder.lshr(picked, ir.Constant(_V16I32, [28] * 16)), _V16F)
        return f32x16(row, off), codegen
    return load


@intrinsic
def fzero8(typingctx):
    """All-zero f32x8."""
    return f32x8(), lambda context, builder, sig, args: ir.Constant(_V8F, None)


@intrinsic
def fsum8(typingctx, a, b):
    """Sum of the 8 lanes of a + b, as a scalar (a fixed lane tree)."""
    def codegen(context, builder, sig, args):
        v = builder.fadd(args[0], args[1])
        for n in (4, 2, 1):
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(_I32, 0))
    return types.float32(a, b), codegen


# ------------------------------------------------------------------ the signed form of the grid types

class DotDecoder(NamedTuple):
    """A grid type as unsigned grid bytes and sign bits (the activations take the signs, as in llama.cpp)."""

    head: Callable  # (row, b) -> h: what the block's units share
    mags: Callable  # (row, b, j, h) -> q8x32: unit j's grid bytes (all >= 0)
    signs: Callable  # (row, b, j, h) -> int: bit k set = weight k of unit j is negative
    scales: Callable  # (row, b, h) -> f32x16: lanes 2j, 2j + 1 = the factors of unit j's two halves


_JIT = dict(inline="always", fastmath=FASTMATH, cache=True)
_B3S, _B3XXS = type_size(GGMLType.IQ3_S), type_size(GGMLType.IQ3_XXS)
_B2XXS, _B2XS, _B2S = type_size(GGMLType.IQ2_XXS), type_size(GGMLType.IQ2_XS), type_size(GGMLType.IQ2_S)
_NONE = (0,) * 16
_nib_pairs = byte_fields(a=tuple(i // 4 for i in range(16)), shift_a=tuple(4 * (i // 2 % 2) for i in range(16)),
                         mask_a=(15,) * 16, b=_NONE, shift_b=_NONE, mask_b=_NONE, up=0)  # lanes 2j, 2j+1: nibble j
_aux_2xxs = u32_top4(tuple(i // 2 * 2 + 1 for i in range(16)))  # lanes 2j, 2j+1: top of unit j's second u32
_aux_3xxs = u32_top4(tuple(i // 2 for i in range(16)))  # lanes 2j, 2j+1: top of the j-th u32
_ks_2xxs = ksigns_words(tuple(2 * j + 1 for j in range(8)))  # IQ2_XXS: unit j's second u32
_ks_3xxs = ksigns_words(tuple(range(8)))  # IQ3_XXS: the j-th u32 after the grid bytes


@njit(**_JIT)
def _head_d(row, b, size):
    """(d,) of a block led by its f16 scale."""
    return (f16_at(row, b * size),)


@njit(**_JIT)
def _xxs_scales(top, d, f):
    """d (0.5 + top) f, in ggml's order."""
    return vmul(vmul(vsplat(d), vadd(top, vsplat(0.5))), vsplat(f))


@njit(**_JIT)
def head_iq3_s(row, b):
    """(d,)."""
    return _head_d(row, b, _B3S)


@njit(**_JIT)
def scales_iq3_s(row, b, h):
    """d (1 + 2 s_j)."""
    n = _nib_pairs(row, b * _B3S + 106)
    return vmul(vsplat(h[0]), vadd(vadd(n, n), vsplat(1.0)))


@njit(**_JIT)
def mags_iq3_s(row, b, j, h):
    """8 entries of iq3s_grid, 9-bit indices."""
    o = b * _B3S
    return L.ld_iq3_s(L.G3S, row, o + 2 + 8 * j, int(row[o + 66 + j]))


@njit(**_JIT)
def signs_iq3_s(row, b, j, h):
    """32 stored sign bits."""
    return L.u32_at(row, b * _B3S + 74 + 4 * j)


@njit(**_JIT)
def head_iq3_xxs(row, b):
    """(d, the block's 32 ksigns bytes)."""
    o = b * _B3XXS
    return f16_at(row, o), _ks_3xxs(row, o + 66)


@njit(**_JIT)
def scales_iq3_xxs(row, b, h):
    """d (0.5 + s) / 2."""
    return _xxs_scales(_aux_3xxs(row, b * _B3XXS + 66), h[0], 0.5)


@njit(**_JIT)
def mags_iq3_xxs(row, b, j, h):
    """8 entries of iq3xxs_grid."""
    return L.ld_iq3_xxs(L.G3XXS, row, b * _B3XXS + 2 + 8 * j, 0)


@njit(**_JIT)
def signs_iq3_xxs(row, b, j, h):
    """ksigns of the 4 sign indices in the unit's u32."""
    return q_word(h[1], j)


@njit(**_JIT)
def head_iq2_xxs(row, b):
    """(d, the block's 32 ksigns bytes)."""
    o = b * _B2XXS
    return f16_at(row, o), _ks_2xxs(row, o + 2)


@njit(**_JIT)
def scales_iq2_xxs(row, b, h):
    """d (0.5 + s) / 4."""
    return _xxs_scales(_aux_2xxs(row, b * _B2XXS + 2), h[0], 0.25)


@njit(**_JIT)
def mags_iq2_xxs(row, b, j, h):
    """4 entries of iq2xxs_grid."""
    return L.ld_iq2_xxs(L.G2XXS, row, b * _B2XXS + 2 + 8 * j, 0)


@njit(**_JIT)
def signs_iq2_xxs(row, b, j, h):
    """ksigns of the 4 sign indices in the unit's second u32."""
    return q_word(h[1], j)


@njit(**_JIT)
def head_iq2_xs(row, b):
    """(d, the block's 32 ksigns bytes)."""
    o = b * _B2XS
    return f16_at(row, o), ksigns_block(row, o + 2)


@njit(**_JIT)
def scales_iq2_xs(row, b, h):
    """d (0.5 + s) / 4 per 16 weights."""
    return L._iq2_scales(row, b * _B2XS + 66, h[0])


@njit(**_JIT)
def mags_iq2_xs(row, b, j, h):
    """4 entries of iq2xs_grid, 9-bit indices."""
    return L.ld_iq2_xs(L.G2XS, row, b * _B2XS + 2 + 8 * j, 0)


@njit(**_JIT)
def signs_iq2_xs(row, b, j, h):
    """The unit's 4 ksigns bytes."""
    return q_word(h[1], j)


@njit(**_JIT)
def head_iq2_s(row, b):
    """(d,)."""
    return _head_d(row, b, _B2S)


@njit(**_JIT)
def scales_iq2_s(row, b, h):
    """d (0.5 + s) / 4 per 16 weights."""
    return L._iq2_scales(row, b * _B2S + 74, h[0])


@njit(**_JIT)
def mags_iq2_s(row, b, j, h):
    """4 entries of iq2s_grid, 10-bit indices."""
    o = b * _B2S
    return L.ld_iq2_s(L.G2S, row, o + 2 + 4 * j, int(row[o + 66 + j]))


@njit(**_JIT)
def signs_iq2_s(row, b, j, h):
    """32 stored sign bits."""
    return L.u32_at(row, b * _B2S + 34 + 4 * j)


SIGNED: dict[GGMLType, DotDecoder] = {
    GGMLType.IQ3_S: DotDecoder(head_iq3_s, mags_iq3_s, signs_iq3_s, scales_iq3_s),
    GGMLType.IQ3_XXS: DotDecoder(head_iq3_xxs, mags_iq3_xxs, signs_iq3_xxs, scales_iq3_xxs),
    GGMLType.IQ2_XXS: DotDecoder(head_iq2_xxs, mags_iq2_xxs, signs_iq2_xxs, scales_iq2_xxs),
    GGMLType.IQ2_XS: DotDecoder(head_iq2_xs, mags_iq2_xs, signs_iq2_xs, scales_iq2_xs),
    GGMLType.IQ2_S: DotDecoder(head_iq2_s, mags_iq2_s, signs_iq2_s, scales_iq2_s),
}


# ------------------------------------------------------------------ kernels

@njit(inline="always", fastmath=FASTMATH, cache=True)
def _unit(kind, isa, acc, row, b, j, h, qx, dx, nc):
    """acc + unit j of block b (header h) . its activations (the q + 128 form)."""
    u = b * iunits_per_block(kind) + j
    s0, m0, s1, m1 = iscales(kind, h, j)
    d = dx[0, u]
    return unit_dot(isa, acc, iquants(kind, row, b, j, h), qx, UNIT * u, nc, 8 * u, s0 * d, s1 * d)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _row_q(kind, isa, row, qx, dx, nc, da):
    """One row . the quantized token, weights in the q + 128 form (the integer decoders). Super-blocks of 8
    units are written out unit by unit: constant unit indices keep the block's scale vectors in registers."""
    n_in = qx.shape[-1]
    upb = iunits_per_block(kind)
    nb = n_in // (UNIT * upb)
    step = row.shape[0] // nb if nb else 0  # bytes per block
    a0 = fzero8()
    a1 = fzero8()
    for b in range(nb):
        prefetch(row, b * step + PREFETCH)
        h = ihead(kind, row, b)
        if upb == 8:
            a0 = _unit(kind, isa, a0, row, b, 0, h, qx, dx, nc)
            a1 = _unit(kind, isa, a1, row, b, 1, h, qx, dx, nc)
            a0 = _unit(kind, isa, a0, row, b, 2, h, qx, dx, nc)
            a1 = _unit(kind, isa, a1, row, b, 3, h, qx, dx, nc)
            a0 = _unit(kind, isa, a0, row, b, 4, h, qx, dx, nc)
            a1 = _unit(kind, isa, a1, row, b, 5, h, qx, dx, nc)
            a0 = _unit(kind, isa, a0, row, b, 6, h, qx, dx, nc)
            a1 = _unit(kind, isa, a1, row, b, 7, h, qx, dx, nc)
        elif b % 2 == 0:
            for j in range(upb):
                a0 = _unit(kind, isa, a0, row, b, j, h, qx, dx, nc)
        else:
            for j in range(upb):
                a1 = _unit(kind, isa, a1, row, b, j, h, qx, dx, nc)
    return fsum8(a0, a1)


def shead(kind, row, b):
    """The signed decoder's block head."""


def sunit(kind, isa, acc, row, b, j, h, qx, sd):
    """acc + unit j of block b in the signed form (sd: the block's factors times the activation scales)."""


def sscales(kind, row, b, h):
    """The block's 16 half-unit factors."""


def _signed(kind) -> DotDecoder:
    return SIGNED[GGMLType(kind.qtype)]


@overload(shead, inline="always")
def _ov_shead(kind, row, b):
    fn = _signed(kind).head
    return lambda kind, row, b: fn(row, b)


@overload(sscales, inline="always")
def _ov_sscales(kind, row, b, h):
    fn = _signed(kind).scales
    return lambda kind, row, b, h: fn(row, b, h)


@overload(sunit, inline="always")
def _ov_sunit(kind, isa, acc, row, b, j, h, qx, sd):
    mags, signs = _signed(kind).mags, _signed(kind).signs
    return lambda kind, isa, acc, row, b, j, h, qx, sd: sunit_dot(
        isa, acc, mags(row, b, j, h), signs(row, b, j, h), qx, UNIT * (8 * b + j), sd, j)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _row_s(kind, isa, row, qx, dx, nc, da):
    """One row . the quantized token, weights in the signed form (8 units per block, written out)."""
    nb = qx.shape[-1] // (8 * UNIT)
    step = row.shape[0] // nb if nb else 0
    a0 = fzero8()
    a1 = fzero8()
    for b in range(nb):
        prefetch(row, b * step + PREFETCH)
        h = shead(kind, row, b)
        sd = vmul(sscales(kind, row, b, h), vload(da, 16 * b))
        a0 = sunit(kind, isa, a0, row, b, 0, h, qx, sd)
        a1 = sunit(kind, isa, a1, row, b, 1, h, qx, sd)
        a0 = sunit(kind, isa, a0, row, b, 2, h, qx, sd)
        a1 = sunit(kind, isa, a1, row, b, 3, h, qx, sd)
        a0 = sunit(kind, isa, a0, row, b, 4, h, qx, sd)
        a1 = sunit(kind, isa, a1, row, b, 5, h, qx, sd)
        a0 = sunit(kind, isa, a0, row, b, 6, h, qx, sd)
        a1 = sunit(kind, isa, a1, row, b, 7, h, qx, sd)
    return fsum8(a0, a1)


def _row(kind, isa, row, qx, dx, nc, da):
    """One row . the quantized token: the signed form where the type has one, else the q + 128 form."""


@overload(_row, inline="always")
def _ov_row(kind, isa, row, qx, dx, nc, da):
    if GGMLType(kind.qtype) in SIGNED:
        return lambda kind, isa, row, qx, dx, nc, da: _row_s(kind, isa, row, qx, dx, nc, da)
    return lambda kind, isa, row, qx, dx, nc, da: _row_q(kind, isa, row, qx, dx, nc, da)



@njit(inline="always", fastmath=FASTMATH, cache=True)
def _prepare(qx, dx, nc, da):
    """nc[p, k] = -128 * (sum of the 4 integer activations 4k .. 4k + 3 of part p); qx [1, n] or [2, 1, n];
    da[2u] = da[2u + 1] = dx[0, u] (the scale of activation block u, once per half-unit)."""
    n = qx.shape[-1]
    flat = qx.reshape(-1)
    for p in range(nc.shape[0]):
        for k in range(n // 4):
            o = p * n + 4 * k
            nc[p, k] = -128 * (np.int32(flat[o]) + np.int32(flat[o + 1]) + np.int32(flat[o + 2])
                               + np.int32(flat[o + 3]))
    for u in range(n // UNIT):
        da[2 * u] = dx[0, u]
        da[2 * u + 1] = dx[0, u]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_kernel(kind, isa, w, qx, dx, nc, da, out):
    """out = w @ (the token): qx int8 [1, n_in] or [2, 1, n_in] (cpu.quantize_q8's planes), dx [1, n_in / 32],
    scratch nc int32 [parts, n_in / 4] and da f32 [n_in / 16], out f32 [n_out]; rows split evenly over the threads."""
    _prepare(qx, dx, nc, da)
    for r in prange(w.shape[0]):
        out[r] = _row(kind, isa, w[r], qx, dx, nc, da)


# ------------------------------------------------------------------ calls

def matvec_q8(w, xq, out: np.ndarray | None = None, *, isa=None) -> np.ndarray:
    """w @ the one token of xq (cpu.Q8Activations, M = 1) -> f32 [n_out]; w: a cpu.QMatrix of a type in TYPES."""
    from qf.runtime.kernels import cpu

    if w.type not in TYPES:
        raise cpu.KernelError(f"the integer matvec computes {', '.join(t.name for t in TYPES)}; got {w.type.name}")
    if xq.shape != (1, w.n_in):
        raise cpu.KernelError(f"activations must be one token of {w.n_in} values; got {xq.shape}")
    y = cpu._output(out, (w.n_out,))
    nc = np.empty((xq.parts, w.n_in // 4), np.int32)
    da = np.empty(w.n_in // 16, np.float32)
    matvec_kernel(w.kind, isa or cpu.ISA, w.data, xq.planes, xq.d, nc, da, y)
    return y


def matvec_int(w, x: np.ndarray, out: np.ndarray | None = None, *, parts: int = 1) -> np.ndarray:
    """w @ x for one token x f32 [n_in], on 8-bit activations (`parts` 8-bit parts, cpu.quantize_q8)."""
    from qf.runtime.kernels import cpu

    return matvec_q8(w, cpu.quantize_q8(cpu._activations(x, w.n_in, 1)[None], parts), out)
