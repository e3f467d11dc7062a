"""IQ1_S and IQ1_M layouts (256-element super-blocks of 8-element grid points), bit-exact with gguf.quants.

Each group of 8 elements is one point of ggml's 2048-point grid (qf.quant.iq1_tables.iq1s_grid, values -1, 0, 1)
shifted by +-delta (0.125): y = dl * (grid[index] + delta).
- IQ1_S (50 bytes): d (f16), qs[32] (index low 8 bits), qh[8] u16 per 32 elements: bits 3k..3k+2 = index high
  bits of group k, bits 12..14 = scale code s (dl = d * (2s + 1)), bit 15 = delta negative.
- IQ1_M (56 bytes): qs[32], qh[16] per 16 elements: low nibble = group 0 (bits 0..2 index high bits, bit 3
  delta negative), high nibble = group 1; scales[8] as u16[4]: bits 3i..3i+2 of word w = scale code of the
  16-element block 4w + i (dl = d * (2s + 1)); bits 12..15 of the four words = the four nibbles of d (f16).
Indices are masked to 11 bits, so no byte pattern reads outside the grid. Values come from
qf.quant.strategies.iq1 (ggml's quantize_row_iq1_s_impl / iq1_m_impl).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from qf.format.ggml_types import GGMLType
from qf.quant.codecs.base import Layout
from qf.quant.codecs.legacy import f16_field, put_f16
from qf.quant.iq1_tables import iq1s_grid

DELTA = np.float32(0.125)  # IQ1S_DELTA == IQ1M_DELTA


class IQ1Fields(NamedTuple):
    """The fields of n IQ1_S / IQ1_M super-blocks."""

    d: np.ndarray  # [n] f32 (stored as f16)
    scales: np.ndarray  # [n, 8] (IQ1_S, per 32) or [n, 16] (IQ1_M, per 16) u8 codes 0..7: dl = d * (2s + 1)
    negative: np.ndarray  # [n, 8] (IQ1_S, per 32) or [n, 32] (IQ1_M, per 8) u8 0/1: delta is -0.125
    index: np.ndarray  # [n, 32] u16 grid index 0..2047 of each 8-element group


@njit(cache=True, error_model="numpy")
def _deq_iq1(index, dl, neg, grid, y):
    """index: u16 [n, 32], dl: f32 [n, 32] per group, neg: u8 [n, 32], grid: i8 [2048, 8] -> y: f32 [n, 256]."""
    for i in range(index.shape[0]):
        for g in range(32):
            delta = -DELTA if neg[i, g] else DELTA
            row = index[i, g] & 2047
            for j in range(8):
                y[i, 8 * g + j] = dl[i, g] * (np.float32(grid[row, j]) + delta)


def _dequantize(f: IQ1Fields) -> np.ndarray:
    """Fields -> f32 [n, 256]."""
    n = f.index.shape[0]
    per = 32 // f.scales.shape[1]  # groups per scale: 4 (IQ1_S) or 2 (IQ1_M)
    dl = f.d[:, None] * (2 * f.scales.astype(np.float32) + 1)
    neg = np.repeat(f.negative, 32 // f.negative.shape[1], axis=1)
    y = np.empty((n, 256), np.float32)
    _deq_iq1(np.ascontiguousarray(f.index), np.ascontiguousarray(np.repeat(dl, per, axis=1), np.float32),
             np.ascontiguousarray(neg, np.uint8), iq1s_grid(), y)
    return y


class IQ1_S(Layout, qtype=GGMLType.IQ1_S):
    """d (f16), qs[32], qh[8] (u16): y = d * (2s + 1) * (grid[index] +- 0.125)."""

    def pack(self, f: IQ1Fields) -> np.ndarray:
        """Fields -> u8 [n, 50]."""
        n = f.index.shape[0]
        idx = np.asarray(f.index, np.uint16).reshape(n, 8, 4)
        qh = np.bitwise_or.reduce((idx >> 8) << (3 * np.arange(4, dtype=np.uint16)), axis=2).astype(np.uint16)
        qh |= np.asarray(f.scales, np.uint16) << 12
        qh |= np.asarray(f.negative, np.uint16) << 15
        out = np.empty((n, self.type_size), np.uint8)
        put_f16(out, 0, f.d)
        out[:, 2:34] = (idx & 0xFF).reshape(n, 32)
        out[:, 34:50] = qh.astype("<u2").view(np.uint8).reshape(n, 16)
        return out

    def unpack(self, b: np.ndarray) -> IQ1Fields:
        """u8 [n, 50] -> fields."""
        b = np.ascontiguousarray(b)
        qh = np.ascontiguousarray(b[:, 34:50]).view("<u2").astype(np.uint16)  # [n, 8]
        high = (qh[:, :, None] >> (3 * np.arange(4, dtype=np.uint16))) & 7  # [n, 8, 4]
        index = b[:, 2:34].astype(np.uint16) | (high.reshape(-1, 32) << 8)
        return IQ1Fields(f16_field(b, 0), ((qh >> 12) & 7).astype(np.uint8), (qh >> 15).astype(np.uint8), index)

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        return _dequantize(self.unpack(b))


class IQ1_M(Layout, qtype=GGMLType.IQ1_M):
    """qs[32], qh[16], scales[8] (3-bit codes + the f16 d in the top nibbles): y = d * (2s + 1) * (grid +- 0.125)."""

    def pack(self, f: IQ1Fields) -> np.ndarray:
        """Fields -> u8 [n, 56]."""
        n = f.index.shape[0]
        idx = np.asarray(f.index, np.uint16).reshape(n, 16, 2)
        neg = np.asarray(f.negative, np.uint16).reshape(n, 16, 2)
        qh = (idx[:, :, 0] >> 8) | (neg[:, :, 0] << 3) | ((idx[:, :, 1] >> 8) << 4) | (neg[:, :, 1] << 7)
        sc = np.asarray(f.scales, np.uint16).reshape(n, 4, 4) << (3 * np.arange(4, dtype=np.uint16))
        words = np.bitwise_or.reduce(sc, axis=2).astype(np.uint16)  # [n, 4]
        dbits = np.asarray(f.d, np.float32).astype(np.float16).view(np.uint16)[:, None]
        words |= ((dbits >> (4 * np.arange(4, dtype=np.uint16))) & 0xF) << 12
        out = np.empty((n, self.type_size), np.uint8)
        out[:, :32] = (idx & 0xFF).reshape(n, 32)
        out[:, 32:48] = qh.astype(np.uint8)
        out[:, 48:56] = words.astype("<u2").view(np.uint8).reshape(n, 8)
        return out

    def unpack(self, b: np.ndarray) -> IQ1Fields:
        """u8 [n, 56] -> fields."""
        b = np.ascontiguousarray(b)
        n = b.shape[0]
        words = np.ascontiguousarray(b[:, 48:56]).view("<u2").astype(np.uint16)  # [n, 4]
        dbits = np.bitwise_or.reduce((words >> 12) << (4 * np.arange(4, dtype=np.uint16)), axis=1)
        d = dbits.astype(np.uint16).view(np.float16).astype(np.float32)
        scales = ((words[:, :, None] >> (3 * np.arange(4, dtype=np.uint16))) & 7).reshape(n, 16).astype(np.uint8)
        qh = b[:, 32:48].astype(np.uint16)
        nib = np.stack([qh & 0xF, qh >> 4], axis=2).reshape(n, 32)  # per group: 3 index bits + sign bit
        index = b[:, :32].astype(np.uint16) | ((nib & 7) << 8)
        return IQ1Fields(d, scales, (nib >> 3).astype(np.uint8), index)

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        return _dequantize(self.unpack(b))
