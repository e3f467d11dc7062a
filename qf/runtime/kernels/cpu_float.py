"""Decoders for the plain float types (F32, F16, BF16): a block is one 32-element unit, no header.

Float rows need not be a whole number of units, so these types also decode single elements for the tail.
"""

from __future__ import annotations

from numba import njit

from qf.format.ggml_types import GGMLType
from qf.runtime.kernels.cpu_decoder import FASTMATH, Decoder
from qf.runtime.kernels.cpu_registry import register
from qf.runtime.kernels.cpu_simd import bf16_at, f16_at, f32_at, ld_bf16, ld_f16, ld_f32

_JIT = dict(inline="always", fastmath=FASTMATH, cache=True)


@njit(**_JIT)
def head_none(row, b):
    """Float units carry no scales."""
    return 0


@njit(**_JIT)
def unit_f32(row, b, j, h):
    """Elements 32b .. 32b + 31 of an f32 row."""
    return ld_f32(row, 128 * b), ld_f32(row, 128 * b + 64)


@njit(**_JIT)
def unit_f16(row, b, j, h):
    """Elements 32b .. 32b + 31 of an f16 row."""
    return ld_f16(row, 64 * b), ld_f16(row, 64 * b + 32)


@njit(**_JIT)
def unit_bf16(row, b, j, h):
    """Elements 32b .. 32b + 31 of a bf16 row."""
    return ld_bf16(row, 64 * b), ld_bf16(row, 64 * b + 32)


@njit(**_JIT)
def elem_f32(row, i):
    """Element i of an f32 row."""
    return f32_at(row, 4 * i)


@njit(**_JIT)
def elem_f16(row, i):
    """Element i of an f16 row."""
    return f16_at(row, 2 * i)


@njit(**_JIT)
def elem_bf16(row, i):
    """Element i of a bf16 row."""
    return bf16_at(row, 2 * i)


DECODERS = register({
    GGMLType.F32: Decoder(head_none, unit_f32, 1, elem_f32),
    GGMLType.F16: Decoder(head_none, unit_f16, 1, elem_f16),
    GGMLType.BF16: Decoder(head_none, unit_bf16, 1, elem_bf16),
})
