"""The tiled (flash-style) attention of prefill chunks against a numpy reference and the row kernel, on every
KV cache type, odd shapes, sliding windows and chunk offsets; and CpuKV.attend's choice between them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qf.runtime.backend import FLASH_MIN_ROWS, CpuKV
from qf.runtime.kernels import cpu_attention as attn
from qf.runtime.kv_cache import KVSpec


def cache_rows(data: np.ndarray, scales: np.ndarray, kind: str, slot: int, kvh: int, n: int) -> np.ndarray:
    """Positions 0 .. n - 1 of (slot, kv head) of a cache tensor, decoded in numpy -> f64 [n, D]."""
    d = data[slot, kvh, :n]
    if kind == "f32":
        return d.astype(np.float64)
    if kind == "f16":
        return d.view(np.float16).astype(np.float64)
    sc = scales[slot, kvh, :n].view(np.float16).astype(np.float64)[:, :, None]  # [n, D / 32, 1]
    if kind == "q8_0":
        q = d.astype(np.float64).reshape(n, -1, 32)
    else:  # q4_0: low nibbles are values 0-15 of a block, high nibbles 16-31
        b = d.reshape(n, -1, 16)
        q = np.concatenate([b & 15, b >> 4], axis=2).astype(np.float64) - 8
    return (q * sc).reshape(n, -1)


def reference(q: np.ndarray, kv: CpuKV, slot: int, pos0: int, scale: float, window: int) -> np.ndarray:
    """Causal GQA softmax attention in f64 over the decoded cache: q [M, H, D] (already rotated) -> [M, H, D]."""
    m, h, dim = q.shape
    n_kv = kv.k.shape[1]
    group = h // n_kv
    n = pos0 + m
    out = np.empty((m, h, dim))
    for j in range(n_kv):
        k = cache_rows(kv.k, kv.k_scales, kv.spec.type_k, slot, j, n)
        v = cache_rows(kv.v, kv.v_scales, kv.spec.type_v, slot, j, n)
        for r in range(m):
            p = pos0 + r
            t0 = max(0, p + 1 - window) if window > 0 else 0
            s = q[r, j * group:(j + 1) * group].astype(np.float64) @ k[t0:p + 1].T * scale  # [group, keys]
            e = np.exp(s - s.max(axis=1, keepdims=True))
            out[r, j * group:(j + 1) * group] = (e / e.sum(axis=1, keepdims=True)) @ v[t0:p + 1]
    return out


def filled(kind_k: str, kind_v: str, n_kv: int, dim: int, n: int, slot: int, rng) -> CpuKV:
    """A cache of 2 slots with n random positions stored in `slot`."""
    kv = CpuKV(KVSpec(2, 320, n_kv, dim, dim, kind_k, kind_v))
    k = rng.standard_normal((n, n_kv, dim)).astype(np.float32)
    v = rng.standard_normal((n, n_kv, dim)).astype(np.float32)
    kv.store(k, v, np.full(n, slot, np.int64), np.arange(n, dtype=np.int64))
    return kv


SHAPES = [  # (H, Hkv, D, M, pos0, window)
    (9, 3, 64, 130, 0, 0),
    (4, 1, 256, 17, 70, 0),
    (6, 2, 32, 37, 100, 40),
    (3, 3, 96, 1, 5, 0),
    (2, 1, 32, 64, 0, 16),
    (2, 2, 64, 2, 190, 0),
]


@pytest.mark.parametrize("kinds", [("f32", "f32"), ("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"),
                                   ("f16", "q4_0")])
def test_flash_matches_reference_and_row_kernel(kinds):
    rng = np.random.default_rng(7)
    for h, n_kv, dim, m, pos0, window in SHAPES:
        kv = filled(*kinds, n_kv, dim, pos0 + m, 1, rng)
        q = (rng.standard_normal((m, h, dim)) * 2).astype(np.float32)
        sc = 1.0 / math.sqrt(dim)
        flash = np.empty_like(q)
        attn.attention_flash(q, kv.k, kv.k_scales, kv.v, kv.v_scales, attn.F16_TABLE, 1, pos0, sc, window, flash, 2)
        rows = np.empty_like(q)
        pos = np.arange(pos0, pos0 + m, dtype=np.int64)
        attn.attention_parallel(q, kv.k, kv.k_scales, kv.v, kv.v_scales, attn.F16_TABLE, np.ones(m, np.int64), pos,
                                sc, window, rows)
        ref = reference(q, kv, 1, pos0, sc, window)
        assert np.abs(flash - ref).max() < 2e-5, (kinds, h, n_kv, dim, m, pos0, window)
        assert np.abs(flash - rows).max() < 1e-4, (kinds, h, n_kv, dim, m, pos0, window)


def test_flash_rows_do_not_depend_on_chunking_or_threads():
    """A row's result is a function of its query and position: chunks and thread counts give the same bits."""
    rng = np.random.default_rng(3)
    kv = filled("f16", "f16", 2, 64, 150, 0, rng)
    q = rng.standard_normal((150, 6, 64)).astype(np.float32)
    whole = np.empty_like(q)
    attn.attention_flash(q, kv.k, kv.k_scales, kv.v, kv.v_scales, attn.F16_TABLE, 0, 0, 0.125, 0, whole, 2)
    for lo, hi, chunks in ((0, 40, 1), (40, 101, 2), (101, 150, 3)):
        part = np.empty_like(q[lo:hi])
        attn.attention_flash(np.ascontiguousarray(q[lo:hi]), kv.k, kv.k_scales, kv.v, kv.v_scales, attn.F16_TABLE, 0,
                             lo, 0.125, 0, part, chunks)
        assert np.array_equal(part, whole[lo:hi])


def test_attend_takes_flash_for_chunks_only(monkeypatch):
    """CpuKV.attend: consecutive positions of one slot from FLASH_MIN_ROWS rows tile; decode rows do not."""
    rng = np.random.default_rng(5)
    kv = filled("q8_0", "f16", 1, 64, 60, 0, rng)
    calls = []
    real = attn.attention_flash
    monkeypatch.setattr(attn, "attention_flash", lambda *a: calls.append(a[6:8]) or real(*a))
    m = FLASH_MIN_ROWS + 3
    q = rng.standard_normal((m, 2, 64)).astype(np.float32)
    pos = np.arange(60 - m, 60, dtype=np.int64)
    out = kv.attend(q, np.zeros(m, np.int64), pos)
    assert calls == [(0, 60 - m)]
    rows = np.concatenate([kv.attend(q[i:i + 1], np.zeros(1, np.int64), pos[i:i + 1]) for i in range(m)])
    assert np.abs(out - rows).max() < 1e-4
    kv.attend(q[:2], np.zeros(2, np.int64), pos[:2])  # too few rows
    kv.attend(q, np.zeros(m, np.int64), pos[::-1].copy())  # not consecutive
    assert len(calls) == 1


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_flash_sliding_window_skips_keys(chunks):
    """Narrow windows far into the cache, several chunks: a chunk's later tiles start past the keys it decoded
    for its earlier ones (those keys are skipped, never read); results still match the reference."""
    rng = np.random.default_rng(11 + chunks)
    for n_kv, window in ((1, 2), (2, 20), (1, 70)):
        m, pos0 = 150, 60
        kv = filled("f16", "q8_0", n_kv, 32, pos0 + m, 0, rng)
        q = rng.standard_normal((m, 2 * n_kv, 32)).astype(np.float32)
        out = np.empty_like(q)
        attn.attention_flash(q, kv.k, kv.k_scales, kv.v, kv.v_scales, attn.F16_TABLE, 0, pos0, 0.2, window, out,
                             chunks)
        assert np.abs(out - reference(q, kv, 0, pos0, 0.2, window)).max() < 2e-5, (n_kv, window)
