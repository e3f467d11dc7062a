"""The row attention of decode steps (16-lane kernel for D a multiple of 16, scalar otherwise) against the f64
reference on every KV cache type, with mixed slots and positions and sliding windows; and the compiled f32 / f16
KV stores against numpy's assignment and astype(float16), bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qf.runtime.kernels import cpu_attention as attn
from tests.test_cpu_attention_flash import filled, reference

KINDS = ["f32", "f16", "q8_0", "q4_0"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("heads,n_kv,dim", [(9, 3, 64), (4, 1, 256), (4, 2, 32), (6, 2, 48), (2, 2, 8)])
@pytest.mark.parametrize("window", [0, 5])
def test_rows_match_reference(kind: str, heads: int, n_kv: int, dim: int, window: int) -> None:
    """Rows at positions 0, 1, 16, 33 and 60 of slot 1 (parallel and serial kernels alike) within 2e-6 of f64."""
    if kind.startswith("q") and dim % 32:
        pytest.skip("q8_0 / q4_0 caches need D a multiple of 32")
    rng = np.random.default_rng(dim + heads + window)
    kv = filled(kind, kind, n_kv, dim, 61, 1, rng)
    pos = np.array([0, 1, 16, 33, 60], np.int64)
    q = rng.standard_normal((pos.size, heads, dim)).astype(np.float32)
    scale = 1.0 / math.sqrt(dim)
    outs = []
    for kernel in (attn.attention_serial, attn.attention_parallel):
        out = np.empty_like(q)
        kernel(q, kv.k, kv.k_scales, kv.v, kv.v_scales, attn.F16_TABLE, np.ones(pos.size, np.int64), pos, scale,
               window, out)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
    for r, p in enumerate(pos):
        ref = reference(q[r:r + 1], kv, 1, int(p), scale, window)[0]
        np.testing.assert_allclose(outs[0][r], ref, atol=2e-6, rtol=0)


def test_row_independent_of_batch() -> None:
    """A row's output is the same bit for bit alone or beside rows of other slots (exact decode rows)."""
    rng = np.random.default_rng(5)
    kv = filled("f16", "f16", 2, 64, 40, 0, rng)
    kv.store(*(rng.standard_normal((30, 2, 64)).astype(np.float32) for _ in range(2)), np.ones(30, np.int64),
             np.arange(30, dtype=np.int64))
    q = rng.standard_normal((2, 6, 64)).astype(np.float32)
    both = np.empty_like(q)
    attn.attention_serial(q, kv.k, kv.k_scales, kv.v, kv.v_scales, attn.F16_TABLE, np.array([0, 1]),
                          np.array([39, 29]), 0.125, 0, both)
    alone = np.empty_like(q[1:])
    attn.attention_serial(q[1:], kv.k, kv.k_scales, kv.v, kv.v_scales, attn.F16_TABLE, np.array([1]),
                          np.array([29]), 0.125, 0, alone)
    assert np.array_equal(both[1], alone[0])


@pytest.mark.parametrize("dim", [64, 48, 8])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_store_rows_bit_exact(dim: int, dtype: type) -> None:
    """store_rows writes what numpy's indexed assignment (f16: astype(float16), round to nearest even) writes,
    including infinities, overflow to inf, subnormals and values halfway between two halves."""
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((3, 2, dim)) * np.array([1e-6, 1.0, 7e4])[:, None, None]).astype(np.float32)
    x[0, 0, :6] = [np.inf, -np.inf, 6.1e-5, 65519.9, 1.0 + 2.0 ** -11, -(1.0 + 3 * 2.0 ** -11)]
    slots, pos = np.array([1, 0, 1]), np.array([3, 4, 9])
    data = np.zeros((2, 2, 10, dim), dtype)
    attn.store_rows(x, data, slots, pos)
    ref = np.zeros_like(data)
    with np.errstate(over="ignore"):  # 7e4 and 65519.9 overflow to inf, as they should
        ref[slots, :, pos, :] = x.astype(np.float16).view(np.uint16) if dtype is np.uint16 else x
    assert np.array_equal(data, ref)
