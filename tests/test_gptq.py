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


@pytest.mark.parametrize("act", [False, True])
def test_factor_in_place_equals_a_copy_and_numpy(act: bool) -> None:
    from qf.quant.gptq import factor
    x, _ = _data(n_in=200, rows=4)
    x[:, [3, 150]] = 0.0  # dead inputs
    h = hessian(x)
    a = factor(h, 0.01, act_order=act)
    b = factor(h.copy(), 0.01, act_order=act, overwrite=True)  # the Hessian as scratch
    assert np.array_equal(a.u, b.u) and np.array_equal(a.h32, b.h32) and np.array_equal(a.perm, b.perm)
    hp = h[np.ix_(a.perm, a.perm)]  # the reference: U^T U = (P^T H P + damping)^-1, numpy's inverse
    hp[a.dead[a.perm], a.dead[a.perm]] = 1.0
    hp[np.diag_indices(200)] += np.float32(0.01 * np.mean(np.where(a.dead, 1.0, np.diag(h))))
    ref = np.linalg.inv(hp)
    assert np.allclose(a.u.T.astype(np.float64) @ a.u, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert np.array_equal(a.u, np.triu(a.u))


def test_error_measured_on_the_inputs_equals_the_hessian_one() -> None:
    from qf.format.errors import QFError
    from qf.quant.gptq import factor
    x, w = _data(n_in=256, rows=8, t=100)  # fewer rows than inputs: the inputs are kept, not an f32 H
    x[:, 7] = 0.0
    h = hessian(x)
    fa, fb = factor(h, 0.01), factor(h.copy(), 0.01, overwrite=True, inputs=x)
    assert fb.h32 is None and fb.x is not None and fa.h32 is not None and fa.x is None
    assert np.array_equal(fa.u, fb.u) and np.array_equal(fa.hdiag, np.diag(h).astype(np.float32))
    ra, rb = gptq(w, fa, IntGrid(*w.shape, 4, 32, True)), gptq(w, fb, IntGrid(*w.shape, 4, 32, True))
    assert np.array_equal(ra.q, rb.q)
    assert rb.loss == pytest.approx(ra.loss, rel=1e-4) and rb.energy == pytest.approx(ra.energy, rel=1e-4)
    assert rb.loss == pytest.approx(_out_err(x, w, rb.q) * w.shape[0], rel=1e-4)  # mean over T, summed over rows
    with pytest.raises(QFError, match="do not match"):
        factor(h, 0.01, inputs=x[:, :10])


@pytest.mark.parametrize("act", [False, True])
def test_a_shared_factor_gives_the_same_codes(act: bool) -> None:
    from qf.quant.gptq import factor
    x, w = _data(n_in=128, rows=16)
    h = hessian(x)
    f = factor(h, 0.01, act_order=act)
    for ws in (w, w[::-1] * 0.5):  # two linears of one input, one factorization
        a, b = IntGrid(*ws.shape, 4, 32, True), IntGrid(*ws.shape, 4, 32, True)
        ra = gptq(ws, h, a, damp=0.01, act_order=act, static_groups=act)
        rb = gptq(ws, f, b, static_groups=act)
        assert np.array_equal(ra.q, rb.q) and np.array_equal(ra.perm, rb.perm) and ra.loss == rb.loss


@pytest.mark.parametrize("sym", [True, False])
def test_range_search_lowers_weighted_rounding_error(sym: bool) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, size=(64, 64)).astype(np.float32)  # heavy tails: the full range wastes levels
    imp = rng.uniform(0.1, 2.0, 64).astype(np.float32)
    errs = []
    for shrink in (0, 21):
        grid = IntGrid(64, 64, 4, 64, sym, shrink=shrink)
        q = rtn(w, grid, imp)
        errs.append(float(((q - w) ** 2 * imp).sum()))
        fmt, p = format_of(f"int;bits=4;group=64;sym={int(sym)};g_idx=0")
        assert np.array_equal(fmt.dequantize(p, grid.payload(with_g_idx=False), 64), q)
    assert errs[1] < 0.95 * errs[0], errs


def test_gptq_with_range_search_beats_rtn() -> None:
    x, w = _data()
    base = _out_err(x, w, rtn(w, IntGrid(*w.shape, 4, 32, True)))
    r = gptq(w, hessian(x), IntGrid(*w.shape, 4, 32, True, shrink=21), act_order=True, static_groups=True)
    assert _out_err(x, w, r.q) < 0.8 * base
