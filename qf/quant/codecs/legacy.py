"""Legacy 32-element block layouts (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), bit-exact with gguf.quants.

A block is a scale d (f16), for the affine types a min m (f16), and 32 codes: 4-bit nibbles (element j in the
low nibble of byte j, element j+16 in the high one), 5-bit with the fifth bits in a u32, or int8 for Q8_0.
The values come from qf.quant.strategies (round-to-nearest, ggml's importance search); this module only lays
them out in bytes, reads them back, and dequantizes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from qf.format.ggml_types import GGMLType
from qf.quant.codecs.base import Layout

QK = 32  # elements per legacy block
_F32 = np.float32


class LegacyFields(NamedTuple):
    """The fields of n legacy blocks."""

    d: np.ndarray  # [n] f32 (stored as f16)
    m: np.ndarray | None  # [n] f32 added min (affine types), else None
    codes: np.ndarray  # [n, 32] u8: unsigned codes (Q8_0: int8 bits)


# ---------------------------------------------------------------- pack / unpack kernels (numba)

@njit(cache=True, error_model="numpy")
def _pack_q4(q, out, i, at):
    """16 bytes at out[i, at:]: element j in the low nibble of byte j, element j+16 in the high one."""
    for j in range(QK // 2):
        out[i, at + j] = np.uint8(q[j] | (q[j + QK // 2] << 4))


@njit(cache=True, error_model="numpy")
def _pack_q5(q, out, i, at):
    """qh (u32 LE, bit j = bit 4 of q[j]) at out[i, at:at+4], then the low nibbles like _pack_q4."""
    h = 0
    for j in range(QK):
        h |= ((q[j] >> 4) & 1) << j
    for k in range(4):
        out[i, at + k] = np.uint8((h >> (8 * k)) & 0xFF)
    for j in range(QK // 2):
        out[i, at + 4 + j] = np.uint8((q[j] & 0xF) | ((q[j + QK // 2] & 0xF) << 4))


@njit(cache=True, error_model="numpy")
def _pack_codes(L, five_bit, out, at):
    """Codes L [n, QK] (0..15 or 0..31) into the qs (and qh) bytes of out [n, type_size] from byte `at`."""
    q = np.empty(QK, np.int64)
    for i in range(L.shape[0]):
        for j in range(QK):
            q[j] = L[i, j]
        if five_bit:
            _pack_q5(q, out, i, at)
        else:
            _pack_q4(q, out, i, at)


# ---------------------------------------------------------------- dequantize kernels (numba)

@njit(cache=True, error_model="numpy")
def _unpack_q(b, i, at, five_bit, q):
    """Inverse of _pack_q4 / _pack_q5 into q [QK] (unsigned codes)."""
    if five_bit:
        h = np.int64(b[i, at]) | (np.int64(b[i, at + 1]) << 8) | (np.int64(b[i, at + 2]) << 16) \
            | (np.int64(b[i, at + 3]) << 24)
        at += 4
    else:
        h = np.int64(0)
    for j in range(QK // 2):
        byte = np.int64(b[i, at + j])
        q[j] = (byte & 0xF) | (((h >> j) & 1) << 4)
        q[j + QK // 2] = (byte >> 4) | (((h >> (j + QK // 2)) & 1) << 4)


@njit(cache=True, error_model="numpy")
def _dequantize_sym(b, d, offset, five_bit, y):
    """Q4_0 / Q5_0: y = d * (q - offset)."""
    # b: [n, type_size] u8; d: [n] f32 -> y: [n, QK] f32
    q = np.empty(QK, np.int64)
    for i in range(b.shape[0]):
        _unpack_q(b, i, 2, five_bit, q)
        for j in range(QK):
            y[i, j] = d[i] * _F32(q[j] - offset)


@njit(cache=True, error_model="numpy")
def _dequantize_affine(b, d, m, five_bit, y):
    """Q4_1 / Q5_1: y = d * q + m."""
    # b: [n, type_size] u8; d, m: [n] f32 -> y: [n, QK] f32
    q = np.empty(QK, np.int64)
    for i in range(b.shape[0]):
        _unpack_q(b, i, 4, five_bit, q)
        for j in range(QK):
            y[i, j] = d[i] * _F32(q[j]) + m[i]


@njit(cache=True, error_model="numpy")
def _dequantize_q8_0(b, d, y):
    """Q8_0: y = int8 * d."""
    # b: [n, 34] u8; d: [n] f32 -> y: [n, QK] f32
    for i in range(b.shape[0]):
        for j in range(QK):
            v = np.int64(b[i, 2 + j])
            y[i, j] = _F32(v - 256 if v > 127 else v) * d[i]


@njit(cache=True, error_model="numpy")
def _unpack_codes(b, at, five_bit, L):
    """Inverse of _pack_codes: the codes of every block of b [n, type_size] into L [n, QK]."""
    q = np.empty(QK, np.int64)
    for i in range(b.shape[0]):
        _unpack_q(b, i, at, five_bit, q)
        for j in range(QK):
            L[i, j] = q[j]


# ---------------------------------------------------------------- shared Python glue

def f16_field(b: np.ndarray, at: int) -> np.ndarray:
    """The f16 stored at byte offset `at` of every block, as f32 [n]."""
    return np.ascontiguousarray(b[:, at:at + 2]).view(np.float16).astype(np.float32).reshape(-1)


def put_f16(out: np.ndarray, at: int, v: np.ndarray) -> None:
    """Store f32 [n] as f16 (round to nearest even) at byte offset `at` of every block."""
    out[:, at:at + 2] = np.asarray(v, dtype=np.float32).astype(np.float16).view(np.uint8).reshape(-1, 2)


class _LegacyLayout(Layout):
    """d (f16), [m (f16)], [qh (u32)], qs: the shared pack / unpack of the 32-element layouts."""

    bits: int = 4  # code width: 4, 5 or 8
    affine: bool = False
    offset: int = 0  # symmetric types: x = d * (q - offset)

    @property
    def scale_bytes(self) -> int:
        """Bytes of d (and m) in front of the codes."""
        return 4 if self.affine else 2

    def pack(self, f: LegacyFields) -> np.ndarray:
        """Fields -> u8 [n, type_size]."""
        out = np.empty((f.codes.shape[0], self.type_size), np.uint8)
        if self.bits == 8:
            out[:, 2:] = f.codes
        else:
            _pack_codes(np.ascontiguousarray(f.codes), self.bits == 5, out, self.scale_bytes)
        put_f16(out, 0, f.d)
        if self.affine:
            put_f16(out, 2, f.m)
        return out

    def unpack(self, b: np.ndarray) -> LegacyFields:
        """u8 [n, type_size] -> fields."""
        b = np.ascontiguousarray(b)
        m = f16_field(b, 2) if self.affine else None
        if self.bits == 8:
            return LegacyFields(f16_field(b, 0), m, b[:, 2:].copy())
        codes = np.empty((b.shape[0], QK), np.uint8)
        _unpack_codes(b, self.scale_bytes, self.bits == 5, codes)
        return LegacyFields(f16_field(b, 0), m, codes)


class Q4_0(_LegacyLayout, qtype=GGMLType.Q4_0):
    """d (f16), qs[16]: x = d * (q - 8)."""

    offset = 8

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(b)
        y = np.empty((b.shape[0], QK), np.float32)
        _dequantize_sym(b, f16_field(b, 0), 8, False, y)
        return y


class Q5_0(_LegacyLayout, qtype=GGMLType.Q5_0):
    """d (f16), qh (u32), qs[16]: x = d * (q - 16)."""

    bits = 5
    offset = 16

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(b)
        y = np.empty((b.shape[0], QK), np.float32)
        _dequantize_sym(b, f16_field(b, 0), 16, True, y)
        return y


class _AffineLayout(_LegacyLayout):
    """Q4_1 / Q5_1: d (f16), m (f16), [qh (u32)], qs[16]: x = d * q + m."""

    affine = True

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(b)
        y = np.empty((b.shape[0], QK), np.float32)
        _dequantize_affine(b, f16_field(b, 0), f16_field(b, 2), self.bits == 5, y)
        return y


class Q4_1(_AffineLayout, qtype=GGMLType.Q4_1):
    """d, m (f16), qs[16]: 4-bit codes 0..15."""


class Q5_1(_AffineLayout, qtype=GGMLType.Q5_1):
    """d, m (f16), qh (u32), qs[16]: 5-bit codes 0..31."""

    bits = 5


class Q8_0(_LegacyLayout, qtype=GGMLType.Q8_0):
    """d (f16), qs[32] (int8): x = d * q."""

    bits = 8

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(b)
        y = np.empty((b.shape[0], QK), np.float32)
        _dequantize_q8_0(b, f16_field(b, 0), y)
        return y
