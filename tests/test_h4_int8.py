"""The integer prefill path (8-bit activations, integer dot products) against numpy references.

Three independent checks, so that each can be exact:
1. `quantize_q8` equals ggml's Q8_0 rounding done in numpy (q, d and the block sums, bit for bit).
2. `unpack_int8` (what the integer kernel reads: w = s * q + m) equals the codec's dequantize.
3. `matmul_q8` equals, in f64, (d * q activations) @ (s * q + m weights).T within an f32 bound: the integer
   part of each unit is exact, then each unit adds f32(I) * (s * da) and m * (da * sum qa) with one rounding
   each, so |y - ref| <= (units + 4) * 2 eps * sum over units (|s da| sum q |qa| + |m| |da sum qa|).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from qf.format.ggml_types import GGMLType, block_size
from qf.runtime.kernels import cpu, cpu_amx_bf16
from qf.runtime.kernels.cpu_isimd import ISAS, Isa, _target_features
from test_kernels_cpu import _quantized, _random_bytes

INT8 = cpu.int8_types()
EPS = float(np.finfo(np.float32).eps)
TOKEN_COUNTS = (1, 2, 3, 4, 5, 7, 16, 33, 130)


def _q8_reference(x: np.ndarray, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q8_0 of x [M, n_in] in numpy f32 (round half to even), and for two parts the remainder in
    steps of 1/128: (integer values int32 [M, n_in], d f32 [M, n_in / 32])."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(axis=-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    v = xb * inv[..., None]
    hi = np.rint(v)
    if parts == 1:
        return hi.astype(np.int32).reshape(x.shape), (amax / np.float32(127)).astype(np.float32)
    lo = np.rint((v - hi) * np.float32(128))
    assert np.abs(lo).max() <= 64
    q = hi.astype(np.int32) * 128 + lo.astype(np.int32)
    return q.reshape(x.shape), (amax / np.float32(127 * 128)).astype(np.float32)


def _n_in(t: GGMLType, units: int) -> int:
    """A row of about `units` 32-element units, in whole blocks of t."""
    bs = block_size(t)
    return max(bs, units * 32 // bs * bs)


def _check_q8_matmul(y: np.ndarray, w: cpu.QMatrix, xq: cpu.Q8Activations) -> None:
    """y equals the f64 product of the unpacked weights and the dequantized activations within the bound."""
    q, s, m = cpu.unpack_int8(w)
    per = w.n_in // s.shape[1]
    s_el = np.repeat(s.astype(np.float64), per, axis=1)
    wq = q * s_el + np.repeat(m.astype(np.float64), per, axis=1)
    a = xq.dequantize()
    ref = a @ wq.T
    sx = (xq.s16 if per == 16 else xq.s32).astype(np.float64)
    terms = np.abs(a) @ (np.abs(s_el) * q).T + np.abs(sx) @ np.abs(m.astype(np.float64)).T
    bound = (w.n_in / 32 + 5) * 2 * EPS * terms  # two parts: the integer sum may round once in f32
    err = np.abs(y.astype(np.float64) - ref)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.all(err <= bound + 1e-30), f"max err/bound {np.max(err / (bound + 1e-30)):.3g}"


# ------------------------------------------------------------------------------ activations


@pytest.mark.parametrize("parts", [1, 2])
def test_quantize_q8_is_ggml_q8_0(parts: int) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, 96)) * rng.uniform(0.01, 100, (7, 1))).astype(np.float32)
    x[2, 32:64] = 0  # an all-zero block: d = 0, q = 0
    x[3, :32] = np.arange(32) - 15.5  # halves: round to even
    xq = cpu.quantize_q8(x, parts)
    q, d = _q8_reference(x, parts)
    assert xq.parts == parts and xq.shape == x.shape
    assert np.array_equal(xq.integers(), q) and np.array_equal(xq.d, d)
    sums = q.reshape(7, -1, 16).sum(-1, dtype=np.int64)
    assert np.array_equal(xq.s16, (np.repeat(d, 2, axis=1) * sums).astype(np.float32))
    assert np.array_equal(xq.s32, (d * sums.reshape(7, -1, 2).sum(-1)).astype(np.float32))
    assert xq.d[2, 1] == 0 and not xq.integers()[2, 32:64].any()
    rel = np.abs(xq.dequantize() - x) / np.abs(x).reshape(7, -1, 32).max(-1).repeat(32, 1).clip(1e-30)
    assert rel.max() <= (0.5 / 127 if parts == 1 else 0.5 / 127 / 128) * 1.001


def test_quantize_q8_spreads_non_finite_values() -> None:
    x = np.ones((3, 64), np.float32)
    x[0, 3] = np.nan
    x[1, 40] = np.inf
    xq = cpu.quantize_q8(x)
    assert np.isnan(xq.d[0, 0]) and np.isinf(xq.d[1, 1])
    assert np.all(np.isfinite(xq.d[2]))
    w = cpu.QMatrix(GGMLType.Q8_0, _quantized(GGMLType.Q8_0, 5, 64, np.random.default_rng(0))[0], 64, 5)
    y = cpu.matmul_q8(w, xq)
    assert not np.isfinite(y[0]).any() and not np.isfinite(y[1]).any() and np.isfinite(y[2]).all()


def test_quantize_q8_rejects_bad_shapes() -> None:
    with pytest.raises(cpu.KernelError, match="multiple of 32"):
        cpu.quantize_q8(np.zeros((2, 40), np.float32))
    with pytest.raises(cpu.KernelError, match="multiple of 32"):
        cpu.quantize_q8(np.zeros(64, np.float32))
    with pytest.raises(cpu.KernelError, match="1 or 2"):
        cpu.quantize_q8(np.zeros((1, 64), np.float32), parts=3)
    assert cpu.quantize_q8(np.zeros((0, 64), np.float32)).shape == (0, 64)


# ------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("t", INT8, ids=lambda t: t.name)
@pytest.mark.parametrize("source", ["quantized", "bit patterns"])
def test_unpack_int8_is_the_codec(t: GGMLType, source: str) -> None:
    """s * q + m equals the codec's dequantize up to one rounding of the larger term per weight."""
    rng = np.random.default_rng(50 + int(t))
    n_out, n_in = 21, _n_in(t, 16)
    make = _quantized if source == "quantized" else _random_bytes
    data, want = make(t, n_out, n_in, rng)
    q, s, m = cpu.unpack_int8(cpu.QMatrix(t, data, n_in, n_out))
    per = n_in // s.shape[1]
    assert per == 32 // cpu.IDECODERS[t].subs
    sq = q.reshape(n_out, -1, per) * s[..., None]
    got = (sq + m[..., None]).reshape(n_out, n_in)
    tol = 2 * EPS * np.maximum(np.abs(sq), np.abs(m[..., None])).reshape(n_out, n_in)
    assert np.all(np.abs(got - want) <= tol), f"max diff {np.abs(got - want).max():.3g}"


def test_unpack_int8_refuses_float_types() -> None:
    w = cpu.QMatrix(GGMLType.F16, np.zeros((2, 64), np.uint8), 32, 2)
    with pytest.raises(cpu.KernelError, match="no integer matmul for F16"):
        cpu.unpack_int8(w)
    with pytest.raises(cpu.KernelError, match="no integer matmul for F16"):
        cpu.matmul_q8(w, cpu.quantize_q8(np.zeros((1, 32), np.float32)))


# ------------------------------------------------------------------------------ the integer matmul


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("t", INT8, ids=lambda t: t.name)
def test_matmul_q8_token_counts_and_odd_rows(t: GGMLType, parts: int) -> None:
    """M = 1..130 against rows that are not a multiple of the 16-row panel (1, 17, 37)."""
    rng = np.random.default_rng(100 + int(t))
    x = rng.standard_normal((max(TOKEN_COUNTS), _n_in(t, 12))).astype(np.float32)
    for n_out in (1, 17, 37):
        data, _ = _quantized(t, n_out, x.shape[1], rng)
        w = cpu.QMatrix(t, data, x.shape[1], n_out)
        for n_tok in TOKEN_COUNTS:
            xq = cpu.quantize_q8(x[:n_tok], parts)
            _check_q8_matmul(cpu.matmul_q8(w, xq), w, xq)


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("t", INT8, ids=lambda t: t.name)
def test_matmul_q8_bit_patterns(t: GGMLType, parts: int) -> None:
    """Every quant bit pattern (scales finite) and activations of very different sizes per block."""
    rng = np.random.default_rng(150 + int(t))
    n_out, n_in = 45, _n_in(t, 24)
    data, _ = _random_bytes(t, n_out, n_in, rng)
    w = cpu.QMatrix(t, data, n_in, n_out)
    x = (rng.standard_normal((9, n_in)) * np.exp(rng.uniform(-6, 6, (9, n_in // 32))).repeat(32, 1))
    xq = cpu.quantize_q8(x.astype(np.float32), parts)
    _check_q8_matmul(cpu.matmul_q8(w, xq), w, xq)


def test_matmul_q8_rows_do_not_depend_on_the_batch_or_threads() -> None:
    """Each output is one fixed sum over its own token: equal bit for bit whatever M, position, threads."""
    rng = np.random.default_rng(3)
    t, n_out, n_in = GGMLType.Q4_K, 203, 512
    w = cpu.QMatrix(t, _quantized(t, n_out, n_in, rng)[0], n_in, n_out)
    x = rng.standard_normal((37, n_in)).astype(np.float32)
    before = cpu.get_threads()
    try:
        cpu.set_threads(1)
        one = cpu.matmul(w, x, int8=True)
        cpu.set_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = cpu.matmul(w, x, int8=True)
    finally:
        cpu.set_threads(before)
    assert np.array_equal(one, two)
    for i in (0, 5, 36):
        assert np.array_equal(one[i], cpu.matmul(w, x[i:i + 1], int8=True)[0])
        assert np.array_equal(one[i], cpu.matmul(w, x[max(0, i - 2):i + 3], int8=True)[min(i, 2)])


def _runnable_isas() -> list[str]:
    """The idot instruction sets this host can run (the generic one always)."""
    have = _target_features()
    return [name for name, need in ISAS if all(f in have for f in need)]


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("isa", _runnable_isas())
@pytest.mark.parametrize("t", [GGMLType.Q8_0, GGMLType.Q6_K], ids=lambda t: t.name)
def test_instruction_sets_agree_bit_for_bit(t: GGMLType, isa: str, parts: int) -> None:
    """The integer part is exact on every path, so the results are identical (Q8_0: quants up to 255)."""
    rng = np.random.default_rng(4)
    n_out, n_in = 33, _n_in(t, 8)
    data, _ = _random_bytes(t, n_out, n_in, rng)
    w = cpu.QMatrix(t, data, n_in, n_out)
    xq = cpu.quantize_q8(rng.standard_normal((6, n_in)).astype(np.float32), parts)
    want = cpu.matmul_q8(w, xq)
    _check_q8_matmul(want, w, xq)
    assert np.array_equal(cpu.matmul_q8(w, xq, isa=Isa(isa)), want)


def test_unknown_instruction_set() -> None:
    with pytest.raises(ValueError, match="unknown integer-dot instruction set 'sse9'"):
        Isa("sse9")


# ------------------------------------------------------------------------------ path selection


@pytest.mark.skipif(cpu.INT8_MIN_TOKENS is None, reason="no native integer dot product on this host")
def test_matmul_picks_int8_for_large_batches_only(monkeypatch) -> None:
    """Without AMX-BF16 tiles (they take these batches first where the host has them: test_amx_bf16.py)."""
    monkeypatch.setattr(cpu_amx_bf16, "ENABLED", False)
    rng = np.random.default_rng(5)
    t, n_out, n_in = GGMLType.Q5_0, 40, 96
    w = cpu.QMatrix(t, _quantized(t, n_out, n_in, rng)[0], n_in, n_out)
    x = rng.standard_normal((cpu.INT8_MIN_TOKENS, n_in)).astype(np.float32)
    assert np.array_equal(cpu.matmul(w, x), cpu.matmul_q8(w, cpu.quantize_q8(x)))
    small = x[:cpu.INT8_MIN_TOKENS - 1]
    assert np.array_equal(cpu.matmul(w, small), cpu.matmul(w, small, int8=False))
    # exact rows (blas=False) never take the integer path: the fused kernel, as matvec's sums per token
    assert np.array_equal(cpu.matmul(w, x, blas=False), cpu.matmul(w, x, blas=False, int8=False))
    assert not np.array_equal(cpu.matmul(w, x, blas=False), cpu.matmul(w, x))
    f16 = cpu.QMatrix(GGMLType.F16, rng.standard_normal((n_out, n_in)).astype(np.float16).view(np.uint8), n_in, n_out)
    assert np.array_equal(cpu.matmul(f16, x), cpu.matmul(f16, x, int8=False))  # float types: no int8 path


@pytest.mark.skipif(cpu.INT8_MIN_TOKENS is None, reason="no native integer dot product on this host")
def test_matmul_many_equals_each_matmul() -> None:
    """Merged products (one quantization, one call per type of up to three weights) give each weight's own
    matmul bit for bit: mixed types, a float type, odd row counts, every path's batch sizes."""
    rng = np.random.default_rng(8)
    n_in = 256
    kinds = [(GGMLType.Q4_K, 37), (GGMLType.Q4_K, 16), (GGMLType.Q6_K, 21), (GGMLType.Q4_K, 5), (GGMLType.Q4_K, 50),
             (GGMLType.F16, 9), (GGMLType.Q6_K, 1)]
    ws = [cpu.QMatrix(t, _quantized(t, n, n_in, rng)[0], n_in, n) for t, n in kinds]
    for n_tok in (1, 3, cpu.INT8_MIN_TOKENS, 61, 130):
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        ys = cpu.matmul_many(ws, x)
        assert len(ys) == len(ws)
        for w, y in zip(ws, ys):
            assert np.array_equal(y, cpu.matmul(w, x)), (w.type, w.n_out, n_tok)
    assert cpu.matmul_many([], x) == []


# ------------------------------------------------------------------------------ cold start


def test_precompile_marks_cached_types_and_skips_them() -> None:
    assert cpu.precompile(["Q4_0", GGMLType.F16, int(GGMLType.Q6_K)]) == [GGMLType.Q4_0, GGMLType.Q6_K]
    marker = cpu._precompiled_marker(GGMLType.Q4_0, None)
    assert marker is not None and marker.exists()
    assert cpu.precompile_async([GGMLType.Q4_0, GGMLType.Q6_K, GGMLType.F32]) is None  # all cached: no process
