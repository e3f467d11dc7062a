"""Round-to-nearest and ggml's searches as quantizer strategies for the legacy and K layouts.

`rtn` is the plain rounding (gguf.quants' quantize for the legacy types, ggml's quantize_row_q*_ref; for the
K types plain per-sub-block rounding, the baseline ggml's search is measured against). `ggml` is what
llama-quantize writes: the legacy types' quantize_row_q*_impl when an importance vector is given (plain rounding
otherwise), the K types' make_q*_quants search with or without importance, Q8_K's activation rounding.
The numba kernels below repeat ggml's / gguf-py's float32 operations one for one; layouts come from
qf.quant.codecs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qf.format.errors import QFError
from qf.format.ggml_types import QK_K, GGMLType
from qf.quant import kquant_search as ks
from qf.quant.codecs.base import Strategy
from qf.quant.codecs.kquants import Q8KFields
from qf.quant.codecs.legacy import LegacyFields

QK = 32  # elements per legacy block
_F32 = np.float32
_FLT_MAX = 3.4028234663852886e38
T = GGMLType
LEGACY_SEARCHED = (T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1)  # ggml's *_impl with importance
LEGACY = LEGACY_SEARCHED + (T.Q8_0,)
K_BITS = {T.Q2_K: 2, T.Q3_K: 3, T.Q4_K: 4, T.Q5_K: 5, T.Q6_K: 6}


# ---------------------------------------------------------------- legacy round-to-nearest kernels (numba)

@njit(cache=True, error_model="numpy")
def _cast_u8(v):
    """numpy's float32 -> uint8 cast as gguf.quants meets it on x86: NaN and +-inf give 0."""
    if not (abs(v) < 2147483648.0):
        return 0
    return int(v) & 0xFF


@njit(cache=True, error_model="numpy")
def _roundf_i8(v):
    """gguf's np_roundf (half away from zero) then the int8 cast; NaN/inf give 0."""
    a = abs(v)
    if not (a < 2147483648.0):
        return 0
    fl = np.floor(a)
    b = int(fl + np.floor(_F32(2.0) * (a - fl)))
    r = b if v >= 0 else -b
    return ((r + 128) & 0xFF) - 128


@njit(cache=True, error_model="numpy")
def _quantize_absmax(x, half, L, d):
    """Q4_0 (half 8) / Q5_0 (half 16): d = max / -half, q = trunc(x/d + half + .5) clipped."""
    # x: [n, QK] f32 -> L: [n, QK] u8 codes, d: [n] f32
    qmax = 2 * half - 1
    neg_half = _F32(-half)
    bias = _F32(half + 0.5)
    q = np.empty(QK, np.int64)
    for i in range(x.shape[0]):
        amax = abs(x[i, 0])
        mx = x[i, 0]
        for j in range(1, QK):  # first index of the largest |x| (numpy argmax)
            a = abs(x[i, j])
            if a > amax:
                amax = a
                mx = x[i, j]
        di = mx / neg_half
        idi = _F32(1.0) / di if di != 0 else _F32(0.0)
        d[i] = di
        for j in range(QK):
            q[j] = min(_cast_u8(x[i, j] * idi + bias), qmax)
        for j in range(QK):
            L[i, j] = q[j]


@njit(cache=True, error_model="numpy")
def _block_min_max(x, mn, mx, ambiguous):
    """Per-block min/max; flags blocks whose extreme is a zero present with both signs."""
    # x: [n, QK] f32; mn, mx: [n] f32; ambiguous: [n] bool
    for i in range(x.shape[0]):
        lo = x[i, 0]
        hi = x[i, 0]
        pos0 = False
        neg0 = False
        for j in range(QK):
            v = x[i, j]
            if v < lo:
                lo = v
            if v > hi:
                hi = v
            if v == 0:
                if np.signbit(v):
                    neg0 = True
                else:
                    pos0 = True
        mn[i] = lo
        mx[i] = hi
        ambiguous[i] = pos0 and neg0 and (lo == 0 or hi == 0)


@njit(cache=True, error_model="numpy")
def _quantize_minmax(x, mn, mx, qmax, L, d):
    """Q4_1 (qmax 15) / Q5_1 (qmax 31): d = (max - min) / qmax, q = trunc((x - min)/d + .5) clipped."""
    # x: [n, QK] f32; mn, mx: [n] f32 -> L: [n, QK] u8 codes, d: [n] f32
    fq = _F32(qmax)
    q = np.empty(QK, np.int64)
    for i in range(x.shape[0]):
        lo = mn[i]
        di = (mx[i] - lo) / fq
        idi = _F32(1.0) / di if di != 0 else _F32(0.0)
        d[i] = di
        for j in range(QK):
            q[j] = min(_cast_u8((x[i, j] - lo) * idi + _F32(0.5)), qmax)
        for j in range(QK):
            L[i, j] = q[j]


@njit(cache=True, error_model="numpy")
def _quantize_q8_0(x, L, d):
    """Q8_0: d = max|x| / 127, q = round-half-away(x / d)."""
    # x: [n, QK] f32 -> L: [n, QK] u8 (int8 codes), d: [n] f32
    for i in range(x.shape[0]):
        amax = _F32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[i, j]))
        di = amax / _F32(127.0)
        idi = _F32(1.0) / di if di != 0 else _F32(0.0)
        d[i] = di
        for j in range(QK):
            L[i, j] = np.uint8(_roundf_i8(x[i, j] * idi) & 0xFF)


@njit(cache=True, error_model="numpy")
def _first_nonfinite_row(x):
    """Index of the first row of x [n, k] holding NaN or inf, else -1."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            if not (abs(x[i, j]) <= _FLT_MAX):
                return i
    return -1


# ---------------------------------------------------------------- Python glue

def finite_blocks(x: np.ndarray, qtype: GGMLType, block: int) -> np.ndarray:
    """Finite C-contiguous f32 [n, block] or QFError naming the first bad block (super-block for 256)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, block)
    bad = _first_nonfinite_row(x)
    if bad >= 0:
        what = "super-block" if block == QK_K else "block"
        raise QFError(f"cannot quantize to {qtype.name}: {what} {bad} (elements {bad * block}.."
                      f"{bad * block + block - 1}) holds NaN or inf")
    return x


def legacy_rtn_fields(x: np.ndarray, qtype: GGMLType) -> LegacyFields:
    """Round-to-nearest of finite x: f32 [n, 32] for a legacy type (gguf.quants' quantize)."""
    n = x.shape[0]
    d = np.empty(n, np.float32)
    L = np.empty((n, QK), np.uint8)
    if qtype in (T.Q4_0, T.Q5_0):
        _quantize_absmax(x, 8 if qtype == T.Q4_0 else 16, L, d)
        return LegacyFields(d, None, L)
    if qtype == T.Q8_0:
        _quantize_q8_0(x, L, d)
        return LegacyFields(d, None, L)
    mn = np.empty(n, np.float32)
    mx = np.empty(n, np.float32)
    amb = np.empty(n, np.bool_)
    _block_min_max(x, mn, mx, amb)
    idx = np.flatnonzero(amb)
    if idx.size:  # the sign of a zero extreme follows numpy's reduction order, as in gguf.quants
        mn[idx] = x[idx].min(axis=1)
        mx[idx] = x[idx].max(axis=1)
    _quantize_minmax(x, mn, mx, 15 if qtype == T.Q4_1 else 31, L, d)
    return LegacyFields(d, mn, L)


# ---------------------------------------------------------------- strategies

class LegacyRTN(Strategy, name="rtn", qtypes=LEGACY):
    """Round-to-nearest (quantize_row_q*_ref); importance is not used."""

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        x = finite_blocks(rows, self.layout.qtype, QK)
        return self.layout.pack(legacy_rtn_fields(x, self.layout.qtype))


class LegacyGgml(Strategy, name="ggml", qtypes=LEGACY_SEARCHED, default=True):
    """ggml's quantize_q*: quantize_row_q*_impl's weighted scale search with importance, rounding without."""

    uses_importance = True
    NMAX = {T.Q4_0: 8, T.Q5_0: 16, T.Q4_1: 15, T.Q5_1: 31}  # make_qx_quants range / top affine code

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        t = self.layout.qtype
        x = finite_blocks(rows, t, QK)
        if importance is None:
            return self.layout.pack(legacy_rtn_fields(x, t))
        affine = self.layout.affine
        d, m, L = ks.search_legacy(rows, importance, self.NMAX[t], affine)
        return self.layout.pack(LegacyFields(d, m if affine else None, L))


class KGgml(Strategy, name="ggml", qtypes=tuple(K_BITS), default=True):
    """ggml's K-quant search (quantize_row_q*_K_ref, or quantize_row_q*_K_impl with importance)."""

    uses_importance = True

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        x = finite_blocks(rows, self.layout.qtype, QK_K)
        imp = None if importance is None else importance.reshape(-1, QK_K)
        return self.layout.pack(ks.search_k(x, K_BITS[self.layout.qtype], imp))


class KRTN(Strategy, name="rtn", qtypes=tuple(K_BITS)):
    """Plain rounding in the K layouts (sub-block min/max scales, no search); importance is not used."""

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        x = finite_blocks(rows, self.layout.qtype, QK_K)
        return self.layout.pack(ks.search_k_plain(x, K_BITS[self.layout.qtype]))


class Q8KRound(Strategy, name="ggml", qtypes=(T.Q8_K,)):
    """quantize_row_q8_K_ref: d = max / -127 by the signed extreme, int8 codes and 16-code sums."""

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return self.layout.pack(Q8KFields(*ks.search_q8_k(finite_blocks(rows, T.Q8_K, QK_K))))
