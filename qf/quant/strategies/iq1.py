"""ggml's IQ1_S / IQ1_M quantizers (quantize_row_iq1_s_impl / iq1_m_impl in ggml-quants.c) as the `ggml` strategy.

Per block (32 elements for IQ1_S, 16 for IQ1_M) the three levels -1, 0, 1 (shifted by +-0.125) are chosen by an
exhaustive search over the two split points of the sorted values (weighted least squares), patterns that are not
grid points go to the best of their grid neighbours (qf.quant.iq1_tables), then the block scales get 3-bit codes
against d = max_scale / 15 (IQ1_M refits d over the whole super-block). Float32 operations in ggml's order.

ggml sorts with C's qsort on values only; glibc's qsort (a merge sort for these sizes) is stable, so ties keep
their original order, which the stable insertion sort here reproduces. IQ1_S requires importance (ggml asserts
quant_weights); IQ1_M uses it when given and x^2 otherwise, as ggml does.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qf.format.ggml_types import QK_K, GGMLType
from qf.quant import kquant_search as ks
from qf.quant.codecs.base import Strategy
from qf.quant.codecs.iq1 import IQ1Fields
from qf.quant.iq1_tables import iq1s_kgrid, iq1s_neighbours
from qf.quant.strategies.legacy_k import finite_blocks

_F32 = np.float32
EPS_S = _F32(1e-12)  # GROUP_MAX_EPS_IQ1_S
EPS_M = _F32(1e-7)  # GROUP_MAX_EPS_IQ1_M
FLT_MAX = _F32(3.4028234663852886e38)
_DELTA = _F32(0.125)


@njit(cache=True, error_model="numpy")
def _stable_order(xb, order):
    """order <- indices of xb sorted ascending, ties in index order (glibc's stable qsort)."""
    n = xb.shape[0]
    for j in range(n):
        v = xb[j]
        k = j
        while k > 0 and xb[order[k - 1]] > v:
            order[k] = order[k - 1]
            k -= 1
        order[k] = j


@njit(cache=True, error_model="numpy")
def _best_neighbour(nb_index, nb_start, nb_count, nb_points, levels, u, xb, w, off, scale, xx, L):
    """iq1_find_best_neighbour2: the grid point nearest (weighted) to scale * xx[level] among u's neighbours,
    written into L[off:off+8]; returns its index."""
    best = FLT_MAX
    gi = -1
    for t in range(nb_count[u]):
        j = nb_points[nb_start[u] + t]
        d2 = _F32(0.0)
        for i in range(8):
            diff = scale * xx[levels[j, i]] - xb[off + i]
            d2 += w[off + i] * diff * diff
        if d2 < best:
            best = d2
            gi = j
    if gi < 0:  # every neighbour overflowed: ggml scans the whole grid (its loop reads xval out of range; here xb[i])
        for j in range(levels.shape[0]):
            d2 = _F32(0.0)
            for i in range(8):
                diff = scale * xx[levels[j, i]] - xb[off + i]
                d2 += w[off + i] * diff * diff
            if d2 < best:
                best = d2
                gi = j
    if gi < 0:
        gi = 0
    for i in range(8):
        L[off + i] = levels[gi, i]
    return gi


@njit(cache=True, error_model="numpy")
def _weights(xb, qw, use_qw, sigma2, w):
    """w <- qw * sqrt(sigma2 + x^2) (x^2 without importance); returns max |x|."""
    mx = abs(xb[0])
    for i in range(xb.shape[0]):
        if use_qw:
            w[i] = qw[i] * np.sqrt(sigma2 + xb[i] * xb[i])
        else:
            w[i] = xb[i] * xb[i]
        if i > 0:
            mx = max(mx, abs(xb[i]))
    return mx


@njit(cache=True, error_model="numpy")
def _grid_groups(nb_index, nb_start, nb_count, nb_points, levels, xb, w, scale, xs, L, index):
    """Map each 8-group of levels L onto the grid (neighbour search off it); xs[k]: the level values of
    group k. Returns whether every group was on the grid; index <- grid indices."""
    on = True
    for k in range(index.shape[0]):
        u = 0
        for j in range(8):
            u |= np.int64(L[8 * k + j]) << (2 * j)
        gi = nb_index[u]
        if gi < 0:
            on = False
            gi = _best_neighbour(nb_index, nb_start, nb_count, nb_points, levels, u, xb, w, 8 * k, scale,
                                 xs[k], L)
        index[k] = gi
    return on


@njit(cache=True, error_model="numpy")
def _refit(levels, xb, w, xs, index, scale):
    """Least-squares scale over the chosen grid points (kept when not positive)."""
    sumqx = _F32(0.0)
    sumq2 = _F32(0.0)
    for k in range(index.shape[0]):
        for j in range(8):
            q = xs[k][levels[index[k], j]]
            sumqx += w[8 * k + j] * q * xb[8 * k + j]
            sumq2 += w[8 * k + j] * q * q
    if sumqx > 0 and sumq2 > 0:
        return sumqx / sumq2
    return scale


@njit(cache=True, error_model="numpy")
def _iq1s_superblock(x, qw, use_qw, nb_index, nb_start, nb_count, nb_points, levels, idx_out, sc_out, neg_out):
    """One IQ1_S super-block x: f32 [256] -> (d to store as f16); idx_out u16 [32], sc_out/neg_out u8 [8]."""
    bs = 32
    x_p = np.array([-1 + _DELTA, _DELTA, 1 + _DELTA], np.float32)
    x_m = np.array([-1 - _DELTA, -_DELTA, 1 - _DELTA], np.float32)
    w = np.empty(bs, np.float32)
    order = np.empty(bs, np.int64)
    sumx = np.empty(bs + 1, np.float32)
    sumw = np.empty(bs + 1, np.float32)
    L = np.empty(bs, np.int64)
    index = np.empty(4, np.int64)
    scales = np.zeros(8, np.float32)
    shifts = np.ones(8, np.int64)
    sumx2 = _F32(0.0)
    for i in range(QK_K):
        sumx2 += x[i] * x[i]
    sigma2 = _F32(2.0) * sumx2 / _F32(QK_K)
    max_scale = _F32(0.0)
    for ib in range(8):
        xb = x[bs * ib:bs * ib + bs]
        mx = _weights(xb, qw[bs * ib:bs * ib + bs], use_qw, sigma2, w)
        if mx < EPS_S:
            continue
        _stable_order(xb, order)
        sumx[0] = _F32(0.0)
        sumw[0] = _F32(0.0)
        for j in range(bs):
            i = order[j]
            sumx[j + 1] = sumx[j] + w[i] * xb[i]
            sumw[j + 1] = sumw[j] + w[i]
        best = -FLT_MAX
        scale = mx
        b1 = -1
        b2 = -1
        shift = 0
        for i1 in range(bs + 1):
            for i2 in range(i1, bs + 1):
                a = sumx[i1] - sumx[0]
                b = sumx[i2] - sumx[i1]
                c = sumx[bs] - sumx[i2]
                wa = sumw[i1] - sumw[0]
                wb = sumw[i2] - sumw[i1]
                wc = sumw[bs] - sumw[i2]
                sumqx = a * x_p[0] + b * x_p[1] + c * x_p[2]
                sumq2 = wa * x_p[0] * x_p[0] + wb * x_p[1] * x_p[1] + wc * x_p[2] * x_p[2]
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    b1 = i1
                    b2 = i2
                    shift = 1
                sumqx = a * x_m[0] + b * x_m[1] + c * x_m[2]
                sumq2 = wa * x_m[0] * x_m[0] + wb * x_m[1] * x_m[1] + wc * x_m[2] * x_m[2]
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    b1 = i1
                    b2 = i2
                    shift = -1
        if b1 < 0 or b2 < 0 or shift == 0:
            continue
        for j in range(bs):
            L[order[j]] = 0 if j < b1 else (1 if j < b2 else 2)
        if scale < 0:
            for j in range(bs):
                L[j] = 2 - L[j]
            scale = -scale
            shift = -shift
        xx = x_p if shift == 1 else x_m
        xs = (xx, xx, xx, xx)
        if not _grid_groups(nb_index, nb_start, nb_count, nb_points, levels, xb, w, scale, xs, L, index):
            scale = _refit(levels, xb, w, xs, index, scale)
        for k in range(4):
            idx_out[4 * ib + k] = index[k]
        scales[ib] = scale
        shifts[ib] = shift
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == 0:
        return _F32(0.0)
    d = max_scale / _F32(15.0)
    idd = _F32(1.0) / d
    for ib in range(8):
        l = ks.nearest_int(_F32(0.5) * (idd * scales[ib] - _F32(1.0)))
        sc_out[ib] = max(0, min(7, l))
        neg_out[ib] = 1 if shifts[ib] == -1 else 0
    return d * _F32(1.125)


@njit(cache=True, error_model="numpy")
def _iq1m_superblock(x, qw, use_qw, nb_index, nb_start, nb_count, nb_points, levels, idx_out, sc_out, neg_out):
    """One IQ1_M super-block x: f32 [256] -> (d to store as f16); idx_out u16 [32], sc_out u8 [16],
    neg_out u8 [32]."""
    bs = 16
    x_p = np.array([-1 + _DELTA, _DELTA, 1 + _DELTA], np.float32)
    x_m = np.array([-1 - _DELTA, -_DELTA, 1 - _DELTA], np.float32)
    w = np.empty(bs, np.float32)
    order = np.empty(bs, np.int64)
    px = np.empty((2, bs + 1), np.float32)
    pw = np.empty((2, bs + 1), np.float32)
    L = np.empty(bs, np.int64)
    index = np.empty(2, np.int64)
    scales = np.zeros(16, np.float32)
    shifts = np.zeros(16, np.int64)
    sqx = np.empty(4, np.float32)
    sq2 = np.empty(4, np.float32)
    sumx2 = _F32(0.0)
    for i in range(QK_K):
        sumx2 += x[i] * x[i]
    sigma2 = _F32(2.0) * sumx2 / _F32(QK_K)
    p2 = x_p[2]
    m2 = x_m[2]
    cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1]
    cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2]
    cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1]
    cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2]
    max_scale = _F32(0.0)
    for ib in range(16):
        xb = x[bs * ib:bs * ib + bs]
        mx = _weights(xb, qw[bs * ib:bs * ib + bs], use_qw, sigma2, w)
        if mx < EPS_M:
            continue
        _stable_order(xb, order)
        px[0, 0] = _F32(0.0)
        px[1, 0] = _F32(0.0)
        pw[0, 0] = _F32(0.0)
        pw[1, 0] = _F32(0.0)
        for j in range(bs):
            i = order[j]
            h = 0 if i < bs // 2 else 1
            px[h, j + 1] = px[h, j] + w[i] * xb[i]
            px[1 - h, j + 1] = px[1 - h, j]
            pw[h, j + 1] = pw[h, j] + w[i]
            pw[1 - h, j + 1] = pw[1 - h, j]
        tx0 = px[0, bs]
        tx1 = px[1, bs]
        tw0 = pw[0, bs]
        tw1 = pw[1, bs]
        best = -FLT_MAX
        scale = mx
        b1 = -1
        b2 = -1
        bk = -1
        for i1 in range(bs + 1):
            for i2 in range(i1, bs + 1):
                sx0 = px[0, i1] + px[0, i2]
                sx1 = px[1, i1] + px[1, i2]
                qxp0 = tx0 * p2 - sx0
                qxm0 = tx0 * m2 - sx0
                qxp1 = tx1 * p2 - sx1
                qxm1 = tx1 * m2 - sx1
                q2p0 = tw0 * p2 * p2 + pw[0, i1] * cp1 + pw[0, i2] * cp2
                q2m0 = tw0 * m2 * m2 + pw[0, i1] * cm1 + pw[0, i2] * cm2
                q2p1 = tw1 * p2 * p2 + pw[1, i1] * cp1 + pw[1, i2] * cp2
                q2m1 = tw1 * m2 * m2 + pw[1, i1] * cm1 + pw[1, i2] * cm2
                sqx[0] = qxp0 + qxp1
                sqx[1] = qxp0 + qxm1
                sqx[2] = qxm0 + qxp1
                sqx[3] = qxm0 + qxm1
                sq2[0] = q2p0 + q2p1
                sq2[1] = q2p0 + q2m1
                sq2[2] = q2m0 + q2p1
                sq2[3] = q2m0 + q2m1
                for k in range(4):
                    if sq2[k] > 0 and sqx[k] * sqx[k] > best * sq2[k]:
                        scale = sqx[k] / sq2[k]
                        best = scale * sqx[k]
                        b1 = i1
                        b2 = i2
                        bk = k
        if b1 < 0 or b2 < 0 or bk < 0:
            continue
        for j in range(bs):
            L[order[j]] = 0 if j < b1 else (1 if j < b2 else 2)
        if scale < 0:
            for j in range(bs):
                L[j] = 2 - L[j]
            scale = -scale
            bk = 3 - bk
        xs = (x_p if bk < 2 else x_m, x_p if bk % 2 == 0 else x_m)
        if not _grid_groups(nb_index, nb_start, nb_count, nb_points, levels, xb, w, scale, xs, L, index):
            scale = _refit(levels, xb, w, xs, index, scale)
        idx_out[2 * ib] = index[0]
        idx_out[2 * ib + 1] = index[1]
        scales[ib] = scale
        shifts[ib] = bk
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == 0:
        return _F32(0.0)
    d = max_scale / _F32(15.0)
    idd = _F32(1.0) / d
    sumqx = _F32(0.0)
    sumq2 = _F32(0.0)
    for ib in range(16):
        l = max(0, min(7, ks.nearest_int(_F32(0.5) * (idd * scales[ib] - _F32(1.0)))))
        sc_out[ib] = l
        neg_out[2 * ib] = 1 if shifts[ib] >= 2 else 0
        neg_out[2 * ib + 1] = 1 if shifts[ib] % 2 == 1 else 0
        xb = x[bs * ib:bs * ib + bs]
        _weights(xb, qw[bs * ib:bs * ib + bs], use_qw, sigma2, w)
        fl = _F32(2 * l + 1)
        for k in range(2):
            xx = x_m if neg_out[2 * ib + k] else x_p
            g = idx_out[2 * ib + k]
            for j in range(8):
                q = xx[levels[g, j]] * fl
                sumqx += w[8 * k + j] * q * xb[8 * k + j]
                sumq2 += w[8 * k + j] * q * q
    if sumq2 > 0:
        d = sumqx / sumq2
    return d * _F32(1.1125)


@njit(cache=True, error_model="numpy", parallel=True)
def _search_iq1(x, qw, use_qw, is_m, nb_index, nb_start, nb_count, nb_points, levels, d, idx, sc, neg):
    """x: f32 [n, 256] super-blocks, qw like x (or [1, 256] unused) -> d f32 [n], idx u16 [n, 32],
    sc u8 [n, 8 | 16], neg u8 [n, 8 | 32]."""
    for i in prange(x.shape[0]):
        q = qw[i] if use_qw else qw[0]
        if is_m:
            d[i] = _iq1m_superblock(x[i], q, use_qw, nb_index, nb_start, nb_count, nb_points, levels,
                                    idx[i], sc[i], neg[i])
        else:
            d[i] = _iq1s_superblock(x[i], q, use_qw, nb_index, nb_start, nb_count, nb_points, levels,
                                    idx[i], sc[i], neg[i])


def search_iq1(x: np.ndarray, importance: np.ndarray | None, is_m: bool) -> IQ1Fields:
    """ggml's IQ1_S (is_m False, importance required) / IQ1_M search over finite x: f32 [n, 256]."""
    x = np.require(x, np.float32, ("C", "W")).reshape(-1, QK_K)
    n = x.shape[0]
    use_qw = importance is not None
    qw = (ks.check_importance(importance, x.shape, "IQ1_M" if is_m else "IQ1_S") if use_qw
          else np.zeros((1, QK_K), np.float32))
    nb = iq1s_neighbours()
    k = iq1s_kgrid().astype(np.int64)
    levels = ((k[:, None] >> (2 * np.arange(8))) & 3).astype(np.int64)  # [2048, 8] levels 0..2
    d = np.empty(n, np.float32)
    idx = np.zeros((n, 32), np.uint16)
    sc = np.zeros((n, 16 if is_m else 8), np.uint8)
    neg = np.zeros((n, 32 if is_m else 8), np.uint8)
    _search_iq1(x, qw, use_qw, is_m, nb.index, nb.start, nb.count, nb.points, levels, d, idx, sc, neg)
    return IQ1Fields(d, sc, neg, idx)


class IQ1SGgml(Strategy, name="ggml", qtypes=(GGMLType.IQ1_S,), default=True):
    """quantize_iq1_s: the exhaustive three-level search; ggml asserts an importance vector."""

    uses_importance = True
    requires_importance = True

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        x = finite_blocks(rows, self.layout.qtype, QK_K)
        return self.layout.pack(search_iq1(x, None if importance is None else importance.reshape(-1, QK_K), False))


class IQ1MGgml(Strategy, name="ggml", qtypes=(GGMLType.IQ1_M,), default=True):
    """quantize_iq1_m: the same search per 16 elements with a sign per 8; importance optional (x^2 without)."""

    uses_importance = True

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        x = finite_blocks(rows, self.layout.qtype, QK_K)
        return self.layout.pack(search_iq1(x, None if importance is None else importance.reshape(-1, QK_K), True))


__all__ = ["IQ1MGgml", "IQ1SGgml", "search_iq1"]
