"""Decoders for ggml's legacy 32-element blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): one unit per block.

Layouts and formulas follow ggml-quants.c (dequantize_row_q4_0 and friends): y = d * q (+ m), with the
4-bit quants of element j in the low nibble of qs[j] and of element j + 16 in the high nibble; Q5 types
keep bit 4 of element j in bit j of a little-endian u32 qh. The head reads the block's f16 scale(s).
"""

from __future__ import annotations

from numba import njit

from qf.format.ggml_types import GGMLType, type_size
from qf.runtime.kernels.cpu_decoder import FASTMATH, Decoder
from qf.runtime.kernels.cpu_registry import register
from qf.runtime.kernels.cpu_simd import f16_at, ld_bits, ld_i8, ld_nib_qh, vfma, vmul, vsplat

_JIT = dict(inline="always", fastmath=FASTMATH, cache=True)

_B_Q4_0 = type_size(GGMLType.Q4_0)  # d, qs[16]
_B_Q4_1 = type_size(GGMLType.Q4_1)  # d, m, qs[16]
_B_Q5_0 = type_size(GGMLType.Q5_0)  # d, qh[4], qs[16]
_B_Q5_1 = type_size(GGMLType.Q5_1)  # d, m, qh[4], qs[16]
_B_Q8_0 = type_size(GGMLType.Q8_0)  # d, qs[32]


@njit(**_JIT)
def head_q4_0(row, b):
    """(d, -) of a Q4_0 block."""
    return f16_at(row, b * _B_Q4_0), 0.0


@njit(**_JIT)
def head_q4_1(row, b):
    """(d, m) of a Q4_1 block."""
    o = b * _B_Q4_1
    return f16_at(row, o), f16_at(row, o + 2)


@njit(**_JIT)
def head_q5_0(row, b):
    """(d, -) of a Q5_0 block."""
    return f16_at(row, b * _B_Q5_0), 0.0


@njit(**_JIT)
def head_q5_1(row, b):
    """(d, m) of a Q5_1 block."""
    o = b * _B_Q5_1
    return f16_at(row, o), f16_at(row, o + 2)


@njit(**_JIT)
def head_q8_0(row, b):
    """(d, -) of a Q8_0 block."""
    return f16_at(row, b * _B_Q8_0), 0.0


@njit(**_JIT)
def unit_q4_0(row, b, j, h):
    """y = d * (q - 8)."""
    o = b * _B_Q4_0 + 2
    vd = vsplat(h[0])
    vb = vsplat(-8.0 * h[0])
    return vfma(ld_bits(row, o, 0, 15), vd, vb), vfma(ld_bits(row, o, 4, 15), vd, vb)


@njit(**_JIT)
def unit_q4_1(row, b, j, h):
    """y = d * q + m."""
    o = b * _B_Q4_1 + 4
    vd = vsplat(h[0])
    vm = vsplat(h[1])
    return vfma(ld_bits(row, o, 0, 15), vd, vm), vfma(ld_bits(row, o, 4, 15), vd, vm)


@njit(**_JIT)
def unit_q5_0(row, b, j, h):
    """y = d * (q - 16)."""
    o = b * _B_Q5_0
    vd = vsplat(h[0])
    vb = vsplat(-16.0 * h[0])
    return vfma(ld_nib_qh(row, o + 6, 0, o + 2, 0), vd, vb), vfma(ld_nib_qh(row, o + 6, 4, o + 2, 16), vd, vb)


@njit(**_JIT)
def unit_q5_1(row, b, j, h):
    """y = d * q + m."""
    o = b * _B_Q5_1
    vd = vsplat(h[0])
    vm = vsplat(h[1])
    return vfma(ld_nib_qh(row, o + 8, 0, o + 4, 0), vd, vm), vfma(ld_nib_qh(row, o + 8, 4, o + 4, 16), vd, vm)


@njit(**_JIT)
def unit_q8_0(row, b, j, h):
    """y = d * q."""
    o = b * _B_Q8_0 + 2
    vd = vsplat(h[0])
    return vmul(ld_i8(row, o), vd), vmul(ld_i8(row, o + 16), vd)


DECODERS = register({
    GGMLType.Q4_0: Decoder(head_q4_0, unit_q4_0, 1),
    GGMLType.Q4_1: Decoder(head_q4_1, unit_q4_1, 1),
    GGMLType.Q5_0: Decoder(head_q5_0, unit_q5_0, 1),
    GGMLType.Q5_1: Decoder(head_q5_1, unit_q5_1, 1),
    GGMLType.Q8_0: Decoder(head_q8_0, unit_q8_0, 1),
})
