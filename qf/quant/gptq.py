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

import contextlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numba import njit, prange

from qf.format.errors import QFError
from qf.quant.cholesky import cholesky_inplace, invert_lower_inplace, mirror_lower, mirror_upper, \
    permute_symmetric, zero_upper

DEFAULT_DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (GPTQ's percdamp)
DEFAULT_BLOCK = 128  # columns updated together before the lazy update of the rest
MAX_DAMP_TRIES = 6  # damping grows 10x per failed Cholesky
ROWS_PER_GRAM = 8192  # rows of X per f32 product when accumulating X^T X
GRAM_COLS = 512  # columns of X^T X per f32 product (the scratch is n_in x GRAM_COLS, not n_in x n_in)
LOSS_BYTES = 32 << 20  # scratch of the output error's products (few large products: BLAS threads cost per call)


class Grid(Protocol):
    """A rounding grid over groups of columns (in the order GPTQ visits them): value = a * code + b per (row,
    column), codes clipped to [lo, hi]; where a == 0 the code `keep` is used."""

    group: int  # columns per parameter group (-1: the whole row)
    lo: int
    hi: int

    def fit(self, w: np.ndarray, cols: np.ndarray, importance: np.ndarray) -> None:
        """Choose the parameters of the group made of original columns `cols` from w f32 [rows, len(cols)]."""

    def params(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b) f32 [rows, len(cols)] and keep int32 [rows, len(cols)] of fitted columns."""

    def record(self, cols: np.ndarray, codes: np.ndarray) -> None:
        """The chosen codes int32 [rows, len(cols)] of columns cols."""

    def values(self) -> np.ndarray:
        """The recorded codes as weights (the stored form's exact values), f32 [rows, n_in]."""


@njit(cache=True, parallel=True, error_model="numpy")
def _columns(w1, u, a, b, keep, lo, hi, i0, codes, err):  # pragma: no cover - compiled
    """GPTQ over block columns i0 .. i0 + a.shape[1] - 1, each row on its own (rows are independent): round
    column i on its grid, err = (w - q) / u[i, i], w1[:, i+1:] -= err * u[i, i+1:]. w1, err: [rows, block]."""
    rows, nb = w1.shape
    n = a.shape[1]
    for r in prange(rows):
        for c in range(n):
            i = i0 + c
            wv = w1[r, i]
            ar = a[r, c]
            if ar != 0.0:
                k = np.rint((wv - b[r, c]) / ar)
                k = min(max(k, lo), hi)
            else:
                k = keep[r, c]
            codes[r, c] = np.int32(k)
            e = (wv - (ar * k + b[r, c])) / u[i, i]
            err[r, i] = e
            for m in range(i + 1, nb):
                w1[r, m] -= e * u[i, m]


def gram(x: np.ndarray, h: np.ndarray | None = None) -> np.ndarray:
    """X^T X in f64 [n_in, n_in], added to h: f32 products of ROWS_PER_GRAM rows and GRAM_COLS columns of the
    lower triangle at a time, summed in f64, then the upper triangle mirrored from the lower."""
    n = x.shape[1]
    h = np.zeros((n, n), np.float64) if h is None else h
    for a in range(0, x.shape[0], ROWS_PER_GRAM):
        xc = np.ascontiguousarray(x[a:a + ROWS_PER_GRAM], dtype=np.float32)  # xc: [rows, n_in]
        for c0 in range(0, n, GRAM_COLS):
            c1 = min(n, c0 + GRAM_COLS)
            h[c0:, c0:c1] += xc[:, c0:].T @ xc[:, c0:c1]  # [n_in - c0, c1 - c0], f32 product, f64 sum
    mirror_upper(h)
    return h


def hessian(x: np.ndarray) -> np.ndarray:
    """H = 2/T X^T X, f64 [n_in, n_in], for inputs x [T, n_in]."""
    if x.shape[0] == 0:
        raise QFError("GPTQ needs at least one calibration row")
    h = gram(x)
    h *= 2.0 / x.shape[0]
    return h


def _blas_single_thread():
    """A context in which BLAS/LAPACK run on one thread (threadpoolctl, when installed): the small factorizations
    here gain nothing from threads, and OpenBLAS's waiting threads cost seconds on a busy machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _inverse_cholesky(hr: np.ndarray, damp: float) -> np.ndarray:
    """Upper U f32 with U^T U = (H + damp * mean(diag) I)^-1, factorized in f64 (on SmolLM2's Hessians an f32
    factorization cost 3.6 points of recovered perplexity gap), from hr = J H J (H reversed; f64, C-contiguous,
    overwritten); damping grows until H is positive definite.

    With J the reversal, J H J = M M^T (M lower) gives H = R R^T with R = J M J upper, so H^-1 = R^-T R^-1
    and U = R^-1 = J M^-1 J: one Cholesky and one triangular inverse, both in place in hr
    (qf.quant.cholesky), so that hr is the only n x n f64 array; U is then its reversed f32 copy."""
    d = np.einsum("ii->i", hr)  # the diagonal, a view
    base = d.copy()
    mean_diag = float(np.mean(base))
    lam = damp * (mean_diag if mean_diag > 0 else 1.0)
    with _blas_single_thread():
        for _ in range(MAX_DAMP_TRIES):
            d[:] = base + np.float32(lam)
            dinv = cholesky_inplace(hr)  # J H J = M M^T, M in hr's lower triangle; its upper is still H
            if dinv is not None:
                break
            mirror_lower(hr)  # not positive definite: H again, more damping
            lam *= 10.0
        else:
            raise QFError(f"GPTQ: the Hessian stays singular after damping up to {lam:.3g}")
        zero_upper(hr)
        invert_lower_inplace(hr, dinv)  # M^-1
    u = np.ascontiguousarray(hr[::-1, ::-1], dtype=np.float32)  # R^-1 = J M^-1 J, upper
    if not np.isfinite(u).all():
        raise QFError(f"GPTQ: the inverse Hessian factor overflows f32 (damping {lam:.3g})")
    return u


@dataclass
class Factor:
    """A Hessian made ready for GPTQ, shared by the linears that read one input (q/k/v, gate/up): dead inputs,
    the column order, the inverse Cholesky factor in that order, and for the error measure either the undamped
    H in f32 or, when there are fewer calibration rows than inputs, the inputs themselves (smaller, and the
    products with them cheaper: (W - Q) H (W - Q)^T / 2 = |X (W - Q)^T|^2 / T)."""

    dead: np.ndarray  # bool [n_in]: zero diagonal
    importance: np.ndarray  # f32 [n_in]: diag(H), dead inputs 1
    perm: np.ndarray  # int64 [n_in]: processing order (identity without act-order)
    u: np.ndarray  # f32 [n_in, n_in]: upper, U^T U = (H_perm + damping)^-1, factorized in f64
    h32: np.ndarray | None  # f32 [n_in, n_in]: H as given (undamped, dead inputs untouched); None when x is kept
    x: np.ndarray | None  # f32 [T, n_in], C-contiguous, T < n_in: the inputs behind H (not a copy), else None
    hdiag: np.ndarray  # f32 [n_in]: diag(H) as given (dead inputs 0)
    damp: float
    act_order: bool


def factor(h: np.ndarray, damp: float = DEFAULT_DAMP, act_order: bool = False, overwrite: bool = False,
           inputs: np.ndarray | None = None) -> Factor:
    """Prepare Hessian h f64 [n_in, n_in] for gptq(): dead inputs get H[j, j] = 1, act_order sorts the columns by
    descending diag(H), then the damped inverse Cholesky factor. overwrite: h (f64, C-contiguous) is used as
    the factorization's scratch, so no other n x n f64 array is made (its contents are then undefined).
    inputs: the X [T, n_in] with h = 2/T X^T X; when T < n_in the error measure uses it instead of an f32 H."""
    h0 = np.asarray(h, dtype=np.float64)
    n = h0.shape[0]
    if h0.shape != (n, n):
        raise QFError(f"GPTQ: Hessian of shape {h0.shape} is not square")
    if not np.isfinite(h0).all():
        raise QFError("GPTQ: the Hessian holds inf/NaN")
    dead = np.diag(h0) <= 0
    diag = np.where(dead, 1.0, np.diag(h0))  # diag: [n_in] f64, dead inputs 1
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(n)
    x = None
    if inputs is not None:
        if inputs.ndim != 2 or inputs.shape[1] != n or inputs.shape[0] == 0:
            raise QFError(f"GPTQ: inputs of shape {inputs.shape} do not match a Hessian of {n} inputs")
        if inputs.shape[0] < n:
            x = np.ascontiguousarray(inputs, dtype=np.float32)
    h32 = h0.astype(np.float32) if x is None else None  # h32: [n_in, n_in]
    hdiag = np.diag(h0).astype(np.float32)
    rev = perm[::-1]
    if overwrite and h0 is h and h0.flags.c_contiguous and h0.flags.writeable:
        hr = h0
        permute_symmetric(hr, rev)  # in place: J P^T H P J
    else:
        hr = h0[np.ix_(rev, rev)]  # hr: [n_in, n_in] f64, J P^T H P J: the one f64 copy of H
    del h0, h
    hr[dead[rev], dead[rev]] = 1.0
    u = _inverse_cholesky(hr, damp)  # u: [n_in, n_in] f32 upper
    del hr
    return Factor(dead, diag.astype(np.float32), perm, u, h32, x, hdiag, damp, act_order)


@dataclass
class GPTQResult:
    """The quantized weight (on the grid, original column order), the column order used, and the error."""

    q: np.ndarray  # f32 [rows, n_in]: the grid's exact values of the chosen codes
    perm: np.ndarray  # int64 [n_in]: processing order (identity without act-order)
    loss: float  # sum over rows of (w - q) H (w - q)^T / 2 with the undamped H: the output error
    energy: float  # the same for q = 0 (the output's own size): loss / energy is the relative error

    @property
    def relative(self) -> float:
        """loss / energy (0 when the output is all zero)."""
        return self.loss / self.energy if self.energy > 0 else 0.0


def gptq(w: np.ndarray, h: np.ndarray | Factor, grid: Grid, block: int = DEFAULT_BLOCK, damp: float = DEFAULT_DAMP,
         act_order: bool = False, static_groups: bool = False) -> GPTQResult:
    """Quantize w f32 [rows, n_in] onto `grid` with GPTQ's error feedback under Hessian h f64 [n_in, n_in] (or its
    Factor, which then fixes damp and act_order: linears sharing an input factorize once).

    act_order: visit columns by descending diag(H). static_groups: fit every group on the original weights
    before the loop, in column order (groups stay contiguous under act-order); otherwise each group is fitted
    when the loop reaches its first column (under act-order that group holds the next `group` columns visited).
    """
    f = h if isinstance(h, Factor) else factor(h, damp, act_order)
    w0 = np.asarray(w, dtype=np.float32)
    w = np.array(w0, dtype=np.float32)  # w: [rows, n_in], updated in place
    rows, n = w.shape
    if f.u.shape != (n, n):
        raise QFError(f"GPTQ: Hessian {f.u.shape} does not match a weight of {n} inputs")
    if not np.isfinite(w).all():
        raise QFError("GPTQ: the weight holds inf/NaN")
    w[:, f.dead] = 0.0
    importance, perm, u = f.importance, f.perm, f.u
    g = n if grid.group <= 0 else grid.group
    if static_groups or grid.group <= 0:
        for c0 in range(0, n, g):
            cols = np.arange(c0, min(n, c0 + g))
            grid.fit(w[:, cols], cols, importance[cols])
    w = w[:, perm]
    fit_inline = grid.group > 0 and not static_groups
    if fit_inline:
        block = g * max(1, -(-block // g))  # whole groups per block: a group is fitted on up-to-date columns
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        w1 = np.ascontiguousarray(w[:, b0:b1])  # w1: [rows, b1 - b0], the block's columns, updated as they go
        err = np.zeros_like(w1)
        ub = np.ascontiguousarray(u[b0:b1, b0:b1])
        step = g if fit_inline else b1 - b0
        for s0 in range(0, b1 - b0, step):  # segments: one fitted group (inline) or the whole block
            s1 = min(b1 - b0, s0 + step)
            cols = perm[b0 + s0:b0 + s1]
            if fit_inline:
                grid.fit(w1[:, s0:s1], cols, importance[cols])
            a, bb, keep = grid.params(cols)
            codes = np.empty((rows, s1 - s0), np.int32)
            _columns(w1, ub, np.ascontiguousarray(a, np.float32), np.ascontiguousarray(bb, np.float32),
                     np.ascontiguousarray(keep, np.int32), float(grid.lo), float(grid.hi), s0, codes, err)
            grid.record(cols, codes)
        w[:, b1:] -= err @ u[b0:b1, b1:]
    q = grid.values()
    loss, energy = _losses(w0, q, f)
    return GPTQResult(q, perm, loss, energy)


def _losses(w: np.ndarray, q: np.ndarray, f: Factor) -> tuple[float, float]:
    """output_loss of q and of zero against w, in blocks of rows whose products fit LOSS_BYTES: d H d^T / 2
    with f.h32, or |X d^T|^2 / T with f.x (H = 2/T X^T X)."""
    e = np.zeros(2, np.float64)
    step = max(1, LOSS_BYTES // (24 * w.shape[1]))  # d, its product and their product: 3 x [2 step, n_in] f32
    for r0 in range(0, w.shape[0], step):
        d = np.concatenate([w[r0:r0 + step] - q[r0:r0 + step], w[r0:r0 + step]])  # d: [2 step, n_in]
        if f.h32 is not None:
            e += ((d @ f.h32) * d).reshape(2, -1).sum(axis=1, dtype=np.float64) / 2.0
        else:
            y = d @ f.x.T  # y: [2 r, T]
            e += np.square(y).reshape(2, -1).sum(axis=1, dtype=np.float64) / f.x.shape[0]
    return float(e[0]), float(e[1])


def output_loss(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """sum_rows (w - q) H (w - q)^T / 2 (H = 2/T X^T X: the mean squared output error, summed over rows)."""
    d = np.asarray(w, np.float32) - q  # d: [rows, n_in]
    return float(((d @ h.astype(np.float32)) * d).sum(dtype=np.float64) / 2.0)


def rtn(w: np.ndarray, grid: Grid, importance: np.ndarray | None = None) -> np.ndarray:
    """Round to nearest on the grid without error feedback (the baseline GPTQ improves on): f32 [rows, n_in]."""
    w = np.asarray(w, dtype=np.float32)
    n = w.shape[1]
    imp = np.ones(n, np.float32) if importance is None else np.asarray(importance, np.float32)
    g = n if grid.group <= 0 else grid.group
    for c0 in range(0, n, g):
        cols = np.arange(c0, min(n, c0 + g))
        grid.fit(w[:, cols], cols, imp[cols])
        a, b, keep = grid.params(cols)
        live = a != 0
        k = np.clip(np.rint((w[:, cols] - b) / np.where(live, a, 1.0)), grid.lo, grid.hi)
        grid.record(cols, np.where(live, k, keep).astype(np.int32))
    return grid.values()
