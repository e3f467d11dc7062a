"""The in-place blocked Cholesky factorization and triangular inverse (qf.quant.cholesky) against numpy.linalg on
random symmetric positive definite matrices of sizes around the block size, damped and singular ones included."""

from __future__ import annotations

import numpy as np
import pytest

from qf.quant.cholesky import (cholesky_inplace, invert_lower_inplace, mirror_lower, mirror_upper, permute_symmetric,
                               zero_upper)


def _spd(n: int, seed: int, rank: int | None = None) -> np.ndarray:
    """X^T X of random X [rank or n + 7, n], f64 [n, n] (singular when rank < n)."""
    x = np.random.default_rng(seed).standard_normal((rank or n + 7, n))
    return x.T @ x


@pytest.mark.parametrize("n,block", [(1, 128), (5, 128), (127, 128), (128, 128), (129, 128), (301, 128),
                                     (300, 7), (64, 1)])
def test_cholesky_and_inverse_equal_numpy(n: int, block: int) -> None:
    h = _spd(n, n)
    a = h.copy()
    upper = np.triu(a, 1)
    dinv = cholesky_inplace(a, block)
    assert dinv is not None
    assert np.array_equal(np.triu(a, 1), upper)  # the strict upper triangle is left alone
    L = np.linalg.cholesky(h)
    assert np.allclose(np.tril(a), L, rtol=0, atol=1e-12 * np.abs(L).max() * n)
    zero_upper(a)
    invert_lower_inplace(a, dinv, block)
    ref = np.linalg.inv(L)
    assert np.allclose(a, ref, rtol=0, atol=1e-11 * np.abs(ref).max() * n)


def test_dead_inputs_damped_and_singular() -> None:
    n = 257
    h = _spd(n, 1, rank=100)  # singular: rank 100
    h[[0, 9, 200], :] = 0.0
    h[:, [0, 9, 200]] = 0.0  # dead inputs: zero rows and columns
    a = h.copy()
    assert cholesky_inplace(a) is None  # not positive definite
    mirror_lower(a)
    assert np.array_equal(a, h)  # restored from the untouched upper triangle
    a[[0, 9, 200], [0, 9, 200]] = 1.0
    a[np.diag_indices(n)] += 0.01 * np.mean(np.diag(h))  # damping
    d = a.copy()
    dinv = cholesky_inplace(a)
    assert dinv is not None
    zero_upper(a)
    invert_lower_inplace(a, dinv)
    assert np.isfinite(a).all()
    assert np.allclose(a.T @ a, np.linalg.inv(d), rtol=0, atol=1e-8 * np.abs(np.linalg.inv(d)).max())


def test_nan_is_not_positive_definite() -> None:
    a = _spd(40, 2)
    a[5, 5] = np.nan
    assert cholesky_inplace(a) is None


def test_permute_and_mirror() -> None:
    rng = np.random.default_rng(3)
    h = _spd(150, 3)
    for idx in (rng.permutation(150), np.arange(150)[::-1].copy(), np.arange(150)):
        a = h.copy()
        permute_symmetric(a, idx)
        assert np.array_equal(a, h[np.ix_(idx, idx)])
    a = np.tril(h)
    mirror_upper(a)
    assert np.array_equal(a, h)


def test_bad_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="square"):
        cholesky_inplace(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="square"):
        cholesky_inplace(np.eye(6)[:, :4])
