"""GPTQ (qf.quant.gptq) on integer and ggml grids: lower output error than round-to-nearest on correlated inputs,
finite results on dead inputs, act-order payloads that dequantize as the format defines, ggml blocks that
gguf.quants decodes to the values GPTQ chose."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from qf.format.ggml_types import GGMLType
from qf.quant.codecs import get_codec
from qf.quant.formats import format_of
from qf.quant.gptq import gptq, hessian, rtn
from qf.quant.grids import GgmlGrid, IntGrid


def _data(n_in: int = 128, rows: int = 48, t: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated inputs x [t, n_in] (a random mixing plus channels of very different sizes) and weights."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n_in, n_in)).astype(np.float32) * 0.4 + np.eye(n_in, dtype=np.float32)
    x = (rng.standard_normal((t, n_in)).astype(np.float32) @ mix) * rng.uniform(0.2, 3.0, n_in).astype(np.float32)
    return x, rng.standard_normal((rows, n_in)).astype(np.float32)


def _out_err(x: np.ndarray, w: np.ndarray, q: np.ndarray) -> float:
    """Mean squared output error of q against w on inputs x."""
    return float(np.mean((x @ (w - q).T) ** 2))


@pytest.mark.parametrize("bits,group,sym,act", [(4, 32, True, "none"), (4, 64, False, "none"), (4, 64, True, "static"),
                                                (4, -1, True, "none"), (8, 32, True, "g_idx"), (2, 64, False, "g_idx")])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int, group: int, sym: bool, act: str) -> None:
    x, w = _data()
    h = hessian(x)
    base = _out_err(x, w, rtn(w, IntGrid(*w.shape, bits, group, sym)))
    grid = IntGrid(*w.shape, bits, group, sym)
    r = gptq(w, h, grid, act_order=act != "none", static_groups=act == "static")
    err = _out_err(x, w, r.q)
    assert err < 0.8 * base, (err, base)
    assert np.allclose(grid.dequantize(), r.q, atol=1e-6)  # the recorded codes are the values GPTQ chose
    assert 0 < r.relative < 1


@pytest.mark.parametrize("act,static", [(True, False), (True, True), (False, False)])
def test_payload_dequantizes_through_the_int_format(act: bool, static: bool) -> None:
    x, w = _data(n_in=128, rows=16)
    grid = IntGrid(*w.shape, 4, 32, False)
    r = gptq(w, hessian(x), grid, act_order=act, static_groups=static)
    assert grid.has_g_idx == (act and not static)  # static groups keep the contiguous i // group layout
    scheme = f"int;bits=4;group=32;sym=0;g_idx={int(grid.has_g_idx)}"
    fmt, p = format_of(scheme)
    arrays = grid.payload(with_g_idx=grid.has_g_idx)
    assert np.array_equal(fmt.dequantize(p, arrays, w.shape[1]), r.q)
    if grid.has_g_idx:
        g = arrays["weight_g_idx"]
        assert not np.all(np.diff(g) >= 0)  # act-order groups: not monotonic in column order
        assert np.all(np.bincount(g) == 32)


def test_dead_inputs_give_finite_weights() -> None:
    x, w = _data(n_in=64, rows=8)
    x[:, [0, 5, 17, 63]] = 0.0
    for act in (False, True):
        grid = IntGrid(*w.shape, 4, 32, True)
        r = gptq(w, hessian(x), grid, act_order=act, static_groups=act)
        assert np.isfinite(r.q).all() and np.isfinite(grid.scale).all()
    r = gptq(w, hessian(np.zeros_like(x)), IntGrid(*w.shape, 4, 32, False))  # no input ever active
    assert np.isfinite(r.q).all()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_ggml_grid_blocks_decode_with_gguf(qtype: str) -> None:
    t = GGMLType[qtype]
    x, w = _data(n_in=512, rows=24)
    h = hessian(x)
    grid = GgmlGrid(t, *w.shape)
    r = gptq(w, h, grid)
    stored = grid.tensor()
    ref = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[qtype]).reshape(w.shape)
    assert np.allclose(ref, r.q, rtol=0, atol=1e-5 * np.abs(w).max())
    codec = get_codec(t)
    plain = codec.dequantize(codec.quantize(w, np.diag(h).astype(np.float32))).reshape(w.shape)
    assert _out_err(x, w, ref) < 0.85 * _out_err(x, w, plain)


def test_hessian_shape_mismatch_is_an_error() -> None:
    from qf.format.errors import QFError
    x, w = _data(n_in=64, rows=4)
    with pytest.raises(QFError, match="does not match"):
        gptq(w, hessian(x[:, :32]), IntGrid(4, 64, 4, 32, True))
