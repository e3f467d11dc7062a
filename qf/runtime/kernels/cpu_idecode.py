"""Integer decoders: each quantized ggml type as unsigned 8-bit quants with a scale and an offset.

The integer matmul (cpu_int8.py) reads every type in one form: a 32-element unit is 32 unsigned quants q
(0..255) and, per sub-block of 32 or 16 elements, a scale s and an offset m, such that the weight is

    w = s * q + m

so that a dot product with 8-bit activations a = da * qa is  s * da * sum(q qa) + m * da * sum(qa):
an integer dot product plus the activation block sum (precomputed once per matmul). Types whose values
are signed get m = -offset * s (Q4_0: q - 8, Q8_0: q = w + 128 with m = -128 d, ...). A decoder reuses
the f32 decoders' block head (scales, cpu_legacy.py / cpu_kquants.py) and gives:

    quants(row, b, j, h) -> q8x32       the unsigned quants of unit j of block b
    scales(h, j) -> (s0, m0, s1, m1)    sub-block factors of unit j (s1, m1 = s0, m0 for 32-element ones)
    subs: 1 or 2                        sub-blocks per unit (2: Q2_K, Q3_K, Q6_K scale every 16 elements)

    Q4_0  q = nibble,             s = d,          m = -8 d
    Q4_1  q = nibble,             s = d,          m = m
    Q5_0  q = nibble | hbit << 4, s = d,          m = -16 d
    Q5_1  q = nibble | hbit << 4, s = d,          m = m
    Q8_0  q = w ^ 0x80 (w + 128), s = d,          m = -128 d
    Q2_K  q = 2 bits,             s = d (sc & 15), m = -dmin (sc >> 4)    (per 16)
    Q3_K  q = 2 bits + 4 hbit,    s = d (sc - 32), m = -4 s               (per 16)
    Q4_K  q = nibble,             s = d sc,        m = -dmin m            (per 32)
    Q5_K  q = nibble + 16 hbit,   s = d sc,        m = -dmin m            (per 32)
    Q6_K  q = ql | qh << 4,       s = d sc,        m = -32 s              (per 16)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from numba import njit

from qf.format.ggml_types import GGMLType
from qf.runtime.kernels import cpu_kquants as K
from qf.runtime.kernels import cpu_legacy as L
from qf.runtime.kernels.cpu_decoder import FASTMATH
from qf.runtime.kernels.cpu_registry import INT_DECODERS, register_int
from qf.runtime.kernels.cpu_isimd import q_bits32, q_field, q_flag, q_nibbles, q_or, q_xor, vget

_JIT = dict(inline="always", fastmath=FASTMATH, cache=True)


class IntDecoder(NamedTuple):
    """The numba functions that read one quantized type as integers (see the module docstring)."""

    head: Callable
    quants: Callable
    scales: Callable
    units_per_block: int
    subs: int


# ------------------------------------------------------------------ legacy types (one unit per block)

@njit(**_JIT)
def quants_q4_0(row, b, j, h):
    """Q4_0 nibbles."""
    return q_nibbles(row, b * L._B_Q4_0 + 2)


@njit(**_JIT)
def quants_q4_1(row, b, j, h):
    """Q4_1 nibbles."""
    return q_nibbles(row, b * L._B_Q4_1 + 4)


@njit(**_JIT)
def quants_q5_0(row, b, j, h):
    """Q5_0 nibbles plus the fifth bits."""
    o = b * L._B_Q5_0
    return q_or(q_nibbles(row, o + 6), q_bits32(row, o + 2, 16))


@njit(**_JIT)
def quants_q5_1(row, b, j, h):
    """Q5_1 nibbles plus the fifth bits."""
    o = b * L._B_Q5_1
    return q_or(q_nibbles(row, o + 8), q_bits32(row, o + 4, 16))


@njit(**_JIT)
def quants_q8_0(row, b, j, h):
    """Q8_0 bytes + 128."""
    return q_xor(q_field(row, b * L._B_Q8_0 + 2, 0, 255, 0), 128)


@njit(**_JIT)
def scales_q4_0(h, j):
    """(d, -8 d) twice."""
    return h[0], -8.0 * h[0], h[0], -8.0 * h[0]


@njit(**_JIT)
def scales_q5_0(h, j):
    """(d, -16 d) twice."""
    return h[0], -16.0 * h[0], h[0], -16.0 * h[0]


@njit(**_JIT)
def scales_q8_0(h, j):
    """(d, -128 d) twice."""
    return h[0], -128.0 * h[0], h[0], -128.0 * h[0]


@njit(**_JIT)
def scales_affine(h, j):
    """(d, m) twice: a legacy type with a stored minimum."""
    return h[0], h[1], h[0], h[1]


# ------------------------------------------------------------------ K-quants (8 units per super-block)

@njit(**_JIT)
def quants_q2_k(row, b, j, h):
    """Bit pair j % 4 of qs half j // 4."""
    return q_field(row, K._B_Q2_K * b + 16 + 32 * (j // 4), 2 * (j % 4), 3, 0)


@njit(**_JIT)
def scales_q2_k(h, j):
    """Groups 2j, 2j + 1 of (d (sc & 15), -dmin (sc >> 4))."""
    return vget(h[0], 2 * j), vget(h[1], 2 * j), vget(h[0], 2 * j + 1), vget(h[1], 2 * j + 1)


@njit(**_JIT)
def quants_q3_k(row, b, j, h):
    """Bit pair j % 4 of qs half j // 4, plus 4 where bit j of hmask is set."""
    o = K._B_Q3_K * b
    return q_or(q_field(row, o + 32 + 32 * (j // 4), 2 * (j % 4), 3, 0), q_flag(row, o, j, 4))


@njit(**_JIT)
def scales_q3_k(h, j):
    """Groups 2j, 2j + 1: s = d (sc - 32), m = -4 s."""
    s0 = vget(h, 2 * j)
    s1 = vget(h, 2 * j + 1)
    return s0, -4.0 * s0, s1, -4.0 * s1


@njit(**_JIT)
def quants_q4_k(row, b, j, h):
    """Nibble j % 2 of the 32 qs bytes at 32 (j // 2)."""
    return q_field(row, K._B_Q4_K * b + 16 + 32 * (j // 2), 4 * (j % 2), 15, 0)


@njit(**_JIT)
def quants_q5_k(row, b, j, h):
    """As Q4_K, plus 16 where bit j of qh is set."""
    o = K._B_Q5_K * b
    return q_or(q_field(row, o + 48 + 32 * (j // 2), 4 * (j % 2), 15, 0), q_flag(row, o + 16, j, 16))


@njit(**_JIT)
def scales_k4(h, j):
    """Sub-block j of a Q4_K / Q5_K head: (d sc, -dmin m) twice."""
    s = vget(h, j)
    m = vget(h, j + 8)
    return s, m, s, m


@njit(**_JIT)
def quants_q6_k(row, b, j, h):
    """j = 4 hh + s: ql nibble s // 2 at 64 hh + 32 (s % 2), qh bits 2s at 128 + 32 hh as bits 4-5."""
    o = K._B_Q6_K * b
    hh = j // 4
    s = j % 4
    lo = q_field(row, o + 64 * hh + 32 * (s % 2), 4 * (s // 2), 15, 0)
    return q_or(lo, q_field(row, o + 128 + 32 * hh, 2 * s, 3, 4))


@njit(**_JIT)
def scales_q6_k(h, j):
    """Groups 2j, 2j + 1: s = d sc, m = -32 s."""
    s0 = vget(h, 2 * j)
    s1 = vget(h, 2 * j + 1)
    return s0, -32.0 * s0, s1, -32.0 * s1


_SUB = K._SUB

register_int({
    GGMLType.Q4_0: IntDecoder(L.head_q4_0, quants_q4_0, scales_q4_0, 1, 1),
    GGMLType.Q4_1: IntDecoder(L.head_q4_1, quants_q4_1, scales_affine, 1, 1),
    GGMLType.Q5_0: IntDecoder(L.head_q5_0, quants_q5_0, scales_q5_0, 1, 1),
    GGMLType.Q5_1: IntDecoder(L.head_q5_1, quants_q5_1, scales_affine, 1, 1),
    GGMLType.Q8_0: IntDecoder(L.head_q8_0, quants_q8_0, scales_q8_0, 1, 1),
    GGMLType.Q2_K: IntDecoder(K.head_q2_k, quants_q2_k, scales_q2_k, _SUB, 2),
    GGMLType.Q3_K: IntDecoder(K.head_q3_k, quants_q3_k, scales_q3_k, _SUB, 2),
    GGMLType.Q4_K: IntDecoder(K.head_q4_k, quants_q4_k, scales_k4, _SUB, 1),
    GGMLType.Q5_K: IntDecoder(K.head_q5_k, quants_q5_k, scales_k4, _SUB, 1),
    GGMLType.Q6_K: IntDecoder(K.head_q6_k, quants_q6_k, scales_q6_k, _SUB, 2),
})

# every registered integer decoder (this module's and those of later decoder modules)
IDECODERS: dict[GGMLType, IntDecoder] = INT_DECODERS
