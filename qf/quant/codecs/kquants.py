"""K-quant layouts (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K): 256-element super-blocks in ggml's layout.

Values come from the strategies in qf.quant.strategies (ggml's search, with or without importance, or plain
rounding) as a kquant_search.KQuant; this module only lays them out in bytes, reads them back (unpack) and
dequantizes, bit-exact with gguf.quants.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from qf.format.ggml_types import QK_K, GGMLType
from qf.quant import kquant_search as ks
from qf.quant.codecs.base import Layout
from qf.quant.codecs.legacy import f16_field, put_f16

_F32 = np.float32


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """L: u8 [n, 256] codes 0..3 -> u8 [n, 64]: byte 32c + l holds element 128c + 32k + l at bits 2k."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(b: np.ndarray) -> np.ndarray:
    """Inverse of _pack_2bit: u8 [n, 64] -> codes u8 [n, 256]."""
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return ((b.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    """Inverse of _pack_nibbles: u8 [n, 128] -> codes u8 [n, 256] (0..15)."""
    q = b.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0xF, q >> 4], axis=2).reshape(-1, QK_K)


def _bit_planes(b: np.ndarray) -> np.ndarray:
    """u8 [n, 32] -> u8 [n, 256]: element 32k + l is bit k of byte l (Q3_K hmask, Q5_K qh)."""
    return ((b[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(-1, QK_K)


def _pack_bit_planes(bits: np.ndarray) -> np.ndarray:
    """Inverse of _bit_planes: u8 [n, 256] (0/1) -> u8 [n, 32]."""
    high = bits.reshape(-1, 8, 32)
    return np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """L: u8 [n, 256] (low 4 bits used) -> u8 [n, 128]: byte 32c + l = element 64c + l | element 64c + 32 + l << 4."""
    q = (L & 0xF).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


# ---------------------------------------------------------------- dequantize kernels (numba)

@njit(cache=True, error_model="numpy")
def _deq_q2_k(b, d, dmin, y):
    """b: u8 [n, 84] -> y: f32 [n, 256]; y = d*sc*q - dmin*m per 16-element sub-block."""
    for i in range(b.shape[0]):
        for sub in range(16):  # sub = 8c + 2k + half: elements 128c + 32k + 16half + l
            c, k, half = sub // 8, (sub % 8) // 2, sub % 2
            sc = np.int64(b[i, sub])
            dl = d[i] * _F32(sc & 0xF)
            ml = dmin[i] * _F32(sc >> 4)
            at = 16 + 32 * c + 16 * half
            e0 = 128 * c + 32 * k + 16 * half
            for l in range(16):
                q = (np.int64(b[i, at + l]) >> (2 * k)) & 3
                y[i, e0 + l] = dl * _F32(q) - ml


@njit(cache=True, error_model="numpy")
def _deq_q3_k(b, d, y):
    """b: u8 [n, 110] -> y: f32 [n, 256]; y = d*(sc-32)*(q - 4*(1-hbit))."""
    for i in range(b.shape[0]):
        s = b[i, 96:108]
        for sub in range(16):
            c, k, half = sub // 8, (sub % 8) // 2, sub % 2
            dl = d[i] * _F32(ks.get_scale_q3(sub, s))
            e0 = 128 * c + 32 * k + 16 * half
            for l in range(16 * half, 16 * half + 16):
                low = (np.int64(b[i, 32 + 32 * c + l]) >> (2 * k)) & 3
                hbit = (np.int64(b[i, l]) >> (4 * c + k)) & 1
                y[i, e0 + l - 16 * half] = dl * _F32(low - (0 if hbit else 4))


@njit(cache=True, error_model="numpy")
def _deq_q45_k(b, d, dmin, five_bit, y):
    """Q4_K (b: u8 [n, 144]) / Q5_K (b: u8 [n, 176]) -> y: f32 [n, 256]; y = d*sc*q - dmin*m."""
    qs_at = 48 if five_bit else 16
    for i in range(b.shape[0]):
        s = b[i, 4:16]
        for j in range(8):
            sc, m = ks.get_scale_min_k4(j, s)
            d1 = d[i] * _F32(sc)
            m1 = dmin[i] * _F32(m)
            c, half = j // 2, j % 2
            for l in range(32):
                q = (np.int64(b[i, qs_at + 32 * c + l]) >> (4 * half)) & 0xF
                if five_bit:
                    q |= ((np.int64(b[i, 16 + l]) >> j) & 1) << 4
                y[i, 32 * j + l] = d1 * _F32(q) - m1


@njit(cache=True, error_model="numpy")
def _deq_q6_k(b, d, y):
    """b: u8 [n, 210] -> y: f32 [n, 256]; y = d*sc*(q - 32)."""
    for i in range(b.shape[0]):
        for sub in range(16):
            c, k, half = sub // 8, (sub % 8) // 2, sub % 2
            sc = np.int64(b[i, 192 + sub])
            dl = d[i] * _F32(sc - 256 if sc > 127 else sc)
            e0 = 128 * c + 32 * k + 16 * half
            for l in range(16 * half, 16 * half + 16):
                low = (np.int64(b[i, 64 * c + 32 * (k & 1) + l]) >> (4 * (k >> 1))) & 0xF
                high = (np.int64(b[i, 128 + 32 * c + l]) >> (2 * k)) & 3
                y[i, e0 + l - 16 * half] = dl * _F32((low | (high << 4)) - 32)


# ---------------------------------------------------------------- layouts

class _KLayout(Layout):
    """A K-quant super-block: pack a KQuant into bytes, unpack bytes into one."""

    def pack(self, r: ks.KQuant) -> np.ndarray:
        """Search result -> u8 [n, type_size]."""
        raise NotImplementedError

    def unpack(self, b: np.ndarray) -> ks.KQuant:
        """u8 [n, type_size] -> the fields pack takes."""
        raise NotImplementedError


def _deq(kernel, b: np.ndarray, *fields: int, flag: bool | None = None) -> np.ndarray:
    """Run a dequantize kernel over b [n, type_size] with the f16 fields at the given offsets."""
    b = np.ascontiguousarray(b)
    y = np.empty((b.shape[0], QK_K), np.float32)
    args = [f16_field(b, at) for at in fields] + ([] if flag is None else [flag])
    kernel(b, *args, y)
    return y


class Q2_K(_KLayout, qtype=GGMLType.Q2_K):
    """scales[16] (sc | m << 4), qs[64] (2-bit), d, dmin (f16): y = d*sc*q - dmin*m."""

    def pack(self, r: ks.KQuant) -> np.ndarray:
        out = np.empty((r.L.shape[0], self.type_size), np.uint8)
        out[:, 0:16] = r.scales
        out[:, 16:80] = _pack_2bit(r.L)
        put_f16(out, 80, r.d)
        put_f16(out, 82, r.dmin)
        return out

    def unpack(self, b: np.ndarray) -> ks.KQuant:
        return ks.KQuant(f16_field(b, 80), f16_field(b, 82), b[:, 0:16].copy(), _unpack_2bit(b[:, 16:80]))

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        return _deq(_deq_q2_k, b, 80, 82)


class Q3_K(_KLayout, qtype=GGMLType.Q3_K):
    """hmask[32], qs[64] (low 2 bits), scales[12] (6-bit, +32), d (f16): y = d*(sc-32)*(q-4)."""

    def pack(self, r: ks.KQuant) -> np.ndarray:
        out = np.empty((r.L.shape[0], self.type_size), np.uint8)
        out[:, 0:32] = _pack_bit_planes((r.L > 3).astype(np.uint8))
        out[:, 32:96] = _pack_2bit(r.L & 3)
        out[:, 96:108] = r.scales
        put_f16(out, 108, r.d)
        return out

    def unpack(self, b: np.ndarray) -> ks.KQuant:
        L = _unpack_2bit(b[:, 32:96]) | (_bit_planes(b[:, 0:32]) << 2)
        return ks.KQuant(f16_field(b, 108), np.zeros(b.shape[0], np.float32), b[:, 96:108].copy(), L)

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        return _deq(_deq_q3_k, b, 108)


class Q4_K(_KLayout, qtype=GGMLType.Q4_K):
    """d, dmin (f16), scales[12] (6-bit sc/m pairs), qs[128]: y = d*sc*q - dmin*m per 32."""

    def pack(self, r: ks.KQuant) -> np.ndarray:
        out = np.empty((r.L.shape[0], self.type_size), np.uint8)
        put_f16(out, 0, r.d)
        put_f16(out, 2, r.dmin)
        out[:, 4:16] = r.scales
        out[:, 16:144] = _pack_nibbles(r.L)
        return out

    def unpack(self, b: np.ndarray) -> ks.KQuant:
        return ks.KQuant(f16_field(b, 0), f16_field(b, 2), b[:, 4:16].copy(), _unpack_nibbles(b[:, 16:144]))

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        return _deq(_deq_q45_k, b, 0, 2, flag=False)


class Q5_K(_KLayout, qtype=GGMLType.Q5_K):
    """d, dmin (f16), scales[12], qh[32] (bit j of qh[l] = 5th bit of element 32j + l), qs[128]."""

    def pack(self, r: ks.KQuant) -> np.ndarray:
        out = np.empty((r.L.shape[0], self.type_size), np.uint8)
        put_f16(out, 0, r.d)
        put_f16(out, 2, r.dmin)
        out[:, 4:16] = r.scales
        out[:, 16:48] = _pack_bit_planes(r.L >> 4)
        out[:, 48:176] = _pack_nibbles(r.L)
        return out

    def unpack(self, b: np.ndarray) -> ks.KQuant:
        L = _unpack_nibbles(b[:, 48:176]) | (_bit_planes(b[:, 16:48]) << 4)
        return ks.KQuant(f16_field(b, 0), f16_field(b, 2), b[:, 4:16].copy(), L)

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        return _deq(_deq_q45_k, b, 0, 2, flag=True)


class Q6_K(_KLayout, qtype=GGMLType.Q6_K):
    """ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d (f16): y = d*sc*(q-32)."""

    def pack(self, r: ks.KQuant) -> np.ndarray:
        n = r.L.shape[0]
        q = r.L.reshape(n, 2, 4, 32)  # [block, half of 128, k, l]
        low = q & 0xF
        ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
        hi = q >> 4
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        out = np.empty((n, self.type_size), np.uint8)
        out[:, 0:128] = ql.reshape(n, 128)
        out[:, 128:192] = qh.reshape(n, 64)
        out[:, 192:208] = r.scales
        put_f16(out, 208, r.d)
        return out

    def unpack(self, b: np.ndarray) -> ks.KQuant:
        n = b.shape[0]
        ql = b[:, 0:128].reshape(n, 2, 2, 32)  # [block, half, 0: k=0|k=2, 1: k=1|k=3, l]
        low = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        high = _unpack_2bit(b[:, 128:192]).reshape(n, 2, 4, 32)
        L = (low | (high << 4)).reshape(n, QK_K)
        return ks.KQuant(f16_field(b, 208), np.zeros(n, np.float32), b[:, 192:208].copy(), L)

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        return _deq(_deq_q6_k, b, 208)


class Q8KFields(NamedTuple):
    """The fields of n Q8_K blocks."""

    d: np.ndarray  # [n] f32
    q: np.ndarray  # [n, 256] int8
    bsums: np.ndarray  # [n, 16] int16: sums of 16 codes


class Q8_K(Layout, qtype=GGMLType.Q8_K):
    """d (f32), qs[256] (int8), bsums[16] (int16 sums of 16 codes): ggml's activation format."""

    def pack(self, f: Q8KFields) -> np.ndarray:
        """Fields -> u8 [n, 292]."""
        out = np.empty((f.q.shape[0], self.type_size), np.uint8)
        out[:, 0:4] = np.asarray(f.d, np.float32).view(np.uint8).reshape(-1, 4)
        out[:, 4:260] = f.q.view(np.uint8)
        out[:, 260:292] = np.asarray(f.bsums, np.int16).view(np.uint8).reshape(-1, 32)
        return out

    def unpack(self, b: np.ndarray) -> Q8KFields:
        """u8 [n, 292] -> fields."""
        b = np.ascontiguousarray(b)
        return Q8KFields(b[:, 0:4].copy().view(np.float32).reshape(-1), b[:, 4:260].copy().view(np.int8),
                         b[:, 260:292].copy().view(np.int16))

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        """b: u8 [n, 292] -> f32 [n, 256]: d * q."""
        b = np.ascontiguousarray(b)
        d = np.ascontiguousarray(b[:, 0:4]).view(np.float32)  # [n, 1]
        return d * np.ascontiguousarray(b[:, 4:260]).view(np.int8).astype(np.float32)
