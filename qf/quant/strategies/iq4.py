"""ggml's IQ4_NL / IQ4_XS quantizer (quantize_row_iq4_nl_impl in ggml-quants.c) as the `ggml` strategy.

What llama-quantize runs (quantize_iq4_nl / quantize_iq4_xs, ntry = 7) with or without an importance vector:
per 32 elements, weights qw * sqrt(sigma2 + x^2) (or x^2 without importance, sigma2 = 2 * mean x^2 over the
super-block); the scale seeded at -max / kvalues[0], refitted by weighted least squares over 15 trial
inverse scales; IQ4_XS then quantizes the 8 sub-block scales to 6 bits against d = -max_scale / 32 and
re-picks every index. Float32 operations in ggml's order (no FMA), so the bytes are ggml's.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qf.format.ggml_types import GGMLType
from qf.quant import kquant_search as ks
from qf.quant.codecs.base import Strategy
from qf.quant.codecs.iq4 import IQ4Fields
from qf.quant.iq_tables import kvalues_iq4nl_f32
from qf.quant.strategies.legacy_k import finite_blocks

_F32 = np.float32
NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs (the _ref row functions use -1; llama-quantize does not call them)


@njit(cache=True, error_model="numpy")
def best_index(values, x):
    """best_index_int8: index of the level nearest x (ties to the upper level only when strictly closer)."""
    n = values.shape[0]
    if x <= values[0]:
        return 0
    if x >= values[n - 1]:
        return n - 1
    ml, mu = 0, n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < values[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - values[mu - 1] < values[mu] - x else mu


@njit(cache=True, error_model="numpy")
def _block_scale(xb, w, values, ntry, Lb):
    """Weighted least-squares scale of one 32-element block over 2*ntry+1 trial grids; codes into Lb."""
    amax = _F32(0.0)
    mx = _F32(0.0)
    for j in range(xb.shape[0]):
        ax = abs(xb[j])
        if ax > amax:
            amax = ax
            mx = xb[j]
    if amax < ks.GROUP_MAX_EPS:
        return _F32(0.0)
    d = -mx / values[0] if ntry > 0 else mx / values[0]
    inv = _F32(1.0) / d
    sumqx = _F32(0.0)
    sumq2 = _F32(0.0)
    for j in range(xb.shape[0]):
        l = best_index(values, inv * xb[j])
        Lb[j] = l
        q = values[l]
        sumqx += w[j] * q * xb[j]
        sumq2 += w[j] * q * q
    d = sumqx / sumq2 if sumq2 > 0 else _F32(0.0)
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        inv = _F32(itry + np.int64(values[0])) / mx
        sumqx = _F32(0.0)
        sumq2 = _F32(0.0)
        for j in range(xb.shape[0]):
            q = values[best_index(values, inv * xb[j])]
            sumqx += w[j] * q * xb[j]
            sumq2 += w[j] * q * q
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(cache=True, error_model="numpy", parallel=True)
def _search_iq4(x, qw, use_qw, values, ntry, d_out, sc_out, L):
    """x: f32 [n, sb] super-blocks (sb = 32: IQ4_NL, 256: IQ4_XS) -> d_out f32 [n] (before f16),
    sc_out u8 [n, sb/32] scale codes (IQ4_XS), L u8 [n, sb] level indices."""
    sb = x.shape[1]
    nb = sb // 32
    for i in prange(x.shape[0]):
        sigma2 = _F32(0.0)
        for j in range(sb):
            sigma2 += x[i, j] * x[i, j]
        sigma2 *= _F32(2.0) / _F32(sb)
        scales = np.empty(nb, np.float32)
        w = np.empty(32, np.float32)
        Lb = np.zeros(32, np.uint8)
        max_scale = _F32(0.0)
        amax_scale = _F32(0.0)
        for ib in range(nb):
            xb = x[i, 32 * ib:32 * ib + 32]
            for j in range(32):
                if use_qw:
                    w[j] = qw[i, 32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                else:
                    w[j] = xb[j] * xb[j]
            s = _block_scale(xb, w, values, ntry, Lb)
            scales[ib] = s
            if abs(s) > amax_scale:
                amax_scale = abs(s)
                max_scale = s
        if nb > 1:
            d = -max_scale / _F32(32.0)
            d_out[i] = d
            inv = _F32(1.0) / d if d != 0 else _F32(0.0)
            for ib in range(nb):
                l = max(-32, min(31, ks.nearest_int(inv * scales[ib])))
                dl = d * _F32(l)
                idl = _F32(1.0) / dl if dl != 0 else _F32(0.0)
                for j in range(32):
                    L[i, 32 * ib + j] = best_index(values, idl * x[i, 32 * ib + j])
                sc_out[i, ib] = l + 32
        else:
            d_out[i] = scales[0]
            inv = _F32(1.0) / scales[0] if scales[0] != 0 else _F32(0.0)
            for j in range(sb):
                L[i, j] = best_index(values, inv * x[i, j])


def search_iq4(x: np.ndarray, importance: np.ndarray | None, block: int) -> IQ4Fields:
    """ggml's IQ4 search over finite x: f32 [n, block] (block 32: IQ4_NL, 256: IQ4_XS); importance like x."""
    x = np.require(x, np.float32, ("C", "W")).reshape(-1, block)
    n = x.shape[0]
    use_qw = importance is not None
    qw = ks.check_importance(importance, x.shape, f"IQ4 ({block})") if use_qw else np.zeros((1, 1), np.float32)
    d = np.empty(n, np.float32)
    sc = np.zeros((n, block // 32), np.uint8)
    L = np.empty((n, block), np.uint8)
    values = np.array(kvalues_iq4nl_f32())  # writable copy: one numba signature
    _search_iq4(x, qw, use_qw, values, NTRY, d, sc, L)
    return IQ4Fields(d, sc if block > 32 else None, L)


class IQ4Ggml(Strategy, name="ggml", qtypes=(GGMLType.IQ4_NL, GGMLType.IQ4_XS), default=True):
    """quantize_iq4_nl / quantize_iq4_xs: the weighted level search, importance optional."""

    uses_importance = True

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        block = self.layout.block_size
        x = finite_blocks(rows, self.layout.qtype, block)
        imp = None if importance is None else importance.reshape(-1, block)
        return self.layout.pack(search_iq4(x, imp, block))


__all__ = ["IQ4Ggml", "NTRY", "best_index", "search_iq4"]
