"""IQ1_S / IQ1_M: grid and layouts against gguf-py, the quantizer against ggml-quants.c itself.

- the grid (qf.quant.iq1_tables) equals gguf-py's IQ1_S grid; the neighbour lists hold ggml's rule (the grid
  points at the 3 smallest distinct distances, nearest first, ties by index);
- dequantize == gguf.quants.dequantize bit for bit on random bytes and on our own bytes; unpack inverts pack;
- ggml's search: with QF_GGML_SRC (a llama.cpp ggml/ folder) ggml-quants.c is compiled and quantize_iq1_s /
  quantize_iq1_m (after iq2xs_init_impl) give the same bytes as ours on every synthetic distribution;
- IQ1_S refuses to run without importance (ggml asserts), IQ1_M runs without.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants
from test_codecs_kquants import ggml_lib, synthetic  # noqa: F401  (ggml_lib is a fixture)

from qf.format.errors import QFError
from qf.format.ggml_types import GGMLType
from qf.quant.codecs import get_codec
from qf.quant.iq1_tables import KMAP_SIZE, NWANT, iq1s_grid, iq1s_kgrid, iq1s_neighbours

NAMES = ["IQ1_S", "IQ1_M"]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte-for-byte equality (NaN payloads and signed zeros count)."""
    return a.shape == b.shape and bool(np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                                      np.ascontiguousarray(b).view(np.uint8)))


def test_grid_is_gguf_pys() -> None:
    quants.IQ1_S.init_grid()
    ref = np.asarray(quants.IQ1_S.grid).reshape(2048, 8)
    assert np.array_equal(iq1s_grid().astype(np.float32), ref.astype(np.float32))
    assert not iq1s_grid().flags.writeable and iq1s_kgrid().shape == (2048,)


def test_neighbours_follow_ggmls_rule() -> None:
    nb = iq1s_neighbours()
    levels = iq1s_grid().astype(np.int64) + 1  # [2048, 8] levels 0..2
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, (400, 8))
    us = (codes << (2 * np.arange(8))).sum(1)
    on = nb.index[us] >= 0
    assert on.any() and (~on).any()
    assert np.array_equal(levels[nb.index[us[on]]], codes[on])
    for u, c in zip(us[~on], codes[~on]):
        pts = nb.points[nb.start[u]:nb.start[u] + nb.count[u]].astype(np.int64)
        d2 = ((levels - c) ** 2).sum(1)
        want = np.unique(d2)[:NWANT]
        expect = np.concatenate([np.flatnonzero(d2 == w) for w in want])
        assert np.array_equal(pts, expect)
    assert nb.index.shape == (KMAP_SIZE,) and int(nb.points.max()) < 2048


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_random_bytes_like_gguf(name: str) -> None:
    codec = get_codec(GGMLType[name])
    b = np.random.default_rng(3).integers(0, 256, (600, codec.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        assert same_bits(codec.dequantize(b), quants.dequantize(b, GT[name]))
    assert np.array_equal(codec.layout.pack(codec.layout.unpack(b)), b)


@pytest.mark.parametrize("name", NAMES)
def test_our_bytes_dequantize_like_gguf(name: str) -> None:
    codec = get_codec(GGMLType[name])
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((16, 1024)) * rng.uniform(0.01, 2, (16, 1))).astype(np.float32)
    imp = rng.gamma(1, 1, 1024).astype(np.float32)
    q = codec.quantize(x, imp)
    assert q.shape == (16, 4 * codec.type_size)
    y = codec.dequantize(q)
    assert same_bits(y, quants.dequantize(q, GT[name]))
    rel = np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2))
    assert rel < 0.6, rel  # 1.5-1.75 bits per weight on Gaussian rows


def test_iq1_s_requires_importance_iq1_m_does_not() -> None:
    x = np.random.default_rng(5).standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(QFError, match="requires an importance matrix"):
        get_codec(GGMLType.IQ1_S).quantize(x)
    assert get_codec(GGMLType.IQ1_M).quantize(x).shape == (2, 56)


@pytest.mark.parametrize("name", NAMES)
def test_bit_exact_with_ggml(ggml_lib, name: str) -> None:  # noqa: F811
    """Our bytes == ggml-quants.c's (iq2xs_init_impl builds its neighbour table, qsort breaks the ties)."""
    codec = get_codec(GGMLType[name])
    ggml_lib.iq2xs_init_impl(int(GGMLType[name]))
    fn = getattr(ggml_lib, "quantize_" + name.lower())
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    rng = np.random.default_rng(8)
    for label, x in synthetic(rng).items():
        x = np.ascontiguousarray(x, np.float32)
        imps = [rng.gamma(1, 1, x.shape[1]).astype(np.float32)] + ([None] if name == "IQ1_M" else [])
        for imp in imps:
            ref = np.zeros((x.shape[0], x.shape[1] // 256 * codec.type_size), np.uint8)
            fn(x.ctypes.data, ref.ctypes.data, x.shape[0], x.shape[1], None if imp is None else imp.ctypes.data)
            with np.errstate(all="ignore"):
                assert np.array_equal(codec.quantize(x, imp), ref), (label, imp is None)
