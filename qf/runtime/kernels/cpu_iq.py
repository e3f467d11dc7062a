"""Decoders for ggml's IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256): 4-bit indices into the
non-linear 16-entry table kvalues_iq4nl, looked up 16 at a time.

Layouts and formulas follow ggml-quants.c (dequantize_row_iq4_nl / _iq4_xs): element j of a 32-value unit
is kvalues[qs[j] & 15] and element j + 16 is kvalues[qs[j] >> 4], times the unit's scale: d for IQ4_NL;
d * (ls - 32) for sub-block ib of IQ4_XS, ls = (scales_l[ib / 2] >> 4 (ib % 2) & 15) | ((scales_h >> 2 ib) & 3) << 4.
The lookup is one byte shuffle on x86 (pshufb with the table as bytes, as ggml's AVX2 path does); other
targets look the 16 lanes up one by one.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qf.format.ggml_types import GGMLType, type_size
from qf.quant.iq_tables import kvalues_iq4nl
from qf.runtime.kernels.cpu_decoder import FASTMATH, Decoder
from qf.runtime.kernels.cpu_idecode import IntDecoder
from qf.runtime.kernels.cpu_isimd import q8x32, vget
from qf.runtime.kernels.cpu_registry import register, register_int
from qf.runtime.kernels.cpu_simd import _VF, _VI8, _bytes16, byte_fields, f16_at, f32x16, vadd, vlane, vmul, vsplat

_JIT = dict(inline="always", fastmath=FASTMATH, cache=True)
_B_NL = type_size(GGMLType.IQ4_NL)  # d, qs[16]
_B_XS = type_size(GGMLType.IQ4_XS)  # d, scales_h (u16), scales_l[4], qs[128]
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
_TABLE = [int(v) for v in kvalues_iq4nl()]


def _lookup(builder: ir.IRBuilder, idx: ir.Value) -> ir.Value:
    """table[idx] for <16 x i8> indices in 0..15 -> <16 x i8> values."""
    table = ir.Constant(_VI8, [v & 0xFF for v in _TABLE])
    if _X86:
        fnty = ir.FunctionType(_VI8, [_VI8, _VI8])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.ssse3.pshuf.b.128")
        return builder.call(fn, [table, idx])
    out = ir.Constant(_VI8, None)
    for lane in range(16):
        i = builder.extract_element(idx, ir.Constant(ir.IntType(32), lane))
        out = builder.insert_element(out, builder.extract_element(table, i), ir.Constant(ir.IntType(32), lane))
    return out


@intrinsic
def ld_iq4(typingctx, row, off, high):
    """Lane i = kvalues[nibble of row[off + i]] as f32: the low nibbles, or the high ones when high."""
    def codegen(context, builder, sig, args):
        q = _bytes16(context, builder, sig, args, 0)  # <16 x i8>
        hi = context.cast(builder, args[2], sig.args[2], types.boolean)
        shifted = builder.select(hi, builder.lshr(q, ir.Constant(_VI8, [4] * 16)), q)
        idx = builder.and_(shifted, ir.Constant(_VI8, [15] * 16))
        return builder.sitofp(_lookup(builder, idx), _VF)
    return f32x16(row, off, high), codegen


def _avx512() -> bool:
    """Whether numba's target has AVX-512F (vpermps over 16 lanes: the table lookup in f32)."""
    from qf.runtime.kernels.cpu_isimd import _target_features

    return _X86 and "avx512f" in _target_features()


@intrinsic
def ld_iq4_scaled(typingctx, row, off, high, scale):
    """Lane i = kvalues[nibble of row[off + i]] * scale (low nibbles, or high ones when high), exact in f32.

    With AVX-512 the lookup is one vpermps over the scaled f32 table; elsewhere a byte lookup and a multiply.
    """
    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[3], sig.args[3], types.float32)
        vs = builder.insert_element(ir.Constant(_VF, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)
        vs = builder.shuffle_vector(vs, ir.Constant(_VF, ir.Undefined), zeros)
        q = _bytes16(context, builder, sig, args, 0)  # <16 x i8>
        hi = context.cast(builder, args[2], sig.args[2], types.boolean)
        shifted = builder.select(hi, builder.lshr(q, ir.Constant(_VI8, [4] * 16)), q)
        idx = builder.and_(shifted, ir.Constant(_VI8, [15] * 16))
        if not _avx512():
            return builder.fmul(builder.sitofp(_lookup(builder, idx), _VF), vs, flags=("contract",))
        vi32 = ir.VectorType(ir.IntType(32), 16)
        table = builder.fmul(ir.Constant(_VF, [float(v) for v in _TABLE]), vs, flags=("contract",))
        fnty = ir.FunctionType(_VF, [_VF, vi32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.sf.512")
        return builder.call(fn, [table, builder.zext(idx, vi32)])
    return f32x16(row, off, high, scale), codegen


@intrinsic
def q_iq4(typingctx, row, off):
    """The 32 quants of a unit as unsigned bytes kvalues[nibble] + 128: lanes 0-15 from the low nibbles of the
    16 bytes at off, lanes 16-31 from the high ones (the integer form, cpu_idecode.py)."""
    def codegen(context, builder, sig, args):
        q = _bytes16(context, builder, sig, args, 0)
        lo = _lookup(builder, builder.and_(q, ir.Constant(_VI8, [15] * 16)))
        hi = _lookup(builder, builder.lshr(q, ir.Constant(_VI8, [4] * 16)))
        both = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
        return builder.xor(both, ir.Constant(ir.VectorType(ir.IntType(8), 32), [128] * 32))
    return q8x32(row, off), codegen


@njit(**_JIT)
def head_iq4_nl(row, b):
    """(d, -) of an IQ4_NL block."""
    return f16_at(row, b * _B_NL), 0


@njit(**_JIT)
def unit_iq4_nl(row, b, j, h):
    """y = d * kvalues[q]."""
    o = b * _B_NL + 2
    return ld_iq4_scaled(row, o, False, h[0]), ld_iq4_scaled(row, o, True, h[0])


# lane j (and j + 8) = ls of sub-block j: 4 bits of scales_l[j / 2] | 2 bits of scales_h (bytes 2-3) << 4
_ls_iq4 = byte_fields(a=tuple(4 + j // 2 for j in range(8)) * 2, shift_a=tuple(4 * (j % 2) for j in range(8)) * 2,
                      mask_a=(15,) * 16, b=tuple(2 + j // 4 for j in range(8)) * 2,
                      shift_b=tuple(2 * (j % 4) for j in range(8)) * 2, mask_b=(3,) * 16, up=4)


@njit(**_JIT)
def head_iq4_xs(row, b):
    """(d, scales_h, lanes j = d * (ls_j - 32)) of an IQ4_XS super-block."""
    o = b * _B_XS
    d = f16_at(row, o)
    return d, int(row[o + 2]) | (int(row[o + 3]) << 8), vmul(vsplat(d), vadd(_ls_iq4(row, o), vsplat(-32.0)))


@njit(**_JIT)
def _ls_iq4_xs(row, o, j, sh):
    """The 6-bit scale of sub-block j of the IQ4_XS super-block at byte o (sh: its scales_h)."""
    return ((int(row[o + 4 + j // 2]) >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4)


@njit(**_JIT)
def unit_iq4_xs(row, b, j, h):
    """Sub-block j: y = d * (ls - 32) * kvalues[q]."""
    s = vget(h[2], j)
    q = b * _B_XS + 8 + 16 * j
    return ld_iq4_scaled(row, q, False, s), ld_iq4_scaled(row, q, True, s)


DECODERS: dict[GGMLType, Decoder] = register({
    GGMLType.IQ4_NL: Decoder(head_iq4_nl, unit_iq4_nl, 1),
    GGMLType.IQ4_XS: Decoder(head_iq4_xs, unit_iq4_xs, 8),
})


# ------------------------------------------------------------------ integer forms: q = kvalues + 128, m = -128 s

@njit(**_JIT)
def quants_iq4_nl(row, b, j, h):
    """IQ4_NL levels + 128."""
    return q_iq4(row, b * _B_NL + 2)


@njit(**_JIT)
def scales_iq4_nl(h, j):
    """(d, -128 d) twice."""
    return h[0], -128.0 * h[0], h[0], -128.0 * h[0]


@njit(**_JIT)
def ihead_iq4_xs(row, b):
    """(d, scales_h, row, b): the sub-block scales are read per unit."""
    h = head_iq4_xs(row, b)
    return h[0], h[1], row, b


@njit(**_JIT)
def quants_iq4_xs(row, b, j, h):
    """Sub-block j's levels + 128."""
    return q_iq4(row, b * _B_XS + 8 + 16 * j)


@njit(**_JIT)
def scales_iq4_xs(h, j):
    """s = d (ls - 32), m = -128 s, twice."""
    s = h[0] * (_ls_iq4_xs(h[2], h[3] * _B_XS, j, h[1]) - 32)
    return s, -128.0 * s, s, -128.0 * s


IDECODERS: dict[GGMLType, IntDecoder] = register_int({
    GGMLType.IQ4_NL: IntDecoder(head_iq4_nl, quants_iq4_nl, scales_iq4_nl, 1, 1),
    GGMLType.IQ4_XS: IntDecoder(ihead_iq4_xs, quants_iq4_xs, scales_iq4_xs, 8, 1),
})
