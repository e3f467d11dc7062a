"""IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S layouts (256-element super-blocks), bit-exact with gguf.quants.

Each stores an f16 d, 4-bit sub-block scale codes s, grid indices (one per 8 elements for IQ2, per 4 for IQ3; the
grids are qf.quant.iq_grids') and one sign byte per 8 elements (bit i: element i negative):

- IQ2_XXS (66 B): 8 x (u32 a, u32 b) per 32 elements: a = 4 grid bytes, b = 4 seven-bit sign indices << 7k | s << 28;
  y = d * (0.5 + s) * 0.25 * grid * sign.
- IQ2_XS (74 B): u16 qs[32] = grid (9 bits) | sign index << 9; scales[8] (a nibble per 16 elements, low first).
- IQ2_S (82 B): qs[32] (grid low bytes), signs[32] (full bytes), qh[8] (2 high grid bits per index), scales[8].
- IQ3_XXS (98 B): qs[64] (grid bytes), u32[8] per 32 elements = 4 sign indices << 7k | s << 28;
  y = d * (0.5 + s) * 0.5 * grid * sign.
- IQ3_S (110 B): qs[64], qh[8] (grid bit 8, one per index), signs[32], scales[4] (a nibble per 32 elements);
  y = d * (1 + 2s) * grid * sign.

A seven-bit sign index stands for ksigns_iq2xs[index]: the eighth sign is the parity of the seven, so the fields
carry full sign bytes and pack keeps their low seven bits. Every index a block can hold is inside its grid.
Values come from qf.quant.strategies.iq23 (ggml's quantize_row_iq*_impl).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qf.format.ggml_types import GGMLType
from qf.quant.codecs.base import Layout
from qf.quant.codecs.legacy import f16_field, put_f16
from qf.quant.iq_grids import iq2s_grid, iq2xs_grid, iq2xxs_grid, iq3s_grid, iq3xxs_grid, ksigns_iq2xs

_F32 = np.float32


class IQGridFields(NamedTuple):
    """The fields of n blocks of one IQ2 / IQ3 type."""

    d: np.ndarray  # [n] f32 (stored as f16)
    scales: np.ndarray  # [n, n_sub] u8 scale codes 0..15 (n_sub: 8 for 32-element sub-blocks, 16 for 16)
    grid: np.ndarray  # [n, 256 / dims] u16 grid indices
    signs: np.ndarray  # [n, 32] u8: bit i of byte g = element 8g + i negative


def _nibbles(b: np.ndarray) -> np.ndarray:
    """u8 [n, k] -> u8 [n, 2k]: low nibble of byte j at 2j, high at 2j + 1."""
    return np.stack([b & 0xF, b >> 4], axis=2).reshape(b.shape[0], -1)


def _pack_nibbles(v: np.ndarray) -> np.ndarray:
    """Inverse of _nibbles."""
    v = np.asarray(v, np.uint8)
    return (v[:, 0::2] & 0xF) | ((v[:, 1::2] & 0xF) << 4)


def _words(b: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian words of u8 [n, k] as [n, k / itemsize] (native unsigned)."""
    return np.ascontiguousarray(b).view(dtype).astype(np.dtype(dtype).newbyteorder("="))


def _as_bytes(w: np.ndarray, dtype: str) -> np.ndarray:
    """Words [n, m] stored little-endian as u8 [n, m * itemsize]."""
    return np.ascontiguousarray(w.astype(dtype)).view(np.uint8).reshape(w.shape[0], -1)


def _sign_indices(words: np.ndarray) -> np.ndarray:
    """u32 [n, m] holding 4 seven-bit sign indices each (bits 0..27) -> u8 [n, 4m]."""
    shifts = np.arange(0, 28, 7, dtype=np.uint32)
    return ((words[:, :, None] >> shifts) & 127).astype(np.uint8).reshape(words.shape[0], -1)


def _packed_signs(signs: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of _sign_indices plus the scale code in bits 28..31: u8 [n, 4m], [n, m] -> u32 [n, m]."""
    s = (np.asarray(signs, np.uint32) & 127).reshape(signs.shape[0], -1, 4)
    w = np.bitwise_or.reduce(s << np.arange(0, 28, 7, dtype=np.uint32), axis=2)
    return w | (np.asarray(scales, np.uint32) << 28)


class _GridLayout(Layout):
    """Shared dequantization: y = db(sub-block) * grid[index] (element-wise) * sign."""

    dims: int  # elements per grid index
    sub: int  # elements per scale code

    def grid_table(self) -> np.ndarray:
        """u8 [n_grid, dims] values of this type's grid."""
        raise NotImplementedError

    def pack(self, f: IQGridFields) -> np.ndarray:
        raise NotImplementedError

    def unpack(self, b: np.ndarray) -> IQGridFields:
        raise NotImplementedError

    def sub_scales(self, d: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """f32 [n] d and u8 [n, n_sub] codes -> f32 [n, n_sub] per-sub-block scale (IQ2: d * (0.5 + s) * 0.25)."""
        return d[:, None] * (_F32(0.5) + codes.astype(_F32)) * _F32(0.25)

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        f = self.unpack(np.ascontiguousarray(b))
        n = f.d.shape[0]
        db = self.sub_scales(f.d, f.scales)  # [n, n_sub]
        vals = self.grid_table().astype(_F32)[f.grid].reshape(n, -1, self.sub)  # [n, n_sub, sub]
        sign = np.where(np.unpackbits(f.signs, axis=1, bitorder="little"), _F32(-1), _F32(1))  # [n, 256]
        with np.errstate(all="ignore"):
            return (db[:, :, None] * vals).reshape(n, -1) * sign


class IQ2_XXS(_GridLayout, qtype=GGMLType.IQ2_XXS):
    """d, 8 x (u32 grid bytes, u32 sign indices | scale << 28)."""

    dims, sub = 8, 32

    def grid_table(self) -> np.ndarray:
        return iq2xxs_grid()

    def unpack(self, b: np.ndarray) -> IQGridFields:
        """u8 [n, 66] -> fields."""
        b = np.ascontiguousarray(b)
        w = _words(b[:, 2:], "<u4").reshape(-1, 8, 2)
        grid = np.ascontiguousarray(b[:, 2:]).reshape(-1, 8, 8)[:, :, :4].reshape(-1, 32).astype(np.uint16)
        return IQGridFields(f16_field(b, 0), (w[:, :, 1] >> 28).astype(np.uint8), grid,
                            ksigns_iq2xs()[_sign_indices(w[:, :, 1])])

    def pack(self, f: IQGridFields) -> np.ndarray:
        """Fields -> u8 [n, 66]."""
        n = f.grid.shape[0]
        out = np.empty((n, self.type_size), np.uint8)
        put_f16(out, 0, f.d)
        q = out[:, 2:].reshape(n, 8, 8)
        q[:, :, :4] = np.asarray(f.grid, np.uint8).reshape(n, 8, 4)
        q[:, :, 4:] = _as_bytes(_packed_signs(f.signs, f.scales), "<u4").reshape(n, 8, 4)
        return out


class IQ2_XS(_GridLayout, qtype=GGMLType.IQ2_XS):
    """d, u16 qs[32] (grid | sign index << 9), scales[8] (nibbles, 16 elements each)."""

    dims, sub = 8, 16

    def grid_table(self) -> np.ndarray:
        return iq2xs_grid()

    def unpack(self, b: np.ndarray) -> IQGridFields:
        """u8 [n, 74] -> fields."""
        b = np.ascontiguousarray(b)
        qs = _words(b[:, 2:66], "<u2")
        return IQGridFields(f16_field(b, 0), _nibbles(b[:, 66:74]), (qs & 511).astype(np.uint16),
                            ksigns_iq2xs()[qs >> 9])

    def pack(self, f: IQGridFields) -> np.ndarray:
        """Fields -> u8 [n, 74]."""
        n = f.grid.shape[0]
        out = np.empty((n, self.type_size), np.uint8)
        put_f16(out, 0, f.d)
        qs = (np.asarray(f.grid, np.uint16) & 511) | ((np.asarray(f.signs, np.uint16) & 127) << 9)
        out[:, 2:66] = _as_bytes(qs, "<u2")
        out[:, 66:74] = _pack_nibbles(f.scales)
        return out


class IQ2_S(_GridLayout, qtype=GGMLType.IQ2_S):
    """d, qs[32] (grid low bytes), signs[32], qh[8] (2 high bits per index), scales[8]."""

    dims, sub = 8, 16

    def grid_table(self) -> np.ndarray:
        return iq2s_grid()

    def unpack(self, b: np.ndarray) -> IQGridFields:
        """u8 [n, 82] -> fields."""
        b = np.ascontiguousarray(b)
        high = (b[:, 66:74, None] >> np.arange(0, 8, 2, dtype=np.uint8)) & 3  # [n, 8, 4]
        grid = b[:, 2:34].astype(np.uint16) | (high.reshape(-1, 32).astype(np.uint16) << 8)
        return IQGridFields(f16_field(b, 0), _nibbles(b[:, 74:82]), grid, b[:, 34:66].copy())

    def pack(self, f: IQGridFields) -> np.ndarray:
        """Fields -> u8 [n, 82]."""
        n = f.grid.shape[0]
        g = np.asarray(f.grid, np.uint16)
        out = np.empty((n, self.type_size), np.uint8)
        put_f16(out, 0, f.d)
        out[:, 2:34] = g & 255
        out[:, 34:66] = f.signs
        high = ((g >> 8) & 3).astype(np.uint8).reshape(n, 8, 4) << np.arange(0, 8, 2, dtype=np.uint8)
        out[:, 66:74] = np.bitwise_or.reduce(high, axis=2)
        out[:, 74:82] = _pack_nibbles(f.scales)
        return out


class IQ3_XXS(_GridLayout, qtype=GGMLType.IQ3_XXS):
    """d, qs[64] (grid bytes), u32[8] (sign indices | scale << 28)."""

    dims, sub = 4, 32

    def grid_table(self) -> np.ndarray:
        return iq3xxs_grid()

    def sub_scales(self, d: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """d * (0.5 + s) * 0.5."""
        return d[:, None] * (_F32(0.5) + codes.astype(_F32)) * _F32(0.5)

    def unpack(self, b: np.ndarray) -> IQGridFields:
        """u8 [n, 98] -> fields."""
        b = np.ascontiguousarray(b)
        w = _words(b[:, 66:98], "<u4")
        return IQGridFields(f16_field(b, 0), (w >> 28).astype(np.uint8), b[:, 2:66].astype(np.uint16),
                            ksigns_iq2xs()[_sign_indices(w)])

    def pack(self, f: IQGridFields) -> np.ndarray:
        """Fields -> u8 [n, 98]."""
        n = f.grid.shape[0]
        out = np.empty((n, self.type_size), np.uint8)
        put_f16(out, 0, f.d)
        out[:, 2:66] = np.asarray(f.grid, np.uint8)
        out[:, 66:98] = _as_bytes(_packed_signs(f.signs, f.scales), "<u4")
        return out


class IQ3_S(_GridLayout, qtype=GGMLType.IQ3_S):
    """d, qs[64] (grid low bytes), qh[8] (bit 8 per index), signs[32], scales[4] (nibbles, 32 elements each)."""

    dims, sub = 4, 32

    def grid_table(self) -> np.ndarray:
        return iq3s_grid()

    def sub_scales(self, d: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """d * (1 + 2s)."""
        return d[:, None] * (1 + 2 * codes.astype(np.uint8)).astype(_F32)

    def unpack(self, b: np.ndarray) -> IQGridFields:
        """u8 [n, 110] -> fields."""
        b = np.ascontiguousarray(b)
        high = np.unpackbits(b[:, 66:74], axis=1, bitorder="little").astype(np.uint16)  # [n, 64]
        grid = b[:, 2:66].astype(np.uint16) | (high << 8)
        return IQGridFields(f16_field(b, 0), _nibbles(b[:, 106:110]), grid, b[:, 74:106].copy())

    def pack(self, f: IQGridFields) -> np.ndarray:
        """Fields -> u8 [n, 110]."""
        n = f.grid.shape[0]
        g = np.asarray(f.grid, np.uint16)
        out = np.empty((n, self.type_size), np.uint8)
        put_f16(out, 0, f.d)
        out[:, 2:66] = g & 255
        out[:, 66:74] = np.packbits(((g >> 8) & 1).astype(np.uint8), axis=1, bitorder="little")
        out[:, 74:106] = f.signs
        out[:, 106:110] = _pack_nibbles(f.scales)
        return out


__all__ = ["IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ3_S", "IQ3_XXS", "IQGridFields"]
