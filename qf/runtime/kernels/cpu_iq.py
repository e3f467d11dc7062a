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
from qf.runtime.kernels.cpu_registry import register
from qf.runtime.kernels.cpu_simd import _VF, _VI8, _bytes16, f16_at, f32x16, vmul, vsplat

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


@njit(**_JIT)
def head_iq4_nl(row, b):
    """(d, -) of an IQ4_NL block."""
    return f16_at(row, b * _B_NL), 0


@njit(**_JIT)
def unit_iq4_nl(row, b, j, h):
    """y = d * kvalues[q]."""
    o = b * _B_NL + 2
    vd = vsplat(h[0])
    return vmul(ld_iq4(row, o, False), vd), vmul(ld_iq4(row, o, True), vd)


@njit(**_JIT)
def head_iq4_xs(row, b):
    """(d, scales_h) of an IQ4_XS super-block."""
    o = b * _B_XS
    return f16_at(row, o), int(row[o + 2]) | (int(row[o + 3]) << 8)


@njit(**_JIT)
def unit_iq4_xs(row, b, j, h):
    """Sub-block j: y = d * (ls - 32) * kvalues[q]."""
    o = b * _B_XS
    ls = ((int(row[o + 4 + j // 2]) >> (4 * (j % 2))) & 15) | (((h[1] >> (2 * j)) & 3) << 4)
    vd = vsplat(h[0] * (ls - 32))
    q = o + 8 + 16 * j
    return vmul(ld_iq4(row, q, False), vd), vmul(ld_iq4(row, q, True), vd)


DECODERS: dict[GGMLType, Decoder] = register({
    GGMLType.IQ4_NL: Decoder(head_iq4_nl, unit_iq4_nl, 1),
    GGMLType.IQ4_XS: Decoder(head_iq4_xs, unit_iq4_xs, 8),
})
