"""IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks) layouts, bit-exact with gguf.quants.

Both store 4-bit indices into ggml's 16 non-linear levels (kvalues_iq4nl, qf.quant.iq_tables), 32 elements per
16 bytes (element j in the low nibble of byte j, element j+16 in the high one). IQ4_NL: d (f16), qs[16];
y = d * kvalues[q]. IQ4_XS: d (f16), scales_h (u16: bits 2i..2i+1 = high bits of sub-block i's scale),
scales_l[4] (nibble i = low bits), qs[128]; y = d * (ls - 32) * kvalues[q] per 32-element sub-block.
Values come from qf.quant.strategies.iq4 (ggml's quantize_row_iq4_nl_impl).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from qf.format.ggml_types import GGMLType
from qf.quant.codecs.base import Layout
from qf.quant.codecs.legacy import f16_field, put_f16
from qf.quant.iq_tables import kvalues_iq4nl_f32

_F32 = np.float32


class IQ4Fields(NamedTuple):
    """The fields of n IQ4_NL / IQ4_XS blocks."""

    d: np.ndarray  # [n] f32 (stored as f16)
    scales: np.ndarray | None  # IQ4_XS: [n, 8] u8 sub-block scale codes 0..63 (scale = code - 32); IQ4_NL: None
    codes: np.ndarray  # [n, block_size] u8 level indices 0..15


def _pack_nibbles32(codes: np.ndarray) -> np.ndarray:
    """u8 [n, k] (k a multiple of 32) -> u8 [n, k/2]: per 32 elements, byte j = e[j] | e[j+16] << 4."""
    q = codes.reshape(codes.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(codes.shape[0], -1)


def _unpack_nibbles32(qs: np.ndarray) -> np.ndarray:
    """Inverse of _pack_nibbles32."""
    q = qs.reshape(qs.shape[0], -1, 1, 16)
    return np.concatenate([q & 0xF, q >> 4], axis=2).reshape(qs.shape[0], -1)


@njit(cache=True, error_model="numpy")
def _deq_iq4(qs, dl, values, y):
    """qs: u8 [n, k/2], dl: f32 [n, k/32] per-32 scales, values: f32 [16] -> y: f32 [n, k]."""
    for i in range(qs.shape[0]):
        for s in range(dl.shape[1]):
            for j in range(16):
                byte = qs[i, 16 * s + j]
                y[i, 32 * s + j] = dl[i, s] * values[byte & 0xF]
                y[i, 32 * s + 16 + j] = dl[i, s] * values[byte >> 4]


class IQ4_NL(Layout, qtype=GGMLType.IQ4_NL):
    """d (f16), qs[16]: y = d * kvalues_iq4nl[q]."""

    def pack(self, f: IQ4Fields) -> np.ndarray:
        """Fields -> u8 [n, 18]."""
        out = np.empty((f.codes.shape[0], self.type_size), np.uint8)
        put_f16(out, 0, f.d)
        out[:, 2:] = _pack_nibbles32(f.codes)
        return out

    def unpack(self, b: np.ndarray) -> IQ4Fields:
        """u8 [n, 18] -> fields."""
        b = np.ascontiguousarray(b)
        return IQ4Fields(f16_field(b, 0), None, _unpack_nibbles32(b[:, 2:]))

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(b)
        y = np.empty((b.shape[0], 32), np.float32)
        _deq_iq4(np.ascontiguousarray(b[:, 2:]), f16_field(b, 0)[:, None].copy(), kvalues_iq4nl_f32(), y)
        return y


def xs_scale_codes(b: np.ndarray) -> np.ndarray:
    """IQ4_XS blocks u8 [n, 136] -> sub-block scale codes u8 [n, 8] (0..63)."""
    h = np.ascontiguousarray(b[:, 2:4]).view(np.uint16)  # [n, 1]
    high = ((h >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)
    low = (b[:, 4:8, None] >> np.array([0, 4], np.uint8)).reshape(-1, 8) & 0xF
    return low | (high << 4)


class IQ4_XS(Layout, qtype=GGMLType.IQ4_XS):
    """d (f16), scales_h (u16), scales_l[4], qs[128]: y = d * (ls - 32) * kvalues_iq4nl[q]."""

    def pack(self, f: IQ4Fields) -> np.ndarray:
        """Fields -> u8 [n, 136]."""
        n = f.codes.shape[0]
        sc = np.asarray(f.scales, np.uint8)
        out = np.empty((n, self.type_size), np.uint8)
        put_f16(out, 0, f.d)
        h = np.bitwise_or.reduce((sc >> 4).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16)), axis=1)
        out[:, 2:4] = h.astype("<u2").view(np.uint8).reshape(n, 2)
        out[:, 4:8] = (sc[:, 0::2] & 0xF) | ((sc[:, 1::2] & 0xF) << 4)
        out[:, 8:] = _pack_nibbles32(f.codes)
        return out

    def unpack(self, b: np.ndarray) -> IQ4Fields:
        """u8 [n, 136] -> fields."""
        b = np.ascontiguousarray(b)
        return IQ4Fields(f16_field(b, 0), xs_scale_codes(b), _unpack_nibbles32(b[:, 8:]))

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(b)
        dl = f16_field(b, 0)[:, None] * (xs_scale_codes(b).astype(np.int8) - np.int8(32)).astype(np.float32)
        y = np.empty((b.shape[0], 256), np.float32)
        _deq_iq4(np.ascontiguousarray(b[:, 8:]), np.ascontiguousarray(dl, np.float32), kvalues_iq4nl_f32(), y)
        return y
