"""The cold-start ops: every CPU backend op in numpy + BLAS, with nothing to compile.

A fresh install (numba's disk cache empty) would compile ~20 CPU s of kernels before its first token. While
background processes compile them (qf/runtime/coldstart.py), `ColdStartBackend` (runtime/backend.py) runs
the forward pass on these functions instead: each weight is decoded to f32 a row tile at a time with numpy
(`dequantize_rows`; a tile is freed right after its product, the model is never held in f32) and multiplied
with numpy's BLAS; norms, RoPE, activations and attention are numpy over the same arrays; the KV cache is
written in the layout and types the numba kernels read (kernels/cpu_attention.py), so a sequence started here
continues on the compiled kernels once they are in the cache.

Numerics are the f32 path's: weights decoded exactly as gguf.quants decodes them, f32 products (BLAS order),
f64 sums of squares in the norms as ggml; logits match the compiled path's to a KLD of ~1e-6.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from qf.format.ggml_types import GGMLType

TILE_VALUES = 1 << 21  # f32 values of one decoded weight tile (8 MiB): rows per tile = this // n_in
ATTN_ROWS = 256  # query rows per attention block (bounds the [rows, heads, keys] score array)
GELU_C = np.float32(math.sqrt(2.0 / math.pi))
GELU_A = np.float32(0.044715)
QBLOCK = 32
_F32 = np.float32


# ------------------------------------------------------------------------------------------ weight decoding

def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per value (last axis) as f16 -> f32: b u8 [..., 2] -> [..., 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(_F32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's nibble order of a 32-value block: low nibbles are values 0-15, high ones 16-31: u8 [..., 32]."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


_BITS = np.arange(32, dtype=np.uint32)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """The 5th bit of each of 32 values from a u32 per block, as 0 / 16: u8 [..., 4] -> u8 [..., 32]."""
    h = np.ascontiguousarray(qh).view(np.uint32)  # [..., 1]
    return (((h >> _BITS) & 1) << 4).astype(np.uint8)


def _q4_0(b: np.ndarray) -> np.ndarray:
    """Q4_0 blocks u8 [..., 18] -> f32 [..., 32]: (q - 8) * d."""
    return (_nibbles(b[..., 2:]).astype(np.int8) - np.int8(8)).astype(_F32) * _f16(b[..., :2])


def _q4_1(b: np.ndarray) -> np.ndarray:
    """Q4_1 blocks u8 [..., 20] -> f32 [..., 32]: q * d + m."""
    return _nibbles(b[..., 4:]).astype(_F32) * _f16(b[..., :2]) + _f16(b[..., 2:4])


def _q5_0(b: np.ndarray) -> np.ndarray:
    """Q5_0 blocks u8 [..., 22] -> f32 [..., 32]: (q - 16) * d."""
    q = _nibbles(b[..., 6:]) | _fifth_bits(b[..., 2:6])
    return (q.astype(np.int8) - np.int8(16)).astype(_F32) * _f16(b[..., :2])


def _q5_1(b: np.ndarray) -> np.ndarray:
    """Q5_1 blocks u8 [..., 24] -> f32 [..., 32]: q * d + m."""
    q = _nibbles(b[..., 8:]) | _fifth_bits(b[..., 4:8])
    return q.astype(_F32) * _f16(b[..., :2]) + _f16(b[..., 2:4])


def _q8_0(b: np.ndarray) -> np.ndarray:
    """Q8_0 blocks u8 [..., 34] -> f32 [..., 32]: q * d."""
    return np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(_F32) * _f16(b[..., :2])


# ggml type -> (bytes per block of 32, numpy block decoder): the types decoded here (bit for bit as gguf.quants);
# the others go through gguf.quants.dequantize.
_BLOCK_DECODERS: dict[GGMLType, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    GGMLType.Q4_0: (18, _q4_0), GGMLType.Q4_1: (20, _q4_1), GGMLType.Q5_0: (22, _q5_0),
    GGMLType.Q5_1: (24, _q5_1), GGMLType.Q8_0: (34, _q8_0),
}
_PLAIN: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: lambda d: d.view(_F32),
    GGMLType.F16: lambda d: d.view(np.float16).astype(_F32),
    GGMLType.BF16: lambda d: (d.view(np.uint16).astype(np.uint32) << 16).view(_F32),
}


def dequantize_rows(qtype: GGMLType, data: np.ndarray, n_in: int) -> np.ndarray:
    """Packed rows u8 [n, row_bytes] of a ggml type -> f32 [n, n_in], with numpy only (no compiled kernel)."""
    n = data.shape[0]
    plain = _PLAIN.get(qtype)
    if plain is not None:
        return np.ascontiguousarray(plain(np.ascontiguousarray(data)).reshape(n, n_in), dtype=_F32)
    block = _BLOCK_DECODERS.get(qtype)
    if block is not None:
        nbytes, decode = block
        return decode(data.reshape(n, n_in // QBLOCK, nbytes)).reshape(n, n_in)
    return _dequantize_other(qtype, data, n_in)


def _dequantize_other(qtype: GGMLType, data: np.ndarray, n_in: int) -> np.ndarray:
    """K / IQ / other types: gguf.quants' numpy decoders; the project's codec for a type gguf lacks."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    try:
        gtype = GGMLQuantizationType(int(qtype))
    except ValueError:
        gtype = None
    if gtype is not None and gtype in quants._type_traits:  # noqa: SLF001 - gguf's registry of numpy decoders
        return quants.dequantize(np.ascontiguousarray(data), gtype).reshape(data.shape[0], n_in).astype(_F32)
    from qf.quant.codecs import get_codec

    return get_codec(qtype).dequantize(np.ascontiguousarray(data)).reshape(data.shape[0], n_in).astype(_F32)


def tile_rows(n_in: int) -> int:
    """Weight rows decoded at once (TILE_VALUES f32 values; a multiple of 16)."""
    return max(16, TILE_VALUES // max(1, n_in) // 16 * 16)


def matmul(qtype: GGMLType, data: np.ndarray, n_in: int, x: np.ndarray) -> np.ndarray:
    """x @ w.T for packed rows data u8 [n_out, row_bytes]: x f32 [M, n_in] -> f32 [M, n_out]; w decoded a tile
    of rows at a time and multiplied with BLAS."""
    n_out = data.shape[0]
    y = np.empty((x.shape[0], n_out), _F32)
    step = tile_rows(n_in)
    if n_out <= step:
        return np.matmul(x, dequantize_rows(qtype, data, n_in).T, out=y)  # BLAS needs a contiguous out
    for r0 in range(0, n_out, step):
        w = dequantize_rows(qtype, data[r0:r0 + step], n_in)  # [tile, n_in]
        y[:, r0:r0 + w.shape[0]] = x @ w.T
    return y


def matmul_rows(qtype: GGMLType, data: np.ndarray, n_in: int, x: np.ndarray) -> np.ndarray:
    """matmul with every row of x computed as it would be alone (a matrix-vector product each): the
    exact-rows contract of a multi-sequence decode step."""
    n_out = data.shape[0]
    y = np.empty((x.shape[0], n_out), _F32)
    step = tile_rows(n_in)
    for r0 in range(0, n_out, step):
        w = dequantize_rows(qtype, data[r0:r0 + step], n_in)
        for i in range(x.shape[0]):
            np.matmul(w, x[i], out=y[i, r0:r0 + w.shape[0]])
    return y


def get_rows(qtype: GGMLType, data: np.ndarray, n_in: int, ids: np.ndarray) -> np.ndarray:
    """Rows data[ids] decoded: ids int [k] -> f32 [k, n_in] (embedding lookup)."""
    return dequantize_rows(qtype, np.ascontiguousarray(data[ids]), n_in)


# ------------------------------------------------------------------------------------------ small ops

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w over the last axis (sum of squares in f64, as ggml): [M, n] -> [M, n]."""
    x64 = x.astype(np.float64)
    scale = (1.0 / np.sqrt(np.einsum("mi,mi->m", x64, x64) / x.shape[1] + eps)).astype(_F32)
    return (x * scale[:, None]) * w


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: np.ndarray, neox: bool) -> None:
    """Rotate x [M, H, D] in place by position pos[m]'s angles (cos/sin [n_ctx, P]): pairs (2i, 2i + 1) in
    ggml's normal mode, (i, i + P) in NEOX mode; dimensions past 2P stay as they are."""
    p = cos.shape[1]
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]  # [M, 1, P]
    if neox:
        a, b = x[:, :, :p], x[:, :, p:2 * p]
    else:
        a, b = x[:, :, 0:2 * p:2], x[:, :, 1:2 * p:2]
    a0, b0 = a.copy(), b.copy()
    a[...] = a0 * c - b0 * s
    b[...] = a0 * s + b0 * c


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, into gate: [M, n]."""
    with np.errstate(over="ignore"):
        gate[...] = gate / (_F32(1.0) + np.exp(-gate)) * up
    return gate


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gelu_tanh(gate) * up, into gate: [M, n]."""
    t = np.tanh(GELU_C * gate * (_F32(1.0) + GELU_A * gate * gate))
    gate[...] = _F32(0.5) * gate * (_F32(1.0) + t) * up
    return gate


# ------------------------------------------------------------------------------------------ KV cache

def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero."""
    return np.sign(v) * np.floor(np.abs(v) + _F32(0.5))


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows x f32 [..., D] -> (int8 quants [..., D], f32 block scales [..., D / 32]) as ggml's
    quantize_row_q8_0_ref (cpu_attention.store_q8_0)."""
    b = x.reshape(*x.shape[:-1], -1, QBLOCK)
    d = np.abs(b).max(axis=-1) / _F32(127.0)
    inv = np.divide(_F32(1.0), d, out=np.zeros_like(d), where=d != 0)
    q = _roundf(b * inv[..., None]).astype(np.int8)
    return q.reshape(x.shape), d


def quantize_q4_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows x f32 [..., D] -> (u8 nibbles [..., D / 2], f32 block scales [..., D / 32]) as ggml's
    quantize_row_q4_0_ref (cpu_attention.store_q4_0): the value of largest magnitude (first on ties) maps to -8."""
    b = x.reshape(*x.shape[:-1], -1, QBLOCK)
    at = np.argmax(np.abs(b), axis=-1)[..., None]
    d = np.take_along_axis(b, at, axis=-1)[..., 0] / _F32(-8.0)
    inv = np.divide(_F32(1.0), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, (b * inv[..., None] + _F32(8.5)).astype(np.int32)).astype(np.uint8)
    half = QBLOCK // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.reshape(*x.shape[:-1], x.shape[-1] // 2), d


def read_keys(type_name: str, data: np.ndarray, scales: np.ndarray, slot: int, n: int) -> np.ndarray:
    """Positions 0 .. n - 1 of one slot of a cache tensor (cpu_attention's layouts) -> f32 [Hkv, n, D]."""
    x = data[slot, :, :n]
    if type_name == "f32":
        return x
    if type_name == "f16":
        return x.view(np.float16).astype(_F32)
    d = scales[slot, :, :n].view(np.float16).astype(_F32)[..., None]  # [Hkv, n, D / 32, 1]
    if type_name == "q8_0":
        q = x.astype(_F32).reshape(*x.shape[:2], -1, QBLOCK)
    else:  # q4_0: ggml's nibble order per block of 16 bytes
        b = x.reshape(*x.shape[:2], -1, QBLOCK // 2)
        q = np.concatenate([b & 15, b >> 4], axis=-1).astype(_F32) - _F32(8.0)
    return (q * d).reshape(*x.shape[:2], -1)


def attend(q: np.ndarray, keys: Callable[[int, int], tuple[np.ndarray, np.ndarray]], slots: np.ndarray,
           pos: np.ndarray, scale: float, window: int) -> np.ndarray:
    """Causal GQA attention: row m of q [M, H, D] sees positions t <= pos[m] (and t > pos[m] - window when
    window > 0) of slot slots[m]; keys(slot, n) gives that slot's K, V f32 [Hkv, n, D] -> out [M, H, D]."""
    m_rows, n_head, dim = q.shape
    out = np.empty_like(q)
    for slot in np.unique(slots):
        rows = np.nonzero(slots == slot)[0]
        k, v = keys(int(slot), int(pos[rows].max()) + 1)
        n_kv = k.shape[0]
        group = n_head // n_kv
        for r0 in range(0, rows.size, ATTN_ROWS):
            r = rows[r0:r0 + ATTN_ROWS]
            p = pos[r]
            qs = (q[r] * _F32(scale)).reshape(r.size, n_kv, group, dim)
            s = np.einsum("mkgd,ktd->mkgt", qs, k)  # [rows, Hkv, group, keys]
            t = np.arange(k.shape[1])
            hide = t[None, :] > p[:, None]
            if window > 0:
                hide |= t[None, :] <= p[:, None] - window
            s[np.broadcast_to(hide[:, None, None, :], s.shape)] = -np.inf
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            out[r] = np.einsum("mkgt,ktd->mkgd", s, v).reshape(r.size, n_head, dim)
    return out
