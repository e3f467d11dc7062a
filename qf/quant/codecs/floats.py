"""Plain float layouts (F32, F16, BF16): block size 1, bit-exact with gguf.quants; their one strategy is the cast."""

from __future__ import annotations

import numpy as np
from numba import njit

from qf.format.ggml_types import GGMLType
from qf.quant.codecs.base import Layout, Strategy


class F32(Layout, qtype=GGMLType.F32):
    """IEEE binary32, stored as is."""

    def pack(self, x: np.ndarray) -> np.ndarray:
        """x: f32 [n, 1] -> u8 [n, 4]."""
        return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8).reshape(-1, 4)

    def unpack(self, b: np.ndarray) -> np.ndarray:
        """b: u8 [n, 4] -> f32 [n, 1]."""
        return np.ascontiguousarray(b).view(np.float32).reshape(-1, 1)  # a view, as gguf.quants returns

    dequantize_blocks = unpack  # a float's fields are its value


class F16(Layout, qtype=GGMLType.F16):
    """IEEE binary16; numpy's cast rounds to nearest even (what gguf.quants does)."""

    def pack(self, x: np.ndarray) -> np.ndarray:
        """x: f32 [n, 1] -> u8 [n, 2]."""
        return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint8).reshape(-1, 2)

    def unpack(self, b: np.ndarray) -> np.ndarray:
        """b: u8 [n, 2] -> f32 [n, 1]."""
        return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1, 1)

    dequantize_blocks = unpack  # a float's fields are its value


@njit(cache=True, error_model="numpy")
def _bf16_round(u, out):
    """u: u32 [n] (f32 bits) -> out: u16 [n]; ggml_compute_fp32_to_bf16 as gguf.quants writes it."""
    for i in range(u.shape[0]):
        n = np.int64(u[i])
        if (n & 0x7FFFFFFF) > 0x7F800000:  # NaN: keep sign and top payload, force quiet
            n = (n & 0xFFFF0000) | (64 << 16)
        out[i] = np.uint16(((n + 0x7FFF + ((n >> 16) & 1)) >> 16) & 0xFFFF)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """f32 [...] -> u16 [...]: round to nearest even; NaN forced quiet."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = np.empty(u.shape, np.uint16)
    _bf16_round(u.reshape(-1), out.reshape(-1))
    return out


class BF16(Layout, qtype=GGMLType.BF16):
    """bfloat16: the top half of a binary32, rounded to nearest even."""

    def pack(self, x: np.ndarray) -> np.ndarray:
        """x: f32 [n, 1] -> u8 [n, 2]."""
        return f32_to_bf16_bits(x).view(np.uint8).reshape(-1, 2)

    def unpack(self, b: np.ndarray) -> np.ndarray:
        """b: u8 [n, 2] -> f32 [n, 1]."""
        h = np.ascontiguousarray(b).view(np.uint16).astype(np.uint32)
        return (h << np.uint32(16)).view(np.float32).reshape(-1, 1)

    dequantize_blocks = unpack  # a float's fields are its value


class Cast(Strategy, name="cast", qtypes=(GGMLType.F32, GGMLType.F16, GGMLType.BF16)):
    """The float types' only strategy: round each value to the format (importance is not used)."""

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """rows: f32 [r, ne0] -> u8 [r * ne0, type_size]."""
        return self.layout.pack(rows.reshape(-1, 1))
