"""Decoders for ggml's K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): 256-element super-blocks of 8 units.

The head decodes all of a super-block's scales at once into one or two f32x16 vectors (per-sub-block
factors, already multiplied by d / dmin); unit j then broadcasts its lanes and reads its quant bit fields
straight from the packed bytes. Layouts follow ggml-quants.c (dequantize_row_q*_K) and gguf-py quants.py:

    Q2_K  y = d * (sc & 15) * q - dmin * (sc >> 4)      q: 2 bits; a scale byte per 16 elements
    Q3_K  y = d * (sc - 32) * (q - 4 * !hbit)            q: 2 bits + a high bit in hmask; 6-bit scales
    Q4_K  y = d * sc * q - dmin * m                       q: 4 bits; 6-bit sc, m per 32 elements
    Q5_K  y = d * sc * q - dmin * m                       q: 4 bits + a high bit in qh
    Q6_K  y = d * sc * (q - 32)                           q: 4 bits in ql + 2 in qh; i8 scale per 16
"""

from __future__ import annotations

from numba import njit

from qf.format.ggml_types import QK_K, GGMLType, type_size
from qf.runtime.kernels.cpu_decoder import FASTMATH, UNIT, Decoder
from qf.runtime.kernels.cpu_registry import register
from qf.runtime.kernels.cpu_simd import (byte_fields, f16_at, ld_bits, ld_bits2_x2, ld_bits_flag_x2, ld_i8, vfma, vhalves,
                                         vlane, vmul, vsplat)

_JIT = dict(inline="always", fastmath=FASTMATH, cache=True)
_SUB = QK_K // UNIT  # units (32-element sub-blocks) per super-block

_B_Q2_K = type_size(GGMLType.Q2_K)  # scales[16], qs[64], d, dmin
_B_Q3_K = type_size(GGMLType.Q3_K)  # hmask[32], qs[64], scales[12], d
_B_Q4_K = type_size(GGMLType.Q4_K)  # d, dmin, scales[12], qs[128]
_B_Q5_K = type_size(GGMLType.Q5_K)  # d, dmin, scales[12], qh[32], qs[128]
_B_Q6_K = type_size(GGMLType.Q6_K)  # ql[128], qh[64], scales[16] (i8), d

# ggml's get_scale_min_k4 as bit-field tables: lanes 0-7 = scale of sub-block j, lanes 8-15 = its min.
#   j < 4: sc = s[j] & 63,                          m = s[j + 4] & 63
#   j >= 4: sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4,  m = (s[j + 4] >> 4) | (s[j] >> 6) << 4
_scales_k4 = byte_fields(
    a=(0, 1, 2, 3, 8, 9, 10, 11) + (4, 5, 6, 7, 8, 9, 10, 11),
    shift_a=(0,) * 8 + (0, 0, 0, 0, 4, 4, 4, 4),
    mask_a=(63, 63, 63, 63, 15, 15, 15, 15) * 2,
    b=(0, 0, 0, 0, 0, 1, 2, 3) + (0, 0, 0, 0, 4, 5, 6, 7),
    shift_b=(6,) * 16,
    mask_b=(0, 0, 0, 0, 3, 3, 3, 3) * 2,
    up=4,
)

# Q3_K's 16 6-bit scales (unsigned; minus 32 later): low 4 bits from bytes 0-7 (low then high nibbles),
# high 2 bits from bytes 8-11, bit pair g // 4 of byte 8 + g % 4.
_scales_q3_k = byte_fields(
    a=tuple(range(8)) * 2,
    shift_a=(0,) * 8 + (4,) * 8,
    mask_a=(15,) * 16,
    b=tuple(8 + g % 4 for g in range(16)),
    shift_b=tuple(2 * (g // 4) for g in range(16)),
    mask_b=(3,) * 16,
    up=4,
)


@njit(**_JIT)
def head_q2_k(row, b):
    """(d * (sc & 15), -dmin * (sc >> 4)) for the 16 groups of 16 elements."""
    o = _B_Q2_K * b
    dv = vmul(ld_bits(row, o, 0, 15), vsplat(f16_at(row, o + 80)))
    mv = vmul(ld_bits(row, o, 4, 15), vsplat(-f16_at(row, o + 82)))
    return dv, mv


@njit(**_JIT)
def unit_q2_k(row, b, j, h):
    """Bit pair j % 4 of qs half j // 4; groups 2j and 2j + 1."""
    q = _B_Q2_K * b + 16 + 32 * (j // 4)
    sh = 2 * (j % 4)
    v0 = vfma(ld_bits(row, q, sh, 3), vlane(h[0], 2 * j), vlane(h[1], 2 * j))
    v1 = vfma(ld_bits(row, q + 16, sh, 3), vlane(h[0], 2 * j + 1), vlane(h[1], 2 * j + 1))
    return v0, v1


@njit(**_JIT)
def head_q3_k(row, b):
    """d * (sc - 32) for the 16 groups of 16 elements."""
    o = _B_Q3_K * b
    d = f16_at(row, o + 108)
    return vfma(_scales_q3_k(row, o + 96), vsplat(d), vsplat(-32.0 * d))


@njit(**_JIT)
def unit_q3_k(row, b, j, h):
    """Bit pair j % 4 of qs half j // 4 plus bit j of hmask (set: no -4); groups 2j and 2j + 1."""
    o = _B_Q3_K * b
    q = o + 32 + 32 * (j // 4)
    sh = 2 * (j % 4)
    q0, q1 = ld_bits_flag_x2(row, q, sh, 3, o, j, 4, 4)
    return vmul(q0, vlane(h, 2 * j)), vmul(q1, vlane(h, 2 * j + 1))


@njit(**_JIT)
def _head_k4(row, o):
    """Q4_K / Q5_K block at byte o: lanes 0-7 = d * sc[j], lanes 8-15 = -dmin * m[j]."""
    return vmul(_scales_k4(row, o + 4), vhalves(f16_at(row, o), -f16_at(row, o + 2)))


@njit(**_JIT)
def head_q4_k(row, b):
    """Per-sub-block factors of Q4_K block b (see _head_k4)."""
    return _head_k4(row, _B_Q4_K * b)


@njit(**_JIT)
def unit_q4_k(row, b, j, h):
    """Nibble j % 2 of the 32 qs bytes at 32 * (j // 2)."""
    q = _B_Q4_K * b + 16 + 32 * (j // 2)
    sh = 4 * (j % 2)
    vd = vlane(h, j)
    vm = vlane(h, j + 8)
    return vfma(ld_bits(row, q, sh, 15), vd, vm), vfma(ld_bits(row, q + 16, sh, 15), vd, vm)


@njit(**_JIT)
def head_q5_k(row, b):
    """Per-sub-block factors of Q5_K block b (see _head_k4)."""
    return _head_k4(row, _B_Q5_K * b)


@njit(**_JIT)
def unit_q5_k(row, b, j, h):
    """As Q4_K, plus bit j of qh[l] as bit 4 of element l."""
    o = _B_Q5_K * b
    q = o + 48 + 32 * (j // 2)
    sh = 4 * (j % 2)
    vd = vlane(h, j)
    vm = vlane(h, j + 8)
    q0, q1 = ld_bits_flag_x2(row, q, sh, 15, o + 16, j, 16, 0)
    return vfma(q0, vd, vm), vfma(q1, vd, vm)


@njit(**_JIT)
def head_q6_k(row, b):
    """d * sc for the 16 groups of 16 elements."""
    o = _B_Q6_K * b
    return vmul(ld_i8(row, o + 192), vsplat(f16_at(row, o + 208)))


@njit(**_JIT)
def unit_q6_k(row, b, j, h):
    """j = 4 hh + s: ql nibble s // 2 at 64 hh + 32 (s % 2), qh bits 2s at 128 + 32 hh; groups 2j, 2j + 1."""
    o = _B_Q6_K * b
    hh = j // 4
    s = j % 4
    ql = o + 64 * hh + 32 * (s % 2)
    qh = o + 128 + 32 * hh
    q0, q1 = ld_bits2_x2(row, ql, 4 * (s // 2), 15, qh, 2 * s, 3, 4, 32)
    return vmul(q0, vlane(h, 2 * j)), vmul(q1, vlane(h, 2 * j + 1))


DECODERS = register({
    GGMLType.Q2_K: Decoder(head_q2_k, unit_q2_k, _SUB),
    GGMLType.Q3_K: Decoder(head_q3_k, unit_q3_k, _SUB),
    GGMLType.Q4_K: Decoder(head_q4_k, unit_q4_k, _SUB),
    GGMLType.Q5_K: Decoder(head_q5_k, unit_q5_k, _SUB),
    GGMLType.Q6_K: Decoder(head_q6_k, unit_q6_k, _SUB),
})
