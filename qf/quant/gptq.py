"""GPTQ (Frantar et al. 2022): quantize a linear weight column by column, feeding each column's rounding error
back into the columns not yet quantized through the inverse Hessian of the layer's inputs.

H = 2/T X^T X over the calibration inputs X [T, n_in]. Dead inputs (zero diagonal: a column never active)
get H[j, j] = 1 and weight 0 (they cannot change the output). Damping adds `damp` x mean(diag H) to the
diagonal. U = the upper Cholesky factor of H^-1; column j's error err = (w_j - q_j) / U[j, j] updates the
later columns by -err * U[j, j+1:], within a block of columns at once and the rest lazily at block ends.

The rounding function is a *grid* (qf.quant.grids): it fixes the parameters (scales, zero points) of a group
of columns from the current, error-updated weights when the loop reaches the group's first column, then
rounds single columns onto that grid. Integer groups (GPTQ/AWQ payloads) and ggml blocks both fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.linalg

from qf.format.errors import QFError

DEFAULT_DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (GPTQ's percdamp)
DEFAULT_BLOCK = 128  # columns updated together before the lazy update of the rest
MAX_DAMP_TRIES = 6  # damping grows 10x per failed Cholesky
ROWS_PER_GRAM = 8192  # rows of X per f32 product when accumulating X^T X


class Grid(Protocol):
    """A rounding grid over groups of columns (in the order GPTQ visits them)."""

    group: int  # columns per parameter group (-1: the whole row)

    def fit(self, w: np.ndarray, cols: np.ndarray, importance: np.ndarray) -> None:
        """Choose the parameters of the group made of original columns `cols` from w f32 [rows, len(cols)]."""

    def round(self, w: np.ndarray, col: int) -> np.ndarray:
        """Column `col` (original index) w f32 [rows] -> its value on the grid f32 [rows] (codes recorded)."""


def gram(x: np.ndarray, h: np.ndarray | None = None) -> np.ndarray:
    """X^T X in f64 [n_in, n_in] (f32 products of ROWS_PER_GRAM rows at a time, summed in f64), added to h."""
    n = x.shape[1]
    h = np.zeros((n, n), np.float64) if h is None else h
    for a in range(0, x.shape[0], ROWS_PER_GRAM):
        xc = np.ascontiguousarray(x[a:a + ROWS_PER_GRAM], dtype=np.float32)  # xc: [rows, n_in]
        h += (xc.T @ xc).astype(np.float64)
    return h


def hessian(x: np.ndarray) -> np.ndarray:
    """H = 2/T X^T X, f64 [n_in, n_in], for inputs x [T, n_in]."""
    if x.shape[0] == 0:
        raise QFError("GPTQ needs at least one calibration row")
    return gram(x) * (2.0 / x.shape[0])


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper U with U^T U = (H + damp * mean(diag) I)^-1, f64; damping grows until H is positive definite."""
    mean_diag = float(np.mean(np.diag(h)))
    lam = damp * (mean_diag if mean_diag > 0 else 1.0)
    eye = np.eye(h.shape[0])
    for _ in range(MAX_DAMP_TRIES):
        try:
            lo = np.linalg.cholesky(h + lam * eye)  # H = L L^T
            lo_inv = scipy.linalg.solve_triangular(lo, eye, lower=True)  # L^-1
            return np.linalg.cholesky(lo_inv.T @ lo_inv).T  # H^-1 = L^-T L^-1 = U^T U
        except np.linalg.LinAlgError:
            lam *= 10.0
    raise QFError(f"GPTQ: the Hessian stays singular after damping up to {lam:.3g}")


@dataclass
class GPTQResult:
    """The quantized weight (on the grid, original column order), the column order used, and the error."""

    q: np.ndarray  # f32 [rows, n_in]
    perm: np.ndarray  # int64 [n_in]: processing order (identity without act-order)
    loss: float  # sum over rows of (w - q) H (w - q)^T / 2, GPTQ's proxy for the output error
    energy: float  # the same for q = 0 (the output's own size): loss / energy is the relative error

    @property
    def relative(self) -> float:
        """loss / energy (0 when the output is all zero)."""
        return self.loss / self.energy if self.energy > 0 else 0.0


def gptq(w: np.ndarray, h: np.ndarray, grid: Grid, block: int = DEFAULT_BLOCK, damp: float = DEFAULT_DAMP,
         act_order: bool = False, static_groups: bool = False) -> GPTQResult:
    """Quantize w f32 [rows, n_in] onto `grid` with GPTQ's error feedback under Hessian h f64 [n_in, n_in].

    act_order: visit columns by descending diag(H). static_groups: fit every group on the original weights
    before the loop, in column order (groups stay contiguous under act-order); otherwise each group is fitted
    when the loop reaches its first column (under act-order that group holds the next `group` columns visited).
    """
    w0 = np.asarray(w, dtype=np.float32)
    w = np.array(w0, dtype=np.float32)  # w: [rows, n_in], updated in place
    h0 = np.asarray(h, dtype=np.float64)
    h = np.array(h0, dtype=np.float64)
    rows, n = w.shape
    if h.shape != (n, n):
        raise QFError(f"GPTQ: Hessian {h.shape} does not match a weight of {n} inputs")
    if not (np.isfinite(w).all() and np.isfinite(h).all()):
        raise QFError("GPTQ: the weight or the Hessian holds inf/NaN")
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    importance = np.diag(h).astype(np.float32)
    g = n if grid.group <= 0 else grid.group
    if static_groups or grid.group <= 0:
        for c0 in range(0, n, g):
            cols = np.arange(c0, min(n, c0 + g))
            grid.fit(w[:, cols], cols, importance[cols])
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, hp = w[:, perm], h[np.ix_(perm, perm)]
    u = _inverse_cholesky(hp, damp).astype(np.float32)  # u: [n, n] upper
    q = np.zeros_like(w)
    fit_inline = grid.group > 0 and not static_groups
    if fit_inline:
        block = g * max(1, -(-block // g))  # whole groups per block: a group is fitted on up-to-date columns
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        w1 = w[:, b0:b1].copy()  # w1: [rows, b1 - b0], the block's columns, updated column by column
        err = np.zeros_like(w1)
        for i in range(b1 - b0):
            j = b0 + i
            if fit_inline and j % g == 0:
                cols = np.arange(j, min(n, j + g))
                grid.fit(w1[:, i:i + len(cols)], perm[cols], importance[perm[cols]])
            qc = grid.round(w1[:, i], int(perm[j]))
            q[:, j] = qc
            e = (w1[:, i] - qc) / u[j, j]
            w1[:, i + 1:] -= np.outer(e, u[j, j + 1:b1])
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    inv = np.argsort(perm)
    qo = q[:, inv]
    return GPTQResult(qo, perm, output_loss(w0, qo, h0), output_loss(w0, np.zeros_like(qo), h0))


def output_loss(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """sum_rows (w - q) H (w - q)^T / 2 (H = 2/T X^T X: the mean squared output error, summed over rows)."""
    d = np.asarray(w, np.float64) - q  # d: [rows, n_in]
    return float(((d @ h) * d).sum() / 2.0)


def rtn(w: np.ndarray, grid: Grid, importance: np.ndarray | None = None) -> np.ndarray:
    """Round to nearest on the grid without error feedback (the baseline GPTQ improves on): f32 [rows, n_in]."""
    w = np.asarray(w, dtype=np.float32)
    n = w.shape[1]
    imp = np.ones(n, np.float32) if importance is None else np.asarray(importance, np.float32)
    g = n if grid.group <= 0 else grid.group
    q = np.empty_like(w)
    for c0 in range(0, n, g):
        cols = np.arange(c0, min(n, c0 + g))
        grid.fit(w[:, cols], cols, imp[cols])
        for c in cols:
            q[:, c] = grid.round(w[:, c], int(c))
    return q
