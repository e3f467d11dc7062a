"""Rounding grids for GPTQ (qf.quant.gptq): integer groups (the `int` payload of qf.quant.formats.intgroup) and
ggml blocks (a ggml codec chooses each block's scales, GPTQ then picks the codes column by column).

A grid is fitted one group of columns at a time (`fit`), rounds single columns onto the fitted parameters
(`round`), and records what it chose, from which the stored form is made (`payload` / `tensor`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from qf.format.ggml_types import GGMLType
from qf.quant.codecs import get_codec, get_layout
from qf.quant.formats.intgroup import pack_codes

F16_TINY = np.float32(2.0 ** -24)  # the smallest positive fp16 value: scales are never 0
SHRINK_STEP = 0.01  # IntGrid's range search: candidate ranges 1, 0.99, 0.98, ... of the group's own


@njit(cache=True, parallel=True, error_model="numpy")
def _shrink_search(w, imp, lo, hi, maxq, sym, steps, step):  # pragma: no cover - compiled
    """Per row of w f32 [rows, g], the factor p in {1, 1 - step, ..., 1 - (steps - 1) step} whose range
    [p lo, p hi] (sym: +-p amax) gives the least importance-weighted squared rounding error; f32 [rows]."""
    rows, g = w.shape
    best = np.ones(rows, np.float32)
    for r in prange(rows):
        err_best = np.inf
        for k in range(steps):
            pk = 1.0 - k * step
            l, h = pk * lo[r], pk * hi[r]
            s = (h - l) / maxq
            if s <= 0.0:
                break
            z = maxq // 2 + 1 if sym else min(max(np.rint(-l / s), 0.0), maxq)
            e = 0.0
            for j in range(g):
                q = min(max(np.rint(w[r, j] / s) + z, 0.0), maxq)
                d = s * (q - z) - w[r, j]
                e += imp[j] * d * d
            if e < err_best:
                err_best, best[r] = e, pk
    return best


def _f16_scale(s: np.ndarray) -> np.ndarray:
    """Positive scales rounded to fp16 values (so that they are stored exactly), f32."""
    s16 = np.asarray(s, np.float32).astype(np.float16).astype(np.float32)
    return np.where(np.isfinite(s16) & (s16 > 0), s16, np.where(np.isfinite(s16), F16_TINY, np.float32(65504.0)))


class IntGrid:
    """b-bit integer groups: W = scale * (code - zero); sym: zero = 2^(b-1), scale = 2 amax / (2^b - 1) (GPTQ's
    and compressed-tensors' choice); asym: the range [min(w, 0), max(w, 0)] over 2^b - 1 steps. Scales fp16.
    shrink > 0: each (row, group) range is first narrowed by the factor among 1, 0.99, ..., 1 - (shrink - 1)/100
    with the least importance-weighted rounding error (GPTQModel's `mse` search, weighted by diag(H))."""

    def __init__(self, rows: int, n_in: int, bits: int, group: int, sym: bool, shrink: int = 0) -> None:
        self.bits, self.group, self.sym, self.shrink = bits, group, sym, shrink
        self.maxq = (1 << bits) - 1
        self.lo, self.hi = 0, self.maxq
        n_groups = 1 if group <= 0 else -(-n_in // group)
        self.codes = np.zeros((rows, n_in), np.uint8)
        self.scale = np.ones((rows, n_groups), np.float32)
        self.zero = np.full((rows, n_groups), 1 << (bits - 1), np.int32)
        self.g_idx = np.zeros(n_in, np.int64)
        self._next = 0

    def fit(self, w: np.ndarray, cols: np.ndarray, importance: np.ndarray) -> None:
        """Scale and zero point per row for the next group, made of columns cols; w f32 [rows, len(cols)]."""
        gid = self._next % self.scale.shape[1]
        self._next += 1
        if self.sym:
            hi = np.abs(w).max(axis=1)
            lo = -hi
        else:
            lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
        if self.shrink > 0:
            p = _shrink_search(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(importance, np.float32),
                               lo.astype(np.float32), hi.astype(np.float32), float(self.maxq), self.sym,
                               self.shrink, SHRINK_STEP)
            lo, hi = lo * p, hi * p
        if self.sym:
            s = _f16_scale(2.0 * hi / self.maxq)
            z = np.full(w.shape[0], 1 << (self.bits - 1), np.int32)
        else:
            s = _f16_scale((hi - lo) / self.maxq)
            z = np.clip(np.rint(-lo / s), 0, self.maxq).astype(np.int32)
        self.scale[:, gid], self.zero[:, gid] = s, z
        self.g_idx[cols] = gid

    def params(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """value = a * code + b: a = scale, b = -scale * zero of each column's group; keep = zero (unused)."""
        gid = self.g_idx[cols]
        s, z = self.scale[:, gid], self.zero[:, gid]
        return s, -s * z, z

    def record(self, cols: np.ndarray, codes: np.ndarray) -> None:
        """Codes of columns cols."""
        self.codes[:, cols] = codes

    def values(self) -> np.ndarray:
        """scale * (code - zero), f32 [rows, n_in]."""
        return self.dequantize()

    @property
    def has_g_idx(self) -> bool:
        """Whether the groups are not the contiguous i // group (act-order without static groups)."""
        n = self.g_idx.size
        plain = np.zeros(n, np.int64) if self.group <= 0 else np.arange(n) // self.group
        return not np.array_equal(self.g_idx, plain)

    def payload(self, with_g_idx: bool) -> dict[str, np.ndarray]:
        """Members of the `int` payload in numpy layout: weight_packed, weight_scale (f16), weight_zero, g_idx."""
        out = {"weight_packed": pack_codes(self.codes, self.bits),
               "weight_scale": self.scale.astype(np.float16)}
        if not self.sym:
            out["weight_zero"] = self.zero.astype(np.int16)
        if with_g_idx:
            out["weight_g_idx"] = self.g_idx.astype(np.int32)
        return out

    def dequantize(self) -> np.ndarray:
        """The recorded codes as weights, f32 [rows, n_in]."""
        return (self.scale[:, self.g_idx] * (self.codes.astype(np.float32) - self.zero[:, self.g_idx])
                ).astype(np.float32)


# code range per ggml type in the layout's code field (Q8_0: int8 values, stored as their u8 bits)
CODE_RANGE: dict[GGMLType, tuple[int, int]] = {
    GGMLType.Q4_0: (0, 15), GGMLType.Q4_1: (0, 15), GGMLType.Q5_0: (0, 31), GGMLType.Q5_1: (0, 31),
    GGMLType.Q8_0: (-127, 127), GGMLType.Q2_K: (0, 3), GGMLType.Q3_K: (0, 7), GGMLType.Q4_K: (0, 15),
    GGMLType.Q5_K: (0, 31), GGMLType.Q6_K: (0, 63),
}


def _code_field(fields: tuple) -> str:
    """Name of the per-value code array in a layout's fields (legacy: codes, K-quants: L)."""
    return "codes" if "codes" in fields._fields else "L"


@dataclass
class _Block:
    """One fitted block column range: its fields (scales), the affine map per value x = a * code + b, codes."""

    fields: tuple
    a: np.ndarray  # f32 [rows, block]
    b: np.ndarray  # f32 [rows, block]
    codes: np.ndarray  # int32 [rows, block], signed for Q8_0


class GgmlGrid:
    """A ggml block type as a GPTQ grid: at each block's first column the type's own quantizer (ggml's search,
    weighted by importance = diag(H)) chooses the block's scales and mins from the current weights; GPTQ then
    picks every code with those fixed. The result packs into ordinary blocks of the type."""

    def __init__(self, qtype: GGMLType, rows: int, n_in: int) -> None:
        self.qtype = GGMLType(qtype)
        if self.qtype not in CODE_RANGE:
            raise ValueError(f"GPTQ has no grid for {self.qtype.name}")
        self.codec, self.layout = get_codec(self.qtype), get_layout(self.qtype)
        self.group = self.codec.block_size
        if n_in % self.group:
            raise ValueError(f"rows of {n_in} are not whole {self.qtype.name} blocks of {self.group}")
        self.lo, self.hi = CODE_RANGE[self.qtype]
        self.rows = rows
        self.blocks: dict[int, _Block] = {}

    def _as_stored(self, codes: np.ndarray) -> np.ndarray:
        """Codes as the layout stores them (u8; int8 bits for Q8_0)."""
        return codes.astype(np.int8).view(np.uint8) if self.lo < 0 else codes.astype(np.uint8)

    def _with_codes(self, fields: tuple, codes: np.ndarray) -> tuple:
        """Fields with their code array replaced."""
        return fields._replace(**{_code_field(fields): self._as_stored(codes)})

    def fit(self, w: np.ndarray, cols: np.ndarray, importance: np.ndarray) -> None:
        """Scales of the block of columns cols (contiguous, block-aligned) from w f32 [rows, block]."""
        c0 = int(cols[0])
        fields = self.layout.unpack(self.codec.quantize(np.ascontiguousarray(w, np.float32), importance))
        shape = (self.rows, self.group)
        zeros = np.zeros(shape, np.int32)
        b = self.layout.dequantize_blocks(self.layout.pack(self._with_codes(fields, zeros)))
        a = self.layout.dequantize_blocks(self.layout.pack(self._with_codes(fields, zeros + 1))) - b
        orig = getattr(fields, _code_field(fields)).astype(np.int32)
        if self.lo < 0:
            orig = orig.astype(np.uint8).view(np.int8).astype(np.int32)
        self.blocks[c0] = _Block(fields, a, b, orig)

    def params(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fitted blocks' affine maps and the quantizer's own codes (used where a block's scale is 0)."""
        starts = cols - cols % self.group
        out = [(self.blocks[int(c0)].a[:, c - c0], self.blocks[int(c0)].b[:, c - c0], self.blocks[int(c0)].codes[:, c - c0])
               for c0, c in ((int(c0), cols[starts == c0]) for c0 in dict.fromkeys(starts.tolist()))]
        return tuple(np.concatenate(parts, axis=1) for parts in zip(*out))  # type: ignore[return-value]

    def record(self, cols: np.ndarray, codes: np.ndarray) -> None:
        """Codes of columns cols."""
        starts = cols - cols % self.group
        for c0 in dict.fromkeys(starts.tolist()):
            sel = starts == c0
            self.blocks[c0].codes[:, cols[sel] - c0] = codes[:, sel]

    def values(self) -> np.ndarray:
        """The packed blocks dequantized by the type's layout, f32 [rows, n_in]."""
        return self.codec.dequantize(self.tensor()).reshape(self.rows, -1)

    def tensor(self) -> np.ndarray:
        """The weight as rows of the type: u8 [rows, n_in / block * type_size]."""
        parts = [self.layout.pack(self._with_codes(self.blocks[c0].fields, self.blocks[c0].codes))
                 for c0 in sorted(self.blocks)]
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
