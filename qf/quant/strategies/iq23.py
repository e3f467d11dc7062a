"""ggml's IQ2_XXS / IQ2_XS / IQ2_S / IQ3_XXS / IQ3_S quantizers (quantize_row_iq*_impl in ggml-quants.c).

What llama-quantize runs (quantize_iq2_xxs, _iq2_xs, _iq2_s, _iq3_xxs, _iq3_s), as one numba search with each
type's constants. Per sub-block (32 or 16 elements): weights qw * sqrt(sigma2 + x^2) (without importance x^2,
IQ2_S 0.25 * sigma2 + x^2); signs split off (IQ2_XXS / IQ2_XS / IQ3_XXS flip the least important element so each
group of 8 has an even count: 7 stored bits); |x| rounded to the lattice at trial scales, each point off the grid
replaced by its best neighbour from ggml's tables (qf.quant.iq_neighbours); the scale refitted by weighted least
squares; finally the super-block scale d = max / 31 (times a per-type fudge) with 4-bit sub-block codes.
IQ2_XXS and IQ2_XS require importance (ggml asserts it); the others use it when given (llama-quantize itself
refuses IQ2_S and IQ3_XXS tensors without one: a file-level rule, qf.quant.mixes). Float32 operations in ggml's
order (no FMA), so the bytes are ggml's, quirks included: after an all-zero sub-block IQ3_S writes the later
sub-blocks' grid low bytes and signs one sub-block early (ggml advances those pointers only for sub-blocks it
writes; the high grid bits stay in place), so such blocks decode as llama.cpp's do.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from qf.format.errors import QFError
from qf.format.ggml_types import QK_K, GGMLType
from qf.quant import kquant_search as ks
from qf.quant.codecs.base import Strategy
from qf.quant.codecs.iq23 import IQGridFields
from qf.quant.iq_grids import ksigns_iq2xs
from qf.quant.iq_neighbours import search_tables
from qf.quant.strategies.legacy_k import finite_blocks

_F32 = np.float32
_FLT_MAX = _F32(3.4028234663852886e38)
_i = np.int64

# How the final refit treats the groups (ggml's three variants).
REFIT_ALL = 0  # IQ2_XXS: always, every group, when the scale is positive
REFIT_OFF_GRID = 1  # IQ2_XS, IQ2_S, IQ3_XXS: only groups off the grid, when there are any
REFIT_ALL_IF_OFF = 2  # IQ3_S: every group when any is off the grid (groups start as off the grid)
WRITTEN, SKIPPED, FAILED = 0, 1, 2  # what a sub-block search did


class Params(NamedTuple):
    """One type's constants in ggml's search."""

    grid: str  # qf.quant.iq_grids name
    bs: int  # elements per sub-block (one scale code)
    kmaxq: int  # lattice levels per element (3 or 8)
    sigma_factor: float  # sigma2 = factor * mean(x^2)
    eps: float  # sub-blocks with max |x| below this are zero (0: only exact zeros)
    step: float  # trial scale step
    ntry: int  # trials -ntry..ntry
    seven_bit_signs: bool  # even sign count per 8 (least important element flipped)
    qp_seed: bool  # IQ2_XXS: the scale seeded by make_qp_quants and trials relative to it
    refit: int  # REFIT_*
    zero_weight_extra: float  # without importance: weight = extra * sigma2 + x^2 (-1: importance required)
    fudge: float  # d stored as d * fudge
    zero_if_no_scale: bool  # the grid bytes are cleared when every sub-block is zero
    compact_skips: bool  # IQ3_S: grid low bytes and signs of a sub-block go after the last one written (ggml
    # advances those pointers only for sub-blocks it writes; the high grid bits stay at the sub-block's place)


PARAMS = {
    GGMLType.IQ2_XXS: Params("iq2xxs", 32, 3, 1.0, 1e-15, 0.1, 6, True, True, REFIT_ALL, -1.0, 1.0, True, False),
    GGMLType.IQ2_XS: Params("iq2xs", 16, 3, 1.0, 1e-15, 0.1, 9, True, False, REFIT_OFF_GRID, -1.0, 1.0, True, False),
    GGMLType.IQ2_S: Params("iq2s", 16, 3, 2.0, 1e-8, 0.1, 9, False, False, REFIT_OFF_GRID, 0.25, 0.9875, False, False),
    GGMLType.IQ3_XXS: Params("iq3xxs", 32, 8, 2.0, 1e-8, 0.2, 15, True, False, REFIT_OFF_GRID, 0.0, 1.0125, True, False),
    GGMLType.IQ3_S: Params("iq3s", 32, 8, 2.0, 0.0, 0.2, 9, False, False, REFIT_ALL_IF_OFF, 0.0, 1.033, False, True),
}


@njit(cache=True, error_model="numpy")
def _best_neighbour(neighbours, at, points, xval, waux, base, scale, L):
    """iq*_find_best_neighbour: the listed grid point nearest xval[base:base+dims] (weighted); its levels into L."""
    dims = points.shape[1]
    best_d2 = _FLT_MAX
    gi = -1
    for j in range(1, np.int64(neighbours[at]) + 1):
        g = np.int64(neighbours[at + j])
        d2 = _F32(0.0)
        for i in range(dims):
            diff = scale * _F32(points[g, i]) - xval[base + i]
            d2 += waux[base + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            gi = g
    if gi >= 0:
        for i in range(dims):
            L[base + i] = (np.int64(points[gi, i]) - 1) // 2
    return gi


@njit(cache=True, error_model="numpy")
def _lattice_group(xval, waux, base, inv, scale, kmaxq, bits, points, kmap, neighbours, L):
    """Rounds xval[base:base+dims] * inv to the lattice into L; off the grid: the best neighbour at `scale`.

    Returns (grid index or -1 when none was found, whether the rounded point was on the grid)."""
    dims = points.shape[1]
    u = 0
    for i in range(dims):
        l = ks.nearest_int(_F32(0.5) * (inv * xval[base + i] - _F32(1.0)))
        l = max(0, min(kmaxq - 1, l))
        L[base + i] = l
        u |= l << (bits * i)
    g = kmap[u]
    if g >= 0:
        return np.int64(g), True
    return _best_neighbour(neighbours, -np.int64(g) - 1, points, xval, waux, base, scale, L), False


@njit(cache=True, error_model="numpy")
def _fit(xval, weight, L, n):
    """Weighted least squares of xval on q = 2L + 1: (sumqx, sumq2)."""
    sumqx = _F32(0.0)
    sumq2 = _F32(0.0)
    for i in range(n):
        q = _F32(2 * L[i] + 1)
        sumqx += weight[i] * xval[i] * q
        sumq2 += weight[i] * q * q
    return sumqx, sumq2


@njit(cache=True, error_model="numpy")
def _signs(xb, weight, xval, bs, seven, block_signs):
    """|xb| into xval and the sign byte of each group of 8 into block_signs (7-bit types: even count)."""
    for k in range(bs // 8):
        nflip = 0
        s = 0
        for i in range(8):
            v = xb[8 * k + i]
            if v >= 0:
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                nflip += 1
                s |= 1 << i
        if seven and nflip % 2 == 1:
            imin = 0
            mn = weight[8 * k] * xb[8 * k] * xb[8 * k]
            for i in range(1, 8):
                ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                if ax < mn:
                    mn = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        block_signs[k] = s & 127 if seven else s


@njit(cache=True, error_model="numpy")
def _sub_block(xb, weight, xval, waux, L, Laux, on_grid, on_grid_aux, block_signs, kmaxq, bits, eps, step, ntry,
               seven, qp_seed, refit, points, kmap, neighbours, gidx):
    """One sub-block of ggml's search -> (scale, status): WRITTEN (grid indices in gidx, signs in block_signs),
    SKIPPED (all zero: nothing stored) or FAILED (where ggml asserts or aborts)."""
    bs = xb.shape[0]
    dims = points.shape[1]
    ng = bs // dims
    for i in range(bs):
        waux[i] = np.sqrt(weight[i])
    _signs(xb, weight, xval, bs, seven, block_signs)
    mx = xval[0]
    for i in range(1, bs):
        mx = mx if mx > xval[i] else xval[i]
    for i in range(bs):
        L[i] = 0
    if mx < eps or mx == 0:
        return _F32(0.0), SKIPPED
    if qp_seed:
        scale = ks.make_qp_quants(bs, kmaxq + 1, xval, L, weight)
        base = scale * _F32(kmaxq)
        if base <= 0:
            return _F32(0.0), SKIPPED
    else:
        scale = mx / _F32(2 * kmaxq - 1)
        base = mx
    for k in range(ng):
        on_grid[k] = refit != REFIT_ALL_IF_OFF
    best = _F32(0.0)
    for t in range(-ntry, ntry + 1):
        inv = (_F32(2 * kmaxq - 1) + _F32(t) * step) / base
        this_scale = _F32(1.0) / inv
        for k in range(ng):
            g, on = _lattice_group(xval, waux, dims * k, inv, this_scale, kmaxq, bits, points, kmap, neighbours, Laux)
            if g < 0:
                return _F32(0.0), FAILED
            on_grid_aux[k] = on
        sumqx, sumq2 = _fit(xval, weight, Laux, bs)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(bs):
                L[i] = Laux[i]
            for k in range(ng):
                on_grid[k] = on_grid_aux[k]
    n_off = 0
    for k in range(ng):
        if not on_grid[k]:
            n_off += 1
    if scale > 0 and (refit == REFIT_ALL or n_off > 0):
        inv = _F32(1.0) / scale
        for k in range(ng):
            if refit == REFIT_OFF_GRID and on_grid[k]:
                continue
            g, on = _lattice_group(xval, waux, dims * k, inv, scale, kmaxq, bits, points, kmap, neighbours, L)
            if g < 0:
                return _F32(0.0), FAILED
        sumqx, sumq2 = _fit(xval, weight, L, bs)
        if sumq2 > 0:
            scale = sumqx / sumq2
    if scale < 0:  # never in practice; ggml flips the scale and the signs
        scale = -scale
        for k in range(bs // 8):
            block_signs[k] = (~block_signs[k]) & (127 if seven else 255)
    for k in range(ng):
        u = 0
        for i in range(dims):
            l = L[dims * k + i]
            if l < 0 or l >= kmaxq:
                return _F32(0.0), FAILED
            u |= l << (bits * i)
        g = kmap[u]
        if g < 0:
            return _F32(0.0), FAILED  # ggml aborts: "found point not on grid"
        gidx[k] = g
    if not scale >= 0:
        return scale, FAILED  # GGML_ASSERT(scale >= 0) (NaN)
    return scale, WRITTEN


@njit(cache=True, error_model="numpy", parallel=True)
def _search(x, qw, use_qw, bs, kmaxq, bits, sigma_factor, eps, step, ntry, seven, qp_seed, refit, extra, fudge,
            zero_if_no_scale, compact_skips, points, kmap, neighbours, d_out, sc_out, grid_out, signs_out, err):
    """x, qw: f32 [n, 256] -> d_out f32 [n] (before f16), sc_out u8 [n, 256/bs], grid_out u16 [n, 256/dims],
    signs_out u8 [n, 32] (stored sign bits per 8 elements); err[i] = 1 where ggml would abort."""
    dims = points.shape[1]
    nsub = QK_K // bs
    ng = bs // dims
    for ibl in prange(x.shape[0]):
        scales = np.zeros(nsub, np.float32)
        weight = np.empty(bs, np.float32)
        xval = np.empty(bs, np.float32)
        waux = np.empty(bs, np.float32)
        L = np.zeros(bs, np.int64)
        Laux = np.zeros(bs, np.int64)
        on_grid = np.zeros(ng, np.bool_)
        on_grid_aux = np.zeros(ng, np.bool_)
        block_signs = np.zeros(bs // 8, np.int64)
        gidx = np.zeros(ng, np.int64)
        sumx2 = _F32(0.0)
        for i in range(QK_K):
            sumx2 += x[ibl, i] * x[ibl, i]
        sigma2 = sigma_factor * sumx2 / _F32(QK_K)
        max_scale = _F32(0.0)
        w = 0  # sub-blocks written so far
        for ib in range(nsub):
            xb = x[ibl, bs * ib:bs * ib + bs]
            for i in range(bs):
                if use_qw:
                    weight[i] = qw[ibl, bs * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                else:
                    weight[i] = extra * sigma2 + xb[i] * xb[i] if extra > 0 else xb[i] * xb[i]
            scale, status = _sub_block(xb, weight, xval, waux, L, Laux, on_grid, on_grid_aux, block_signs, kmaxq,
                                       bits, eps, step, ntry, seven, qp_seed, refit, points, kmap, neighbours, gidx)
            if status == FAILED:
                err[ibl] = 1
                break
            scales[ib] = scale
            if status == SKIPPED:
                continue
            at = w if compact_skips else ib
            for k in range(ng):
                grid_out[ibl, ng * at + k] |= gidx[k] & 255
                grid_out[ibl, ng * ib + k] |= gidx[k] & ~255
            for k in range(bs // 8):
                signs_out[ibl, bs // 8 * at + k] = block_signs[k]
            w += 1
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == 0:
            d_out[ibl] = _F32(0.0)
            if zero_if_no_scale:
                grid_out[ibl, :] = 0
                signs_out[ibl, :] = 0
            continue
        d = max_scale / _F32(31.0)
        d_out[ibl] = d * fudge
        inv = _F32(1.0) / d
        for ib in range(nsub):
            l = ks.nearest_int(_F32(0.5) * (inv * scales[ib] - _F32(1.0)))
            sc_out[ibl, ib] = max(0, min(15, l))


def search_iq23(x: np.ndarray, importance: np.ndarray | None, qtype: GGMLType) -> IQGridFields:
    """ggml's search for qtype over finite x: f32 [n, 256]; importance like x (required for IQ2_XXS / IQ2_XS)."""
    p = PARAMS[GGMLType(qtype)]
    x = np.require(x, np.float32, ("C", "W")).reshape(-1, QK_K)
    n = x.shape[0]
    use_qw = importance is not None
    if not use_qw and p.zero_weight_extra < 0:
        raise QFError(f"quantizing to {GGMLType(qtype).name} requires an importance matrix")
    qw = ks.check_importance(importance, x.shape, GGMLType(qtype).name) if use_qw else np.zeros((1, 1), np.float32)
    t = search_tables(p.grid)
    dims = t.points.shape[1]
    d = np.zeros(n, np.float32)
    sc = np.zeros((n, QK_K // p.bs), np.uint8)
    grid = np.zeros((n, QK_K // dims), np.uint16)
    signs = np.zeros((n, QK_K // 8), np.uint8)
    err = np.zeros(n, np.uint8)
    f = _F32
    _search(x, qw, use_qw, _i(p.bs), _i(p.kmaxq), _i(3 if p.kmaxq > 3 else 2), f(p.sigma_factor), f(p.eps),
            f(p.step), _i(p.ntry), p.seven_bit_signs, p.qp_seed, _i(p.refit), f(max(p.zero_weight_extra, 0.0)),
            f(p.fudge), p.zero_if_no_scale, p.compact_skips, t.points, t.kmap, t.neighbours, d, sc, grid, signs, err)
    if err.any():
        bad = int(np.flatnonzero(err)[0])
        raise QFError(f"cannot quantize to {GGMLType(qtype).name}: super-block {bad} (elements {bad * QK_K}.."
                      f"{bad * QK_K + QK_K - 1}) left the grid search (ggml aborts there too)")
    if p.seven_bit_signs:
        signs = ksigns_iq2xs()[signs]
    return IQGridFields(d, sc, grid, signs)


class _IQ23Ggml(Strategy):
    """quantize_iq2_xxs / _iq2_xs / _iq2_s / _iq3_xxs / _iq3_s: the weighted grid search."""

    uses_importance = True

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        x = finite_blocks(rows, self.layout.qtype, QK_K)
        imp = None if importance is None else importance.reshape(-1, QK_K)
        return self.layout.pack(search_iq23(x, imp, self.layout.qtype))


class IQ2Ggml(_IQ23Ggml, name="ggml", qtypes=(GGMLType.IQ2_XXS, GGMLType.IQ2_XS), default=True):
    """IQ2_XXS / IQ2_XS: ggml asserts an importance vector (ggml_quantize_requires_imatrix)."""

    requires_importance = True


class IQ23Ggml(_IQ23Ggml, name="ggml", qtypes=(GGMLType.IQ2_S, GGMLType.IQ3_XXS, GGMLType.IQ3_S), default=True):
    """IQ2_S / IQ3_XXS / IQ3_S: importance optional."""


__all__ = ["PARAMS", "IQ23Ggml", "IQ2Ggml", "Params", "search_iq23"]
