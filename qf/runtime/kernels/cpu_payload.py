"""CPU kernels for payload weights (qf.quant.formats): integer-group codes and FP8, straight from the mmap.

Decode is a fused dequant dot product per output row, parallel over rows, in 16-lane vectors
(cpu_payload_simd.py holds the layout decoders). Integer codes: a vector is 16 words; each code position
multiplies the activations laid out to match (xp), products are scaled per lane by their group's scale and
the zero points enter as -s * z times the group sums of x (sum s * (u - z) x = s * sum u x - s * z * sum x),
all in one vector sum. Bit width and words per group are compile-time (PayloadKind). With a group index
(act-order) whose groups each hold `group` inputs (GPTQ's), the inputs are sorted by group at load: the codes
are repacked once in that order (a RAM copy of this weight's codes, the only payload not read from the mmap)
and each token's activations are permuted to match, so the vector kernel runs; any other group index runs a
per-input scalar kernel. FP8 e4m3 bytes are widened exactly to f32 16 at a time by moving their bits into
the f32 fields (e4m3 * 2^-120; the 2^120 is split between the scales and the activations); a channel or
tensor scale multiplies each row's sum, block scales (128x128 or any) multiply the activations once per block
row and token, so every row is one unbroken span. Rows that hold subnormal bytes, which would be f32
subnormals (a microcode assist per vector), decode through f16 instead. The same fused kernel serves a few
tokens and exact rows (each token sums exactly as alone); larger batches decode row tiles to f32 (vector
decode, equal to the reference dequantizer bit for bit) and multiply them with BLAS (numpy). Dispatch is by
scheme name (`PAYLOAD_KERNELS`), the same key as the format registry.
"""

from __future__ import annotations

from typing import Any, Callable

import numba
import numpy as np
from numba import prange

from qf.format.errors import ModelError
from qf.quant.formats.base import scales_f32
from qf.quant.formats.fp8 import E4M3
from qf.runtime.kernels.cpu_payload_simd import (
    E4M3_SCALE, E4M3_WIDE, Fp8Kind, PayloadKind, code16, ld_e4m3, ld_e4m3_n, ld_e4m3_x2,
    ld_e4m3_x2_n, ld_scales, ld_words, ld_words_n, per_word, word_code,
)
from qf.runtime.kernels.cpu_simd import prefetch, vadd, vfma, vload, vmul, vsplat, vstore, vsum, vzero

TILE_VALUES = 1 << 20  # weights decoded per tile of a batched product (4 MiB of f32)


PREFETCH = 2048  # bytes ahead of the ones being decoded (as cpu_drivers)
FASTMATH = {"contract"}  # fuse a*b+c, never reorder sums: a row's result does not depend on the batch
_JIT = dict(fastmath=FASTMATH, cache=True, error_model="numpy")


@numba.njit(**_JIT)
def _int_x(kind, x: np.ndarray, perm: np.ndarray, n_words: int, wp: int, group: int,
           n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(xp, xs) of tokens x [M, n_in], taken in the input order perm when it is not empty (act-order, else as
    they are; xo below): xp[m, k * wp + w] = xo[m, w * per_word + k] (zeros for w >= n_words), xs[m, g] the sum
    of xo[m] over inputs [g * group, (g + 1) * group) (zeros up to n_cols). Serial: a separate function keeps
    numba from making parallel loops (thread launches) of these small ones."""
    pf = per_word(kind)
    n_in = x.shape[1]
    xo = np.empty((x.shape[0], n_in), np.float32)
    for m in range(x.shape[0]):
        if perm.shape[0]:
            for i in range(n_in):
                xo[m, i] = x[m, perm[i]]
        else:
            xo[m] = x[m]
    xp = np.zeros((x.shape[0], pf * wp), np.float32)
    xs = np.zeros((x.shape[0], n_cols), np.float32)
    for m in range(x.shape[0]):
        for w in range(n_words):
            for k in range(pf):
                xp[m, k * wp + w] = xo[m, w * pf + k]
        for g in range(0, n_in // group):
            t = np.float32(0.0)
            for i in range(g * group, (g + 1) * group):
                t += xo[m, i]
            xs[m, g] = t
    return xp, xs


@numba.njit(inline="always", **_JIT)
def _positions(kind, v, xp: np.ndarray, base: int, wp: int):
    """sum_k code_k(v) * xp[base + k * wp + l] per lane l (two chains, even and odd k)."""
    p0 = vzero()
    p1 = vzero()
    for k in range(0, per_word(kind), 2):
        p0 = vfma(word_code(kind, v, k), vload(xp, base + k * wp), p0)
        p1 = vfma(word_code(kind, v, k + 1), vload(xp, base + (k + 1) * wp), p1)
    return vadd(p0, p1)


@numba.njit(inline="always", **_JIT)
def _int_dot(kind, packed: np.ndarray, o: int, wshift: int, scale: np.ndarray, zs: np.ndarray, xp: np.ndarray,
             xs: np.ndarray, m: int, n_groups: int) -> float:
    """Row o of packed . token m: sum_g s_g * (sum_{i in g} u_i x_i) + zs_g * xs_g (zs = -s * z), in one vector.

    Whole arrays and flat offsets rather than row views (a view per row costs reference-count calls)."""
    n_words = packed.shape[1]
    cols = scale.shape[1]
    wp = xp.shape[1] // per_word(kind)
    row, srow, xrow = o * n_words, o * cols, m * xp.shape[1]
    full = n_words // 16 * 16
    acc = vzero()
    for w in range(0, full, 16):
        prefetch(packed, 4 * (row + w) + PREFETCH)
        p = _positions(kind, ld_words(packed, row + w), xp, xrow + w, wp)
        acc = vfma(p, ld_scales(kind, scale, srow + (w >> wshift)), acc)
    if full < n_words:
        p = _positions(kind, ld_words_n(packed, row + full, n_words - full), xp, xrow + full, wp)
        acc = vfma(p, ld_scales(kind, scale, srow + (full >> wshift)), acc)
    for g in range(0, n_groups, 16):
        acc = vfma(vload(zs, srow + g), vload(xs, m * cols + g), acc)
    return vsum(acc)


@numba.njit(parallel=True, **_JIT)
def _int_matmul(kind, packed: np.ndarray, wshift: int, group: int, scale: np.ndarray, zs: np.ndarray, n_groups: int,
                perm: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[m, o] = row o . x[m] for a packed u32 [O, W] matrix; groups of 2^wshift words (wshift 62: one group)
    and `group` inputs; scale, zs: [O, >= round16(n_groups) + 16] (zs: -zc * s for symmetric codes, -s * z
    else); every token's sum is the one it gets alone."""
    n_words = packed.shape[1]
    wp = (n_words + 15) // 16 * 16
    xps, xss = _int_x(kind, x, perm, n_words, wp, group, scale.shape[1])
    for o in prange(packed.shape[0]):
        for m in range(x.shape[0]):
            out[m, o] = _int_dot(kind, packed, o, wshift, scale, zs, xps, xss, m, n_groups)


@numba.njit(parallel=True, **_JIT)
def _int_rows_vec(kind, packed8: np.ndarray, group: int, scale: np.ndarray, zero: np.ndarray, zc: float, r0: int,
                  out: np.ndarray) -> None:
    """Rows r0 .. of the codes (as bytes [O, W * 4]) decoded to f32 out: s * (u - z), 16 codes at a time
    (group a multiple of 16 codes, or one group)."""
    n_in = out.shape[1]
    has_zero = zero.shape[0] > 0
    bits = 32 // per_word(kind)
    for r in prange(out.shape[0]):
        o = r0 + r
        row, dst = packed8[o], out[r]
        for c in range(0, n_in // 16 * 16, 16):
            g = c // group
            z = zero[o, g] if has_zero else np.float32(zc)
            vstore(dst, c, vmul(vadd(code16(kind, row, c * bits // 8), vsplat(-z)), vsplat(scale[o, g])))
        for i in range(n_in // 16 * 16, n_in):
            g = i // group
            z = zero[o, g] if has_zero else np.float32(zc)
            u = (row[i * bits // 8] >> ((i * bits) % 8)) & ((1 << bits) - 1)
            dst[i] = scale[o, g] * (np.float32(u) - z)


@numba.njit(parallel=True, cache=True)
def _repack(packed: np.ndarray, bits: int, perm: np.ndarray, out: np.ndarray) -> None:
    """out[o] = the codes of packed[o] in input order perm (code j of out = code perm[j] of packed); both u32
    [O, W], out zeroed."""
    pf = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    for o in prange(packed.shape[0]):
        for j in range(perm.shape[0]):
            i = perm[j]
            c = (packed[o, i // pf] >> np.uint32(i % pf * bits)) & mask
            out[o, j // pf] |= c << np.uint32(j % pf * bits)


def sorted_by_group(gidx: np.ndarray, group: int, n_groups: int) -> np.ndarray | None:
    """The stable order of inputs by group when it makes every group `group` consecutive inputs (as GPTQ's
    act-order g_idx does), else None."""
    if gidx.size % group or gidx.size // group != n_groups or gidx.min() < 0:
        return None
    if not np.array_equal(np.bincount(gidx, minlength=n_groups), np.full(n_groups, group)):
        return None
    return np.argsort(gidx, kind="stable")


@numba.njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _int_matvec_gidx(packed: np.ndarray, bits: int, gidx: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                     zc: float, x: np.ndarray, out: np.ndarray) -> None:
    """out[o] = sum_i scale[o, g_idx[i]] * (u[o,i] - z[o, g_idx[i]]) * x[i] (act-order groups)."""
    pf = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    has_zero = zero.shape[0] > 0
    n_in = gidx.shape[0]
    for o in prange(packed.shape[0]):
        acc = np.float32(0.0)
        for w in range(packed.shape[1]):
            word = packed[o, w]
            for k in range(pf):
                i = w * pf + k
                if i < n_in:
                    g = gidx[i]
                    z = np.float32(zero[o, g]) if has_zero else np.float32(zc)
                    acc += scale[o, g] * (np.float32((word >> np.uint32(k * bits)) & mask) - z) * x[i]
        out[o] = acc


@numba.njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _int_rows(packed: np.ndarray, bits: int, gidx: np.ndarray, scale: np.ndarray, zero: np.ndarray, zc: float,
              r0: int, out: np.ndarray) -> None:
    """Rows r0 .. r0 + out.shape[0] decoded to f32 out [rows, n_in] (gidx: the group of every input)."""
    pf = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    has_zero = zero.shape[0] > 0
    n_in = out.shape[1]
    for r in prange(out.shape[0]):
        o = r0 + r
        for w in range(packed.shape[1]):
            word = packed[o, w]
            for k in range(pf):
                i = w * pf + k
                if i < n_in:
                    g = gidx[i]
                    z = np.float32(zero[o, g]) if has_zero else np.float32(zc)
                    out[r, i] = scale[o, g] * (np.float32((word >> np.uint32(k * bits)) & mask) - z)


@numba.njit(inline="always", **_JIT)
def _fp8_span(kind, vals: np.ndarray, r: int, xw: np.ndarray, xr: int, n: int):
    """sum_i e4m3(vals[r + i]) * 2^-120 * xw[xr + i] over i < n as a vector (flat offsets; two chains, a cache
    line of bytes per step). The masked tail reads xw up to 15 values past n: xw has 32 zero columns."""
    p0 = vzero()
    p1 = vzero()
    i = 0
    while i + 64 <= n:
        prefetch(vals, r + i + PREFETCH)
        p0 = vfma(ld_e4m3(kind, vals, r + i), vload(xw, xr + i), p0)
        p1 = vfma(ld_e4m3(kind, vals, r + i + 16), vload(xw, xr + i + 16), p1)
        p0 = vfma(ld_e4m3(kind, vals, r + i + 32), vload(xw, xr + i + 32), p0)
        p1 = vfma(ld_e4m3(kind, vals, r + i + 48), vload(xw, xr + i + 48), p1)
        i += 64
    while i + 16 <= n:
        p0 = vfma(ld_e4m3(kind, vals, r + i), vload(xw, xr + i), p0)
        i += 16
    if i < n:
        p1 = vfma(ld_e4m3_n(kind, vals, r + i, n - i), vload(xw, xr + i), p1)
    return vadd(p0, p1)


@numba.njit(inline="always", **_JIT)
def _fp8_span16(kind, vals: np.ndarray, r: int, xw: np.ndarray, xr: int, n: int):
    """As _fp8_span through the f16 decode (e4m3(b) / 256, 64 bytes a step), for rows holding subnormal
    bytes (as f32 they would be subnormal inputs, a microcode assist per vector); the sum times 2^-112 has
    _fp8_span's scale. The masked tail reads xw up to 31 values past n: xw has 32 zero columns."""
    p0 = vzero()
    p1 = vzero()
    i = 0
    while i + 64 <= n:
        prefetch(vals, r + i + PREFETCH)
        v0, v1 = ld_e4m3_x2(kind, vals, r + i)
        v2, v3 = ld_e4m3_x2(kind, vals, r + i + 32)
        p0 = vfma(v0, vload(xw, xr + i), p0)
        p1 = vfma(v1, vload(xw, xr + i + 16), p1)
        p0 = vfma(v2, vload(xw, xr + i + 32), p0)
        p1 = vfma(v3, vload(xw, xr + i + 48), p1)
        i += 64
    if i + 32 <= n:
        v0, v1 = ld_e4m3_x2(kind, vals, r + i)
        p0 = vfma(v0, vload(xw, xr + i), p0)
        p1 = vfma(v1, vload(xw, xr + i + 16), p1)
        i += 32
    if i < n:
        v0, v1 = ld_e4m3_x2_n(kind, vals, r + i, n - i)
        p0 = vfma(v0, vload(xw, xr + i), p0)
        p1 = vfma(v1, vload(xw, xr + i + 16), p1)
    return vmul(vadd(p0, p1), vsplat(np.float32(E4M3_SCALE / E4M3_WIDE ** 2)))


@numba.njit(**_JIT)
def _fp8_x(x: np.ndarray, xscale: np.ndarray) -> np.ndarray:
    """xw [M, R, n_in + 32]: x[m, i] * xscale[r, i], then 32 zero columns (serial, see _int_x)."""
    n_in = x.shape[1]
    xw = np.empty((x.shape[0], xscale.shape[0], n_in + 32), np.float32)
    for m in range(x.shape[0]):
        xm = x[m]
        for r in range(xscale.shape[0]):
            dst, sr = xw[m, r], xscale[r]
            for i in range(n_in):
                dst[i] = xm[i] * sr[i]
            dst[n_in:] = 0.0
    return xw


@numba.njit(parallel=True, **_JIT)
def _fp8_matmul(kind, vals: np.ndarray, sub: np.ndarray, rscale: np.ndarray, xscale: np.ndarray, bh: int,
                x: np.ndarray, out: np.ndarray) -> None:
    """out[m, o] = rscale[o] * sum_i e4m3(vals[o, i]) 2^-120 x[m, i] xscale[o // bh, i] (one xscale row: all
    rows share it). Channel and tensor scales are rscale (times 2^60, xscale 2^60); block scales go into the
    activations, once per block row and token (xscale = s[o // bh, i // bw] 2^60, rscale 2^60), so every row
    is one span. sub[o]: row o holds subnormal bytes (the f16 decode). Every token's sum is the one it gets
    alone."""
    xw = _fp8_x(x, xscale)
    n_in, n_r = vals.shape[1], xscale.shape[0]
    per = xw.shape[2]
    for o in prange(vals.shape[0]):
        rb = o // bh if n_r > 1 else 0
        f, so = rscale[o], sub[o]
        for m in range(x.shape[0]):
            xr = (m * n_r + rb) * per
            if so:
                p = _fp8_span16(kind, vals, o * n_in, xw, xr, n_in)
            else:
                p = _fp8_span(kind, vals, o * n_in, xw, xr, n_in)
            out[m, o] = vsum(p) * f


@numba.njit(parallel=True, **_JIT)
def _fp8_rows(kind, vals: np.ndarray, table: np.ndarray, scale: np.ndarray, bh: int, bw: int, r0: int,
              out: np.ndarray) -> None:
    """Rows r0 .. r0 + out.shape[0] decoded to f32 out [rows, n_in] (scale: times 256; table: e4m3 / 256)."""
    n_in = out.shape[1]
    n_vec = n_in // 32 * 32 if bw % 16 == 0 else 0  # 16 lanes never straddle a scale block
    for r in prange(out.shape[0]):
        o = r0 + r
        srow, row, dst = scale[o // bh], vals[o], out[r]
        for i in range(0, n_vec, 32):
            v0, v1 = ld_e4m3_x2(kind, row, i)
            vstore(dst, i, vmul(v0, vsplat(srow[i // bw])))
            vstore(dst, i + 16, vmul(v1, vsplat(srow[(i + 16) // bw])))
        for i in range(n_vec, n_in):
            dst[i] = table[row[i]] * srow[i // bw]


@numba.njit(parallel=True, cache=True)
def _fp8_scan(vals: np.ndarray, sub: np.ndarray) -> bool:
    """Whether any byte of vals [O, n_in] is an e4m3fn NaN pattern (S.1111.111); sub[o] = whether row o holds a
    subnormal (S.0000.mmm, m > 0). One pass over the mmap."""
    n = 0
    for o in prange(vals.shape[0]):
        c = 0
        d = 0
        for i in range(vals.shape[1]):
            b = vals[o, i]
            c += (b & 0x7F) == 0x7F
            d += ((b & 0x78) == 0) & ((b & 0x07) != 0)
        sub[o] = d > 0
        n += c
    return n > 0


FUSED_MAX_TOKENS = 4  # batches up to this size run the fused kernel (decode of a few sequences), larger ones BLAS


class PayloadMatrix:
    """A placed payload weight: fused decode for a token or a few (each bit for bit as alone), tiles + BLAS
    for larger batches."""

    n_in: int
    n_out: int
    name: str

    def fused(self, x: np.ndarray) -> np.ndarray:
        """x [M, n_in] f32 contiguous -> [M, n_out] by the fused kernel (each row as it would be alone)."""
        raise NotImplementedError

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) as f32 [r1 - r0, n_in]."""
        raise NotImplementedError

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """[n_in] -> [n_out]."""
        return self.fused(np.ascontiguousarray(x, dtype=np.float32).reshape(1, -1))[0]

    def dequantize(self) -> np.ndarray:
        """The whole weight as f32 [n_out, n_in]."""
        return self.rows(0, self.n_out)

    def linear(self, x: np.ndarray, exact_rows: bool = False) -> np.ndarray:
        """x [M, n_in] @ W.T -> [M, n_out]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] <= FUSED_MAX_TOKENS or exact_rows:
            return self.fused(x) if x.shape[0] else np.empty((0, self.n_out), np.float32)
        y = np.empty((x.shape[0], self.n_out), np.float32)
        step = max(1, TILE_VALUES // max(1, self.n_in))
        for r0 in range(0, self.n_out, step):
            r1 = min(self.n_out, r0 + step)
            np.matmul(x, self.rows(r0, r1).T, out=y[:, r0:r1])
        return y


def _padded(a: np.ndarray, cols: int) -> np.ndarray:
    """a [rows, c] f32 with zero columns appended up to cols."""
    out = np.zeros((a.shape[0], cols), np.float32)
    out[:, :a.shape[1]] = a
    return out


def _scale_lanes(group: int, bits: int, n_words: int) -> int:
    """Words per scale group as seen by a 16-word vector (16: one group per vector), 0 when the vector kernel
    cannot express the grouping."""
    wpg = n_words if group <= 0 else group * bits // 32
    if group > 0 and wpg & (wpg - 1):  # the group of a word is a shift
        return 0
    return min(wpg, 16)


class IntGroupMatrix(PayloadMatrix):
    """Scheme `int`: codes stay in the mmap; scales (and zero points) as f32 [n_out, groups]."""

    def __init__(self, ref: Any) -> None:
        p, a = ref.decl.params, ref.arrays
        self.name, self.n_in, self.n_out, self.bits = ref.name, ref.n_in, ref.n_out, p.bits
        self.packed = np.ascontiguousarray(a["weight_packed"].view(np.uint32))
        self.scale = np.ascontiguousarray(scales_f32(a["weight_scale"]))
        self.zero = (np.ascontiguousarray(a["weight_zero"], dtype=np.float32) if "weight_zero" in a
                     else np.zeros((0, 0), np.float32))
        self.zc = float(1 << (p.bits - 1))
        self.gidx_given = "weight_g_idx" in a
        self.gidx = np.ascontiguousarray(p.group_of(self.n_in, a.get("weight_g_idx")), dtype=np.int64)
        self.group = self.n_in if p.group <= 0 else p.group
        n_words = self.packed.shape[1]
        self.perm = None  # act-order: inputs sorted by group, codes repacked in that order at load
        self.xperm = np.zeros(0, np.int64)  # the same order for the fused kernel (empty: the file's order)
        if self.gidx_given and p.group > 0 and self.n_in == n_words * (32 // p.bits):
            self.perm = sorted_by_group(self.gidx, self.group, self.scale.shape[1])
            if self.perm is not None:
                codes = np.zeros_like(self.packed)
                _repack(self.packed, p.bits, self.perm, codes)
                self.packed, self.gidx_given = codes, False
                self.gidx = np.arange(self.n_in, dtype=np.int64) // self.group
                self.xperm = self.perm.astype(np.int64)
        lanes = 0 if self.gidx_given else _scale_lanes(p.group, p.bits, n_words)
        self.kind = PayloadKind(p.bits, lanes) if lanes else None
        self.row_kind = PayloadKind(p.bits, 16) if not self.gidx_given and self.group % 16 == 0 else None
        if self.kind is not None:
            self.wshift = 62 if p.group <= 0 else (self.group * p.bits // 32).bit_length() - 1
            cols = -(-self.scale.shape[1] // 16) * 16 + 16
            self.scale_pad = _padded(self.scale, cols)
            self.zs_pad = _padded(-self.scale * (self.zero if self.zero.size else np.float32(self.zc)), cols)

    def fused(self, x: np.ndarray) -> np.ndarray:
        """Fused decode, 16 words per vector (or per input with a group index)."""
        out = np.empty((x.shape[0], self.n_out), np.float32)
        if self.kind is None:
            for m in range(x.shape[0]):
                _int_matvec_gidx(self.packed, self.bits, self.gidx, self.scale, self.zero, self.zc, x[m], out[m])
        else:
            _int_matmul(self.kind, self.packed, self.wshift, self.group, self.scale_pad, self.zs_pad,
                        self.scale.shape[1], self.xperm, x, out)
        return out

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows decoded to f32."""
        out = np.empty((r1 - r0, self.n_in), np.float32)
        if self.row_kind is None:
            _int_rows(self.packed, self.bits, self.gidx, self.scale, self.zero, self.zc, r0, out)
        else:
            _int_rows_vec(self.row_kind, self.packed.view(np.uint8), self.group, self.scale, self.zero, self.zc,
                          r0, out)
        if self.perm is not None:  # back to the file's input order
            back = np.empty_like(out)
            back[:, self.perm] = out
            return back
        return out


class Fp8Matrix(PayloadMatrix):
    """Scheme `fp8`: e4m3 bytes stay in the mmap; scales as f32 [row blocks, column blocks] (times 256, the
    factor the vector decode leaves out)."""

    def __init__(self, ref: Any) -> None:
        p, a = ref.decl.params, ref.arrays
        self.name, self.n_in, self.n_out = ref.name, ref.n_in, ref.n_out
        self.vals = np.ascontiguousarray(a["weight_fp8"].view(np.uint8))
        self.bh, self.bw = p.block(self.n_in, self.n_out)
        shape = (-(-self.n_out // self.bh), -(-self.n_in // self.bw))
        s = np.ascontiguousarray(scales_f32(a["weight_scale"]).reshape(shape))
        self.scale = s * np.float32(E4M3_SCALE)
        self.table = E4M3 / np.float32(E4M3_SCALE)
        wide = np.float32(E4M3_WIDE)
        if self.bw >= self.n_in:  # one scale per row (channel) or per file (tensor): applied to each row's sum
            self.rscale = np.ascontiguousarray(np.repeat(s[:, 0] * wide, self.bh)[:self.n_out])
            self.xscale = np.full((1, self.n_in), wide, np.float32)
        else:  # blocks: the scales go into the activations of each block row
            self.rscale = np.full(self.n_out, wide, np.float32)
            self.xscale = np.ascontiguousarray(np.repeat(s * wide, self.bw, axis=1)[:, :self.n_in])
        self.sub = np.zeros(self.n_out, np.bool_)  # rows with subnormal bytes take the f16 decode
        self.kind = Fp8Kind(_fp8_scan(self.vals, self.sub))

    def fused(self, x: np.ndarray) -> np.ndarray:
        """Fused decode, 64 bytes per step."""
        out = np.empty((x.shape[0], self.n_out), np.float32)
        _fp8_matmul(self.kind, self.vals, self.sub, self.rscale, self.xscale, self.bh, x, out)
        return out

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows decoded to f32."""
        out = np.empty((r1 - r0, self.n_in), np.float32)
        _fp8_rows(self.kind, self.vals, self.table, self.scale, self.bh, self.bw, r0, out)
        return out


# scheme name -> placed matrix (the CPU backend's kernel for each payload format)
PAYLOAD_KERNELS: dict[str, Callable[[Any], PayloadMatrix]] = {"int": IntGroupMatrix, "fp8": Fp8Matrix}


def payload_matrix(ref: Any) -> PayloadMatrix:
    """The CPU matrix of a payload weight (qf.runtime.weights.PayloadRef); ModelError when no kernel exists."""
    make = PAYLOAD_KERNELS.get(ref.scheme.split(";", 1)[0])
    if make is None:
        raise ModelError(f"tensor {ref.name!r} ({ref.scheme}): no CPU kernel for this payload scheme "
                         f"(have: {', '.join(sorted(PAYLOAD_KERNELS))})")
    return make(ref)
