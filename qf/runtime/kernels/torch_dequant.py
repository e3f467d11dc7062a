"""Packed ggml weights as torch tensors on any device: per-type dequantization and a tiled dequant-matmul.

A weight [n_out, n_in] is uploaded once and kept packed: its blocks are split into their fields (scales,
mins, low/high bits), each stored as a tensor [n_blocks, k, n_out] of the field's own dtype, output rows
innermost. This is the file's bytes rearranged (the K-quants' 6-bit sub-block scales are unpacked once to a
byte each, +0.125 bit per weight), so a layer costs about its file size on the device (4.5 bits per weight
for Q4_0, 4.625 for Q4_K). Rows innermost makes every unpacking step a plain elementwise op over long
contiguous runs (fast on CPU and coalesced on CUDA) and yields the transposed weight [n_in, n_out] that
`x @ W.T` wants, without a transpose.

`dequantize` rebuilds values in the arithmetic order of gguf.quants (ggml's dequantize_row_*): with
dtype=float32 the result is bit-identical to qf.quant.codecs (except F16 signalling NaNs, which torch's
half-to-float conversion quiets; they stay NaN). `matmul` walks the output rows in tiles: each tile is
dequantized into a scratch of at most `tile_elems` values and multiplied (a GEMV for one token, a GEMM for
a prefill batch), so the model is never held dequantized; the scratch of one call is at most one weight
matrix (what the planner budgets as dequant_scratch). Everything is plain torch ops, so it runs on the CPU
(tests) and on CUDA alike; `compiled()` optionally fuses each type's dequantizer with torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from qf.format.ggml_types import BLOCK, GGMLType

# ------------------------------------------------------------------------------------------ block layouts
@dataclass(frozen=True)
class Field:
    """Bytes [start, start + size) of every block, read as `np_dtype` and kept on the device as `dtype`."""

    name: str
    start: int
    size: int
    np_dtype: type
    dtype: torch.dtype


def _f16(name: str, start: int) -> Field:
    return Field(name, start, 2, np.float16, torch.float16)


def _u8(name: str, start: int, size: int) -> Field:
    return Field(name, start, size, np.uint8, torch.uint8)


def _i8(name: str, start: int, size: int) -> Field:
    return Field(name, start, size, np.int8, torch.int8)


# ggml's block structs (ggml-common.h), field by field; offsets are byte sums like ggml_types.BLOCK.
FIELDS: dict[GGMLType, tuple[Field, ...]] = {
    GGMLType.F32: (Field("w", 0, 4, np.float32, torch.float32),),
    GGMLType.F16: (Field("w", 0, 2, np.float16, torch.float16),),
    GGMLType.BF16: (Field("w", 0, 2, np.int16, torch.bfloat16),),  # numpy has no bf16: bits as int16
    GGMLType.Q4_0: (_f16("d", 0), _u8("qs", 2, 16)),
    GGMLType.Q4_1: (_f16("d", 0), _f16("m", 2), _u8("qs", 4, 16)),
    GGMLType.Q5_0: (_f16("d", 0), _u8("qh", 2, 4), _u8("qs", 6, 16)),
    GGMLType.Q5_1: (_f16("d", 0), _f16("m", 2), _u8("qh", 4, 4), _u8("qs", 8, 16)),
    GGMLType.Q8_0: (_f16("d", 0), _i8("qs", 2, 32)),
    GGMLType.Q2_K: (_u8("scales", 0, 16), _u8("qs", 16, 64), _f16("d", 80), _f16("dmin", 82)),
    GGMLType.Q3_K: (_u8("hmask", 0, 32), _u8("qs", 32, 64), _u8("scales", 96, 12), _f16("d", 108)),
    GGMLType.Q4_K: (_f16("d", 0), _f16("dmin", 2), _u8("scales", 4, 12), _u8("qs", 16, 128)),
    GGMLType.Q5_K: (_f16("d", 0), _f16("dmin", 2), _u8("scales", 4, 12), _u8("qh", 16, 32), _u8("qs", 48, 128)),
    GGMLType.Q6_K: (_u8("ql", 0, 128), _u8("qh", 128, 64), _i8("scales", 192, 16), _f16("d", 208)),
    GGMLType.IQ4_NL: (_f16("d", 0), _u8("qs", 2, 16)),
    GGMLType.IQ4_XS: (_f16("d", 0), _u8("scales_h", 2, 2), _u8("scales_l", 4, 4), _u8("qs", 8, 128)),
    GGMLType.IQ2_XXS: (_f16("d", 0), _u8("qs", 2, 64)),
    GGMLType.IQ2_XS: (_f16("d", 0), _u8("qs", 2, 64), _u8("scales", 66, 8)),
    GGMLType.IQ2_S: (_f16("d", 0), _u8("qs", 2, 32), _u8("signs", 34, 32), _u8("qh", 66, 8), _u8("scales", 74, 8)),
    GGMLType.IQ3_XXS: (_f16("d", 0), _u8("qs", 2, 64), _u8("sas", 66, 32)),
    GGMLType.IQ3_S: (_f16("d", 0), _u8("qs", 2, 64), _u8("qh", 66, 8), _u8("signs", 74, 32), _u8("scales", 106, 4)),
    GGMLType.IQ1_S: (_f16("d", 0), _u8("qs", 2, 32), _u8("qh", 34, 16)),
    GGMLType.IQ1_M: (_u8("qs", 0, 32), _u8("qh", 32, 16), _u8("scales", 48, 8)),
}

Fields = dict[str, torch.Tensor]  # field name -> tensor [n_blocks, k, rows]


def split_fields(qtype: GGMLType, data: np.ndarray) -> dict[str, np.ndarray]:
    """Raw rows u8 [n_rows, row_bytes] -> each field as an array [n_rows, n_blocks, k] (host copy)."""
    bs, ts = BLOCK[qtype]
    n_rows, row_bytes = data.shape
    blocks = np.asarray(data, dtype=np.uint8).reshape(n_rows, row_bytes // ts, ts)
    out = {}
    for f in FIELDS[qtype]:
        raw = blocks[:, :, f.start:f.start + f.size].copy()  # C-contiguous, writable
        out[f.name] = raw.view(f.np_dtype)  # [n_rows, n_blocks, size / itemsize]
    return out


# ------------------------------------------------------------------------------------------ bit helpers


def _planes(q: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """The width-bit fields of bytes q, lowest first, stacked as a new axis `dim`: 8 // width planes."""
    mask = (1 << width) - 1
    out = []
    for s in range(0, 8, width):
        v = q >> s if s else q
        out.append(v & mask if s + width < 8 else v)
    return torch.stack(out, dim=dim)


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """Legacy 4-bit codes: u8 [nb, 16, r] -> [nb, 32, r]; element j: low nibble of byte j, j + 16: high."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def _bit_lanes(qh: torch.Tensor) -> torch.Tensor:
    """Bits of a little-endian bit field: u8 [nb, k, r] -> [nb, 8 k, r], element j = bit j % 8 of byte j // 8."""
    return _planes(qh, 1, dim=2).flatten(1, 2)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


# ------------------------------------------------------------------------------------------ dequantizers
# Each maps fields [nb, k, r] to values [nb, block_size, r] in `dt`. Per-block scales are formed in f32 (as
# ggml does), then cast to dt; with dt=float32 every operation repeats gguf.quants one for one.


def _dq_float(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """F32 / F16 / BF16: a cast."""
    return f["w"].to(dt)


def _dq_q4_0(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """x = d * (q - 8)."""
    return _f32(f["d"]).to(dt) * (_nibbles32(f["qs"]).to(dt) - 8)


def _dq_q4_1(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """x = d * q + m."""
    return _f32(f["d"]).to(dt) * _nibbles32(f["qs"]).to(dt) + _f32(f["m"]).to(dt)


def _q5_codes(f: Fields) -> torch.Tensor:
    """5-bit codes u8 [nb, 32, r]: nibble | (bit j of the little-endian u32 qh) << 4."""
    return _nibbles32(f["qs"]) | (_bit_lanes(f["qh"]) << 4)


def _dq_q5_0(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """x = d * (q - 16)."""
    return _f32(f["d"]).to(dt) * (_q5_codes(f).to(dt) - 16)


def _dq_q5_1(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """x = d * q + m."""
    return _f32(f["d"]).to(dt) * _q5_codes(f).to(dt) + _f32(f["m"]).to(dt)


def _dq_q8_0(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """x = q * d."""
    return f["qs"].to(dt) * _f32(f["d"]).to(dt)


def _sub_scaled(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor:
    """scale * q (- minimum) per sub-block: q [nb, S, n, r], scale/minimum f32 [nb, S, r] -> [nb, S * n, r]."""
    y = scale.unsqueeze(2).to(dt) * q.to(dt)
    if minimum is not None:
        y = y - minimum.unsqueeze(2).to(dt)
    return y.flatten(1, 2)


def _dq_q2_k(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """16 sub-blocks of 16: x = d * (sc & 15) * q - dmin * (sc >> 4); q: 2-bit crumbs of qs."""
    nb, _, r = f["qs"].shape
    sc = f["scales"]
    q = _planes(f["qs"].unflatten(1, (2, 32)), 2, dim=2).reshape(nb, 16, 16, r)  # [nb, 2, 4, 32, r]
    return _sub_scaled(q, _f32(f["d"]) * _f32(sc & 0xF), _f32(f["dmin"]) * _f32(sc >> 4), dt)


def _q3_k_scales(scales: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes of 6-bit scales [nb, 12, r] -> int8 [nb, 16, r] minus 32 (low nibbles, then 2-bit highs)."""
    lo = _planes(scales[:, :8], 4, dim=1).flatten(1, 2)  # [nb, 16, r]
    hi = _planes(scales[:, 8:], 2, dim=1).flatten(1, 2)  # [nb, 16, r]
    return (lo | (hi << 4)).to(torch.int8) - 32


def _dq_q3_k(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """16 sub-blocks of 16: x = d * scale * (q2 - 4 * !hbit)."""
    nb, _, r = f["qs"].shape
    ql = _planes(f["qs"].unflatten(1, (2, 32)), 2, dim=2).reshape(nb, 16, 16, r)  # [nb, 2, 4, 32, r]
    qh = _planes(f["hmask"], 1, dim=1).reshape(nb, 16, 16, r) ^ 1  # [nb, 8, 32, r]; offset where the bit is 0
    q = ql.to(torch.int8) - (qh << 2).to(torch.int8)
    return _sub_scaled(q, _f32(f["d"]) * _f32(f["sc"]), None, dt)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K 12-byte packed 6-bit (scale, min) pairs [nb, 12, r] -> u8 [nb, 8, r] each (get_scale_min_k4)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q4_k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """u8 [nb, 128, r] -> [nb, 8, 32, r]: each 32 bytes give sub-block 2g (low nibbles) and 2g + 1 (high)."""
    nb, _, r = qs.shape
    return _planes(qs.unflatten(1, (4, 32)), 4, dim=2).reshape(nb, 8, 32, r)  # [nb, 4, 2, 32, r]


def _dq_q4_k(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """8 sub-blocks of 32: x = d * sc * q - dmin * m."""
    return _sub_scaled(_q4_k_nibbles(f["qs"]), _f32(f["d"]) * _f32(f["sc"]), _f32(f["dmin"]) * _f32(f["mn"]), dt)


def _dq_q5_k(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """8 sub-blocks of 32: x = d * sc * (nibble | hbit << 4) - dmin * m; bit i of qh[j] belongs to sub-block i."""
    q = _q4_k_nibbles(f["qs"]) | (_planes(f["qh"], 1, dim=1) << 4)  # [nb, 8, 32, r]
    return _sub_scaled(q, _f32(f["d"]) * _f32(f["sc"]), _f32(f["dmin"]) * _f32(f["mn"]), dt)


def _dq_q6_k(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """16 sub-blocks of 16: x = d * scale * ((ql | qh << 4) - 32)."""
    nb, _, r = f["ql"].shape
    ql = _planes(f["ql"].unflatten(1, (2, 64)), 4, dim=2).reshape(nb, 8, 32, r)  # [nb, 2, 2, 64, r]
    qh = _planes(f["qh"].unflatten(1, (2, 32)), 2, dim=2).reshape(nb, 8, 32, r)  # [nb, 2, 4, 32, r]
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(nb, 16, 16, r)
    return _sub_scaled(q, _f32(f["d"]) * _f32(f["scales"]), None, dt)


# ------------------------------------------------------------------------------------------ IQ types
# Grid points and levels come from qf.quant's tables, kept per device. Every index is built from masked bit
# fields, so it is in range for any bytes. All IQ values are exact in f32 (an f16 times small integers), so
# any evaluation order gives gguf.quants' values.

_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """An IQ value table on device: int8 [n, width] grid points, or int8 [16] IQ4 levels."""
    key = (name, str(device))
    t = _TABLES.get(key)
    if t is None:
        from qf.quant import iq1_tables, iq_grids, iq_tables

        src = {"iq4nl": iq_tables.kvalues_iq4nl, "iq1s": iq1_tables.iq1s_grid}.get(name)
        a = src() if src else getattr(iq_grids, f"{name}_grid")()
        t = _TABLES[key] = torch.tensor(np.asarray(a).view(np.int8), device=device)
    return t


def _words(q: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Little-endian unsigned words of nbytes bytes: u8 [nb, k, r] -> int64 [nb, k / nbytes, r]."""
    w = q.unflatten(1, (-1, nbytes)).to(torch.int64)  # [nb, k / nbytes, nbytes, r]
    out = w[:, :, 0]
    for i in range(1, nbytes):
        out = out | (w[:, :, i] << (8 * i))
    return out


def _grid(name: str, idx: torch.Tensor) -> torch.Tensor:
    """Grid points of indices idx [nb, G, r] -> int8 [nb, G * width, r] (entry g's values at g * width ..)."""
    g = _table(name, idx.device)[idx]  # [nb, G, r, width]
    return g.permute(0, 1, 3, 2).flatten(1, 2)


def _signed(v: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """v [nb, 8 k, r] negated where bit j % 8 of signs[:, j // 8] is set; signs: [nb, k, r] bytes."""
    return torch.where(_bit_lanes(signs.to(torch.uint8)).bool(), -v.to(torch.int16), v.to(torch.int16))


def _per(scale: torch.Tensor, n: int, dt: torch.dtype) -> torch.Tensor:
    """A scale per group [nb, G, r] (f32) repeated for the n values of each group -> [nb, G * n, r] in dt."""
    return scale.to(dt).repeat_interleave(n, dim=1)


def _ksigns(idx: torch.Tensor) -> torch.Tensor:
    """ggml's ksigns_iq2xs of 7-bit indices: the 7 bits plus an eighth that makes the count of ones even."""
    par = idx ^ (idx >> 4)
    par = par ^ (par >> 2)
    par = (par ^ (par >> 1)) & 1
    return idx | (par << 7)


def _dq_iq4_nl(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """x = d * kvalues[nibble]."""
    q = _table("iq4nl", f["qs"].device)[_nibbles32(f["qs"]).long()]
    return _f32(f["d"]).to(dt) * q.to(dt)


def _dq_iq4_xs(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """8 sub-blocks of 32: x = d * (ls - 32) * kvalues[nibble], ls = 4 low bits | 2 high bits << 4."""
    nb, _, r = f["qs"].shape
    lo = _planes(f["scales_l"], 4, dim=2).flatten(1, 2)  # [nb, 8, r]
    hi = _planes(f["scales_h"], 2, dim=2).flatten(1, 2)  # [nb, 8, r]
    ls = (lo | (hi << 4)).to(torch.int16) - 32
    q = _table("iq4nl", f["qs"].device)[_nibbles32(f["qs"].unflatten(1, (8, 16)).flatten(0, 1)).long()]
    return _sub_scaled(q.reshape(nb, 8, 32, r), _f32(f["d"]) * _f32(ls), None, dt)


def _iq2_db(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """d * (0.5 + s) * 0.25 in f32."""
    return _f32(d) * (_f32(s) + 0.5) * 0.25


def _dq_iq2_xxs(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """Per 32: 4 grid bytes, a u32 of 4 sign indices and the scale; x = db * sign * grid."""
    w = _words(f["qs"], 4)  # [nb, 16, r]: (grid indices, signs + scale) per 32
    grid = _grid("iq2xxs", f["qs"].unflatten(1, (8, 8))[:, :, :4].flatten(1, 2).long())  # [nb, 256, r]
    aux = w[:, 1::2]  # [nb, 8, r]
    signs = _ksigns((aux.unsqueeze(2) >> torch.tensor([0, 7, 14, 21], device=aux.device).view(1, 1, 4, 1)) & 127)
    v = _signed(grid, signs.flatten(1, 2))
    return _per(_iq2_db(f["d"], aux >> 28), 32, dt) * v.to(dt)


def _dq_iq2_xs(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """u16 codes: 9-bit grid index, 7-bit sign index; a 4-bit scale per 16."""
    q = _words(f["qs"], 2)  # [nb, 32, r]
    v = _signed(_grid("iq2xs", q & 511), _ksigns(q >> 9))
    sc = _planes(f["scales"], 4, dim=2).flatten(1, 2)  # [nb, 16, r]
    return _per(_iq2_db(f["d"], sc), 16, dt) * v.to(dt)


def _dq_iq2_s(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """10-bit grid indices (qs | 2 bits of qh), stored signs, a 4-bit scale per 16."""
    hi = _planes(f["qh"], 2, dim=2).flatten(1, 2).long()  # [nb, 32, r]
    v = _signed(_grid("iq2s", f["qs"].long() | (hi << 8)), f["signs"])
    sc = _planes(f["scales"], 4, dim=2).flatten(1, 2)
    return _per(_iq2_db(f["d"], sc), 16, dt) * v.to(dt)


def _dq_iq3_xxs(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """8 grid bytes (4 values each) per 32, a u32 of 4 sign indices and the scale: db = d (0.5 + s) / 2."""
    aux = _words(f["sas"], 4)  # [nb, 8, r]
    signs = _ksigns((aux.unsqueeze(2) >> torch.tensor([0, 7, 14, 21], device=aux.device).view(1, 1, 4, 1)) & 127)
    v = _signed(_grid("iq3xxs", f["qs"].long()), signs.flatten(1, 2))
    return _per(_f32(f["d"]) * (_f32(aux >> 28) + 0.5) * 0.5, 32, dt) * v.to(dt)


def _dq_iq3_s(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """9-bit grid indices (qs | bit of qh), stored signs, db = d (1 + 2 s) per 32."""
    hi = _bit_lanes(f["qh"]).long()  # [nb, 64, r]
    v = _signed(_grid("iq3s", f["qs"].long() | (hi << 8)), f["signs"])
    sc = _planes(f["scales"], 4, dim=2).flatten(1, 2)  # [nb, 8, r]
    return _per(_f32(f["d"]) * _f32(1 + 2 * sc.to(torch.int16)), 32, dt) * v.to(dt)


def _iq1_values(qs: torch.Tensor, hi3: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """8 (g + delta) of grid entries qs | hi3 << 8 (neg: delta = -1/8, else +1/8): int16 [nb, 8 k, r]."""
    g = _grid("iq1s", qs.long() | (hi3.long() << 8)).to(torch.int16) * 8
    return g + 1 - 2 * neg.to(torch.int16).repeat_interleave(8, dim=1)


def _dq_iq1_s(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """Per 32: x = d (2 s + 1) (g + delta); 11-bit indices (3 bits each from qh), delta's sign in qh's top bit."""
    qh = _words(f["qh"], 2)  # [nb, 8, r]
    hi3 = (qh.unsqueeze(2) >> torch.tensor([0, 3, 6, 9], device=qh.device).view(1, 1, 4, 1)) & 7  # [nb, 8, 4, r]
    v = _iq1_values(f["qs"], hi3.flatten(1, 2), (qh >> 15).repeat_interleave(4, dim=1))
    dl = _f32(f["d"]) * _f32(2 * ((qh >> 12) & 7) + 1)
    return _per(dl * 0.125, 32, dt) * v.to(dt)


def _dq_iq1_m(f: Fields, dt: torch.dtype) -> torch.Tensor:
    """Per 16: x = d (2 s + 1) (g + delta); d is the f16 made of the four scales' top nibbles."""
    sc = _words(f["scales"], 2)  # [nb, 4, r]
    bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = bits.to(torch.int16).view(torch.float16).unsqueeze(1)  # [nb, 1, r]
    s = (sc.unsqueeze(2) >> torch.tensor([0, 3, 6, 9], device=sc.device).view(1, 1, 4, 1)) & 7  # [nb, 4, 4, r]
    nib = _planes(f["qh"], 4, dim=2).flatten(1, 2)  # [nb, 32, r]: one nibble per grid entry
    v = _iq1_values(f["qs"], nib & 7, nib >> 3)
    dl = _f32(d) * _f32(2 * s.flatten(1, 2) + 1)  # [nb, 16, r]
    return _per(dl * 0.125, 16, dt) * v.to(dt)


Dequantizer = Callable[[Fields, torch.dtype], torch.Tensor]

DEQUANT: dict[GGMLType, Dequantizer] = {
    GGMLType.F32: _dq_float,
    GGMLType.F16: _dq_float,
    GGMLType.BF16: _dq_float,
    GGMLType.Q4_0: _dq_q4_0,
    GGMLType.Q4_1: _dq_q4_1,
    GGMLType.Q5_0: _dq_q5_0,
    GGMLType.Q5_1: _dq_q5_1,
    GGMLType.Q8_0: _dq_q8_0,
    GGMLType.Q2_K: _dq_q2_k,
    GGMLType.Q3_K: _dq_q3_k,
    GGMLType.Q4_K: _dq_q4_k,
    GGMLType.Q5_K: _dq_q5_k,
    GGMLType.Q6_K: _dq_q6_k,
    GGMLType.IQ4_NL: _dq_iq4_nl,
    GGMLType.IQ4_XS: _dq_iq4_xs,
    GGMLType.IQ2_XXS: _dq_iq2_xxs,
    GGMLType.IQ2_XS: _dq_iq2_xs,
    GGMLType.IQ2_S: _dq_iq2_s,
    GGMLType.IQ3_XXS: _dq_iq3_xxs,
    GGMLType.IQ3_S: _dq_iq3_s,
    GGMLType.IQ1_S: _dq_iq1_s,
    GGMLType.IQ1_M: _dq_iq1_m,
}


# Once-per-upload rewrites of the stored fields (run on the device): unpack the 6-bit sub-block scales.
def _prep_q3_k(f: Fields) -> Fields:
    rest = {k: v for k, v in f.items() if k != "scales"}
    return {**rest, "sc": _q3_k_scales(f["scales"])}


def _prep_k4(f: Fields) -> Fields:
    rest = {k: v for k, v in f.items() if k != "scales"}
    sc, mn = _k_scale_min(f["scales"])
    return {**rest, "sc": sc, "mn": mn}


PREPARE: dict[GGMLType, Callable[[Fields], Fields]] = {
    GGMLType.Q3_K: _prep_q3_k,
    GGMLType.Q4_K: _prep_k4,
    GGMLType.Q5_K: _prep_k4,
}


def supported_types() -> list[GGMLType]:
    """Types with a torch dequantizer."""
    return sorted(DEQUANT)


# ------------------------------------------------------------------------------------------ packed weight


@dataclass
class PackedWeight:
    """A 2-D weight [n_out, n_in] as packed fields on one device; every field is [n_blocks, k, n_out]."""

    qtype: GGMLType
    n_in: int
    n_out: int
    fields: Fields

    @property
    def device(self) -> torch.device:
        return next(iter(self.fields.values())).device

    @property
    def nbytes(self) -> int:
        """Device bytes held by the fields."""
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def rows(self, index: slice | torch.Tensor) -> Fields:
        """The fields of a subset of rows: a slice gives views, an index tensor gathers."""
        if isinstance(index, slice):
            return {k: v[..., index] for k, v in self.fields.items()}
        return {k: v.index_select(-1, index) for k, v in self.fields.items()}


def pack(qtype: GGMLType, data: np.ndarray, n_in: int, device: torch.device | str) -> PackedWeight:
    """Upload raw rows u8 [n_out, row_bytes] of `qtype` to `device` in the torch layout."""
    qtype = GGMLType(qtype)
    if qtype not in DEQUANT:
        names = ", ".join(t.name for t in supported_types())
        raise NotImplementedError(f"no torch kernel for {qtype.name} (supported: {names})")
    bs, ts = BLOCK[qtype]
    if data.ndim != 2 or n_in % bs or data.shape[1] != n_in // bs * ts:
        raise ValueError(f"{qtype.name} rows of {n_in} values need {n_in // bs * ts} bytes per row, "
                         f"got an array of shape {tuple(data.shape)}")
    dtypes = {f.name: f.dtype for f in FIELDS[qtype]}
    fields = {k: _to_device(v, dtypes[k], device) for k, v in split_fields(qtype, data).items()}
    prep = PREPARE.get(qtype)
    return PackedWeight(qtype, int(n_in), int(data.shape[0]), prep(fields) if prep else fields)


def _to_device(a: np.ndarray, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host field [n_rows, nb, k] as a tensor [nb, k, n_rows] of `dtype` on `device` (transposed there)."""
    t = torch.from_numpy(a)
    if t.dtype != dtype:
        t = t.view(dtype)  # same itemsize: reinterpret the bits (int16 -> bfloat16)
    return t.to(device).permute(1, 2, 0).contiguous()


def dequantize_t(w: PackedWeight, index: slice | torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 dequant: Callable[[GGMLType], Dequantizer] | None = None) -> torch.Tensor:
    """Rows of w (all, a slice or an index tensor), transposed: values [n_in, rows] in `dtype`."""
    f = w.fields if index is None else w.rows(index)
    y = (dequant or DEQUANT.__getitem__)(w.qtype)(f, dtype)  # [n_blocks, block_size, rows]
    return y.reshape(w.n_in, y.shape[-1])


def dequantize(w: PackedWeight, index: slice | torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of w as values [rows, n_in] in `dtype` (a transposed view of `dequantize_t`)."""
    return dequantize_t(w, index, dtype).T


def tile_rows(n_in: int, tile_elems: int) -> int:
    """Rows per dequantization tile: at most tile_elems values, at least one row."""
    return max(1, tile_elems // max(1, n_in))


def matmul(w: PackedWeight, x: torch.Tensor, dtype: torch.dtype = torch.float32, tile_elems: int = 1 << 24,
           dequant: Callable[[GGMLType], Dequantizer] | None = None) -> torch.Tensor:
    """x [M, n_in] @ w.T -> f32 [M, n_out]: dequantize tiles of rows into `dtype`, multiply each, f32 out."""
    xc = x.to(dtype)  # xc: [M, n_in]
    step = tile_rows(w.n_in, tile_elems)
    if step >= w.n_out:
        return (xc @ dequantize_t(w, None, dtype, dequant)).to(torch.float32)
    y = torch.empty((x.shape[0], w.n_out), dtype=torch.float32, device=x.device)  # y: [M, n_out]
    for r0 in range(0, w.n_out, step):
        r1 = min(r0 + step, w.n_out)
        y[:, r0:r1] = xc @ dequantize_t(w, slice(r0, r1), dtype, dequant)  # tile: [n_in, r1 - r0]
    return y


_COMPILED: dict[GGMLType, Dequantizer] = {}


def compiled(qtype: GGMLType) -> Dequantizer:
    """The dequantizer of qtype fused by torch.compile (compiled on first use, shapes dynamic)."""
    fn = _COMPILED.get(qtype)
    if fn is None:
        fn = _COMPILED[qtype] = torch.compile(DEQUANT[qtype], dynamic=True)
    return fn


def random_packed(qtype: GGMLType, n_rows: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic rows u8 [n_rows, row_bytes]: random code bytes, f16 scales drawn from N(0, 0.01)."""
    bs, ts = BLOCK[GGMLType(qtype)]
    nb = n_in // bs
    out = rng.integers(0, 256, size=(n_rows, nb, ts), dtype=np.uint8)
    for f in FIELDS[GGMLType(qtype)]:
        if f.np_dtype in (np.float16, np.float32):
            v = (rng.standard_normal((n_rows, nb, f.size // np.dtype(f.np_dtype).itemsize)) * 0.01)
            out[:, :, f.start:f.start + f.size] = v.astype(f.np_dtype).view(np.uint8)
        elif f.dtype == torch.bfloat16:
            v = (rng.standard_normal((n_rows, nb, 1)) * 0.01).astype(np.float32)
            out[:, :, f.start:f.start + f.size] = (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    if qtype == GGMLType.IQ1_M:  # its f16 scale is the top nibbles of the four u16 scales (bytes 48-55)
        d = (rng.standard_normal((n_rows, nb)) * 0.01).astype(np.float16).view(np.uint16)
        sc = out[:, :, 48:56].copy().view(np.uint16)  # [n_rows, nb, 4]
        for k in range(4):
            sc[:, :, k] = (sc[:, :, k] & 0x0FFF) | (((d >> (4 * k)) & 0xF) << 12)
        out[:, :, 48:56] = sc.view(np.uint8)
    return out.reshape(n_rows, nb * ts)

