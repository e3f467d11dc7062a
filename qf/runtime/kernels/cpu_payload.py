"""CPU kernels for payload weights (qf.quant.formats): integer-group codes and FP8, straight from the mmap.

Decode (one row) is a fused dequant matvec, parallel over output rows: integer codes are summed per group
against the activations and scaled once per group (sum s * (u - z) x = s * (sum u x - z * sum x), the group
sums of x computed once per call); with a group index each input is scaled by its own group. FP8 values go
through a 256-entry table and are scaled once per scale block. A batch decodes tiles of rows to f32 and
multiplies them with BLAS (numpy), or runs the fused kernel row by row when each row must equal its result
alone (exact_rows). Dispatch is by scheme name (`PAYLOAD_KERNELS`), the same key as the format registry.
"""

from __future__ import annotations

from typing import Any, Callable

import numba
import numpy as np
from numba import prange

from qf.format.errors import ModelError
from qf.quant.formats.base import scales_f32
from qf.quant.formats.fp8 import E4M3

TILE_VALUES = 1 << 20  # weights decoded per tile of a batched product (4 MiB of f32)


@numba.njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _int_matvec(packed: np.ndarray, bits: int, group: int, scale: np.ndarray, zero: np.ndarray, zc: float,
                xp: np.ndarray, xsum: np.ndarray, out: np.ndarray) -> None:
    """out[o] = sum_g scale[o,g] * (sum_{i in g} u[o,i] x[i] - z[o,g] * xsum[g]); packed uint32 [O, W]; xp: x as
    [32 / bits, W] (xp[k, w] = x[w * 32 / bits + k]) so that each code position k runs over whole rows of words
    (vectorized), per-word products summed per group after."""
    pf = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    wpg = group // pf
    n_groups = scale.shape[1]
    n_words = packed.shape[1]
    has_zero = zero.shape[0] > 0
    for o in prange(packed.shape[0]):
        row = packed[o]
        prod = np.zeros(n_words, np.float32)
        for k in range(pf):
            sh = np.uint32(k * bits)
            xk = xp[k]
            for w in range(n_words):
                prod[w] += np.float32((row[w] >> sh) & mask) * xk[w]
        acc = np.float32(0.0)
        for g in range(n_groups):
            dot = np.float32(0.0)
            for w in range(g * wpg, (g + 1) * wpg):
                dot += prod[w]
            z = np.float32(zero[o, g]) if has_zero else np.float32(zc)
            acc += scale[o, g] * (dot - z * xsum[g])
        out[o] = acc


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


@numba.njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _fp8_matvec(vals: np.ndarray, table: np.ndarray, scale: np.ndarray, bh: int, bw: int, x: np.ndarray,
                out: np.ndarray) -> None:
    """out[o] = sum_c scale[o // bh, c] * sum_{i in block c} e4m3(vals[o, i]) x[i]."""
    n_in = vals.shape[1]
    for o in prange(vals.shape[0]):
        sr = o // bh
        acc = np.float32(0.0)
        for c in range(scale.shape[1]):
            part = np.float32(0.0)
            for i in range(c * bw, min(n_in, (c + 1) * bw)):
                part += table[vals[o, i]] * x[i]
            acc += scale[sr, c] * part
        out[o] = acc


@numba.njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _fp8_rows(vals: np.ndarray, table: np.ndarray, scale: np.ndarray, bh: int, bw: int, r0: int,
              out: np.ndarray) -> None:
    """Rows r0 .. r0 + out.shape[0] decoded to f32 out [rows, n_in]."""
    for r in prange(out.shape[0]):
        o = r0 + r
        sr = o // bh
        for i in range(out.shape[1]):
            out[r, i] = table[vals[o, i]] * scale[sr, i // bw]


class PayloadMatrix:
    """A placed payload weight: matvec for decode, tiles + BLAS for batches."""

    n_in: int
    n_out: int
    name: str

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """[n_in] -> [n_out]."""
        raise NotImplementedError

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) as f32 [r1 - r0, n_in]."""
        raise NotImplementedError

    def dequantize(self) -> np.ndarray:
        """The whole weight as f32 [n_out, n_in]."""
        return self.rows(0, self.n_out)

    def linear(self, x: np.ndarray, exact_rows: bool = False) -> np.ndarray:
        """x [M, n_in] @ W.T -> [M, n_out]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] == 1 or exact_rows:
            return np.stack([self.matvec(row) for row in x]) if x.shape[0] else np.empty((0, self.n_out), np.float32)
        y = np.empty((x.shape[0], self.n_out), np.float32)
        step = max(1, TILE_VALUES // max(1, self.n_in))
        for r0 in range(0, self.n_out, step):
            r1 = min(self.n_out, r0 + step)
            np.matmul(x, self.rows(r0, r1).T, out=y[:, r0:r1])
        return y


class IntGroupMatrix(PayloadMatrix):
    """Scheme `int`: codes stay in the mmap; scales (and zero points) as f32 [n_out, groups]."""

    def __init__(self, ref: Any) -> None:
        p, a = ref.decl.params, ref.arrays
        self.name, self.n_in, self.n_out, self.bits = ref.name, ref.n_in, ref.n_out, p.bits
        self.packed = a["weight_packed"].view(np.uint32)
        self.scale = np.ascontiguousarray(scales_f32(a["weight_scale"]))
        self.zero = (np.ascontiguousarray(a["weight_zero"], dtype=np.float32) if "weight_zero" in a
                     else np.zeros((0, 0), np.float32))
        self.zc = float(1 << (p.bits - 1))
        self.gidx_given = "weight_g_idx" in a
        self.gidx = np.ascontiguousarray(p.group_of(self.n_in, a.get("weight_g_idx")), dtype=np.int64)
        self.group = self.n_in if p.group <= 0 else p.group

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """Fused decode."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(self.n_out, np.float32)
        if self.gidx_given:
            _int_matvec_gidx(self.packed, self.bits, self.gidx, self.scale, self.zero, self.zc, x, out)
        else:
            xsum = x.reshape(-1, self.group).sum(axis=1, dtype=np.float32)
            xp = np.ascontiguousarray(x.reshape(-1, 32 // self.bits).T)
            _int_matvec(self.packed, self.bits, self.group, self.scale, self.zero, self.zc, xp, xsum, out)
        return out

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows decoded to f32."""
        out = np.empty((r1 - r0, self.n_in), np.float32)
        _int_rows(self.packed, self.bits, self.gidx, self.scale, self.zero, self.zc, r0, out)
        return out


class Fp8Matrix(PayloadMatrix):
    """Scheme `fp8`: e4m3 bytes stay in the mmap; scales as f32 [row blocks, column blocks]."""

    def __init__(self, ref: Any) -> None:
        p, a = ref.decl.params, ref.arrays
        self.name, self.n_in, self.n_out = ref.name, ref.n_in, ref.n_out
        self.vals = a["weight_fp8"].view(np.uint8)
        self.bh, self.bw = p.block(self.n_in, self.n_out)
        shape = (-(-self.n_out // self.bh), -(-self.n_in // self.bw))
        self.scale = np.ascontiguousarray(scales_f32(a["weight_scale"]).reshape(shape))

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """Fused decode."""
        out = np.empty(self.n_out, np.float32)
        _fp8_matvec(self.vals, E4M3, self.scale, self.bh, self.bw, np.ascontiguousarray(x, dtype=np.float32), out)
        return out

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows decoded to f32."""
        out = np.empty((r1 - r0, self.n_in), np.float32)
        _fp8_rows(self.vals, E4M3, self.scale, self.bh, self.bw, r0, out)
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
