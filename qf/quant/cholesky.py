"""In-place blocked Cholesky factorization and lower-triangular inverse in f64, for GPTQ's inverse Hessian factor
without the copies numpy.linalg makes (its cholesky copies the input and allocates the factor: three n x n f64
arrays live at once, 730 MiB for a 5632-wide Hessian, where this needs the one array and n x 128 panels).

Blocks of BLOCK columns: the diagonal block is factorized and inverted by a compiled kernel, everything else is
numpy matrix products on views of the one array (BLAS), so the speed is LAPACK's order (left-looking Cholesky,
right-looking triangular inverse as in LAPACK's dtrtri).
"""

from __future__ import annotations

import numpy as np
from numba import njit

BLOCK = 128  # columns per panel


@njit(cache=True, error_model="numpy")
def _factor_diag(a, j0, t, inv):  # pragma: no cover - compiled
    """Cholesky of the diagonal block a[j0:j0+b, j0:j0+b] - t[:b, :b] written over its lower triangle only (the
    strict upper triangle is left alone), and the block factor's inverse into inv [b, b] (zero above the
    diagonal). False when a pivot is not positive (or NaN)."""
    b = inv.shape[0]
    for j in range(b):
        s = a[j0 + j, j0 + j] - t[j, j]
        for k in range(j):
            s -= a[j0 + j, j0 + k] * a[j0 + j, j0 + k]
        if not s > 0.0:
            return False
        ljj = np.sqrt(s)
        a[j0 + j, j0 + j] = ljj
        for i in range(j + 1, b):
            s = a[j0 + i, j0 + j] - t[i, j]
            for k in range(j):
                s -= a[j0 + i, j0 + k] * a[j0 + j, j0 + k]
            a[j0 + i, j0 + j] = s / ljj
    inv[:, :] = 0.0
    for j in range(b):
        inv[j, j] = 1.0 / a[j0 + j, j0 + j]
        for i in range(j + 1, b):
            s = 0.0
            for k in range(j, i):
                s += a[j0 + i, j0 + k] * inv[k, j]
            inv[i, j] = -s / a[j0 + i, j0 + i]
    return True


TILE = 64  # the mirror kernels copy tiles of TILE x TILE (the transposed reads stay in cache)


@njit(cache=True)
def _mirror(a, to_upper):  # pragma: no cover - compiled
    """Copy one triangle of a [n, n] onto the other, tile by tile: to_upper a[j, i] = a[i, j] (i > j), else the
    reverse."""
    n = a.shape[0]
    for i0 in range(0, n, TILE):
        for j0 in range(0, i0 + 1, TILE):
            for i in range(i0, min(i0 + TILE, n)):
                for j in range(j0, min(j0 + TILE, i)):
                    if to_upper:
                        a[j, i] = a[i, j]
                    else:
                        a[i, j] = a[j, i]


def mirror_lower(a: np.ndarray) -> None:
    """The lower triangle of a [n, n] restored from the upper (in place)."""
    _mirror(a, False)


def mirror_upper(a: np.ndarray) -> None:
    """The upper triangle of a [n, n] made from the lower (in place): a symmetric matrix from its lower half."""
    _mirror(a, True)


@njit(cache=True)
def zero_upper(a):  # pragma: no cover - compiled
    """Zero the strict upper triangle of a [n, n] (in place)."""
    n = a.shape[0]
    for i in range(n):
        a[i, i + 1:] = 0.0


@njit(cache=True)
def permute_symmetric(a, idx):  # pragma: no cover - compiled
    """a <- a[idx][:, idx] in place (a [n, n], idx a permutation int64 [n]) with one row of scratch: columns row by
    row, then rows along the permutation's cycles."""
    n = a.shape[0]
    tmp = np.empty(n, a.dtype)
    for r in range(n):
        for j in range(n):
            tmp[j] = a[r, idx[j]]
        a[r, :] = tmp
    done = np.zeros(n, np.bool_)
    for s in range(n):
        if done[s]:
            continue
        tmp[:] = a[s]
        i = s
        while True:
            done[i] = True
            k = idx[i]
            if k == s:
                a[i, :] = tmp
                break
            a[i, :] = a[k]
            i = k


def cholesky_inplace(a: np.ndarray, block: int = BLOCK) -> np.ndarray | None:
    """Lower Cholesky factor L (L L^T = a) of symmetric a f64 [n, n] (C-contiguous), read from and written over
    a's lower triangle; the strict upper triangle is untouched. -> the inverses of L's diagonal blocks f64
    [n_blocks, block, block] (for invert_lower_inplace), or None when a is not positive definite (its lower
    triangle then holds a partial factor: mirror_lower restores it)."""
    n = _check_square(a)
    nblk = -(-n // block)
    dinv = np.zeros((nblk, block, block), np.float64)
    zero = np.zeros((block, block), np.float64)
    for k, j0 in enumerate(range(0, n, block)):
        j1 = min(n, j0 + block)
        b = j1 - j0
        t = a[j0:, :j0] @ a[j0:j1, :j0].T if j0 else zero[:0]  # t: [n - j0, b], the earlier columns' update
        inv = dinv[k, :b, :b]
        if not _factor_diag(a, j0, t[:b] if j0 else zero[:b, :b], inv):
            return None
        if j1 < n:
            p = a[j1:, j0:j1]  # the panel below the diagonal block: L21 = (A21 - t21) L11^-T
            if j0:
                p -= t[b:]
            a[j1:, j0:j1] = p @ inv.T
    return dinv


def invert_lower_inplace(a: np.ndarray, dinv: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Overwrite lower-triangular a f64 [n, n] (zero strict upper triangle) with its inverse, from the last
    diagonal block to the first: X21 = -X22 L21 L11^-1; dinv: cholesky_inplace's diagonal-block inverses."""
    n = _check_square(a)
    starts = list(range(0, n, block))
    for k in range(len(starts) - 1, -1, -1):
        j0 = starts[k]
        j1 = min(n, j0 + block)
        b = j1 - j0
        if j1 < n:
            t = a[j1:, j1:] @ a[j1:, j0:j1]  # t: [n - j1, b]
            a[j1:, j0:j1] = -(t @ dinv[k, :b, :b])
        a[j0:j1, j0:j1] = dinv[k, :b, :b]
    return a


def _check_square(a: np.ndarray) -> int:
    """n of a C-contiguous f64 [n, n], else ValueError."""
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.dtype != np.float64 or not a.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous f64 square matrix, got {a.dtype} {a.shape}")
    return a.shape[0]
