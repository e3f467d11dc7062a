"""CPU kernels (qf.runtime.kernels.cpu) against the numpy reference: codec dequantize, then x @ W.T.

Error bound. The kernels decode each weight with one fused multiply-add (the codecs may round twice,
so a weight can differ by an ulp of the larger of its two terms) and sum a row in 16 f32 lanes followed by
a 4-level tree. For a dot product of n terms that is at most about (n / 16 + 8) roundings of the partial
sums, so |y - ref| <= (n/16 + 8) * 2 eps * sum|w x| + 4 eps * max|w| * sum|x|, with ref computed in f64.
A wrong nibble, scale or offset shows up as an error of the order of sum|w x| itself, far above it.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from qf.format.ggml_types import BLOCK, GGMLType, block_size, row_bytes
from qf.quant.codecs import get_codec
from qf.runtime.kernels import cpu, cpu_amx_bf16

TYPES = cpu.supported_types()
FLOATS = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
EPS = float(np.finfo(np.float32).eps)

# Byte offsets (within one block) of the f16 scale fields, and the block span of each float element.
F16_FIELDS: dict[GGMLType, tuple[int, ...]] = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,), GGMLType.F16: (0,), GGMLType.BF16: (0,),
    GGMLType.IQ4_NL: (0,), GGMLType.IQ4_XS: (0,), GGMLType.IQ3_XXS: (0,), GGMLType.IQ3_S: (0,),
    GGMLType.IQ2_XXS: (0,), GGMLType.IQ2_XS: (0,), GGMLType.IQ2_S: (0,), GGMLType.IQ1_S: (0,),
    GGMLType.IQ1_M: (54,),  # d's top nibble is the top nibble of the fourth u16 scale (bytes 54-55)
}


def _n_in(t: GGMLType, blocks: int) -> int:
    """A row length of `blocks` blocks (float types: blocks * 32 + 5, to exercise the scalar tail)."""
    return blocks * 32 + 5 if t in FLOATS else blocks * block_size(t)


def _quantized(t: GGMLType, n_out: int, n_in: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(packed u8 [n_out, row_bytes], dequantized f32 [n_out, n_in]) of a random normal weight."""
    codec = get_codec(t)
    imp = np.ones(n_in, np.float32) if codec.strategy.requires_importance else None  # IQ1_S, IQ2_XXS, IQ2_XS
    data = codec.quantize((rng.standard_normal((n_out, n_in)) * 0.1).astype(np.float32), imp)
    return data, codec.dequantize(data)


def _random_bytes(t: GGMLType, n_out: int, n_in: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every bit pattern of the quant fields; scale fields kept finite (top exponent bit cleared)."""
    data = rng.integers(0, 256, size=(n_out, row_bytes(t, n_in)), dtype=np.uint8)
    blocks = data.reshape(n_out, -1, BLOCK[t][1])
    if t == GGMLType.F32:
        blocks[..., 3] &= 0xBF  # exponent < 128: |v| < 2
    for off in F16_FIELDS.get(t, ()):
        blocks[..., off + 1] &= 0xBF  # f16: exponent < 16 (subnormals kept); bf16: |v| < 2
    return data, get_codec(t).dequantize(data)


def _check_dot(y: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """y ~= x @ w.T within the f32 summation bound of the module docstring; w: [n_out, n_in], x: [..., n_in]."""
    w64 = w.astype(np.float64)
    x64 = x.astype(np.float64)
    ref = x64 @ w64.T
    n_in = w.shape[1]
    bound = (n_in / 16 + 8) * 2 * EPS * (np.abs(x64) @ np.abs(w64).T)
    bound += 4 * EPS * np.abs(w64).max(axis=1) * np.abs(x64).sum(axis=-1, keepdims=x.ndim > 1)
    err = np.abs(y.astype(np.float64) - ref)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.all(err <= bound + 1e-30), f"max err/bound {np.max(err / (bound + 1e-30)):.3g}"


def _check_matvec(m: cpu.QMatrix, x: np.ndarray, w: np.ndarray) -> None:
    """cpu.matvec(m, x) ~= w @ x: the f32 bound, or for cpu.INT8_DECODE_TYPES (8-bit activations, one Q8_0
    part) within the f32 summation bound of w @ the dequantized activations; x: [n_in], w: [n_out, n_in]."""
    y = cpu.matvec(m, x)
    if m.type not in cpu.INT8_DECODE_TYPES:
        return _check_dot(y, w, x)
    a = cpu.quantize_q8(x[None], 1).dequantize()[0].astype(np.float64)
    w64 = w.astype(np.float64)
    bound = (w.shape[1] / 32 + 4) * 2 * EPS * (np.abs(w64) @ np.abs(a))
    err = np.abs(y.astype(np.float64) - w64 @ a)
    assert y.shape == (w.shape[0],) and y.dtype == np.float32
    assert np.all(err <= bound + 1e-30), f"max err/bound {np.max(err / (bound + 1e-30)):.3g}"


def _check_rows(got: np.ndarray, want: np.ndarray) -> None:
    """Dequantized rows equal the codec's up to one rounding of the larger term per weight."""
    atol = 4 * EPS * np.abs(want).max(axis=-1, keepdims=True)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.all(np.abs(got - want) <= atol), f"max diff {np.abs(got - want).max():.3g}"


# ------------------------------------------------------------------------------ random weights


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matvec_random_weights(t: GGMLType) -> None:
    rng = np.random.default_rng(int(t))
    for n_out, blocks in ((1, 1), (7, 3), (67, 2), (130, 5)):
        n_in = _n_in(t, blocks)
        data, w = _quantized(t, n_out, n_in, rng)
        x = rng.standard_normal(n_in).astype(np.float32)
        _check_matvec(cpu.QMatrix(t, data, n_in, n_out), x, w)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_all_bit_patterns(t: GGMLType) -> None:
    """Random bytes: every quant value, negative and subnormal scales, through all three kernels."""
    rng = np.random.default_rng(100 + int(t))
    n_out, n_in = 45, _n_in(t, 3)
    data, w = _random_bytes(t, n_out, n_in, rng)
    m = cpu.QMatrix(t, data, n_in, n_out)
    x = rng.standard_normal((6, n_in)).astype(np.float32)
    _check_matvec(m, x[0], w)
    _check_dot(cpu.matmul(m, x), w, x)
    xb = rng.standard_normal((40, n_in)).astype(np.float32)
    _check_dot(cpu.matmul(m, xb, blas=True), w, xb)
    ids = np.array([44, 0, 7, 7, 30])
    _check_rows(cpu.get_rows(m, ids), w[ids])


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_token_counts(t: GGMLType) -> None:
    """M = 1..17 (full and partial groups of four tokens); a row depends on its token only, bit for bit."""
    rng = np.random.default_rng(200 + int(t))
    n_out, n_in = 131, _n_in(t, 2)
    data, w = _quantized(t, n_out, n_in, rng)
    m = cpu.QMatrix(t, data, n_in, n_out)
    x = rng.standard_normal((17, n_in)).astype(np.float32)
    for n_tok in (1, 2, 3, 4, 5, 8, 11, 17):
        y = cpu.matmul(m, x[:n_tok], int8=False)  # the f32 paths (the integer one: test_h4_int8.py)
        _check_dot(y, w, x[:n_tok])
    # Sums are never reordered: a token's result does not depend on the batch it came in.
    y = cpu.matmul(m, x, blas=False)
    for i in (1, 5, 16):
        assert np.array_equal(y[i], cpu.matmul(m, x[i:i + 1])[0])
        assert np.array_equal(y[i], cpu.matmul(m, x[i - 1:i + 2])[1])


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_blas_tiles(t: GGMLType) -> None:
    """Decoded tiles + BLAS (the large-M path): odd row counts, partial tiles, 1 and 2 threads, auto pick."""
    rng = np.random.default_rng(400 + int(t))
    n_tok = max(cpu.BLAS_MIN_TOKENS or 0, 33)
    before = cpu.get_threads()
    try:
        for n_out, blocks in ((1, 1), (37, 3), (203, 16)):  # 203 x 16 blocks: several tiles per thread
            n_in = _n_in(t, blocks if block_size(t) == 32 else max(1, blocks // 8))
            data, w = _quantized(t, n_out, n_in, rng)
            m = cpu.QMatrix(t, data, n_in, n_out)
            x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
            for n_threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
                cpu.set_threads(n_threads)
                y = cpu.matmul(m, x, blas=True)
                _check_dot(y, w, x)
                _check_dot(cpu.matmul(m, x[:2], blas=True), w, x[:2])
                if cpu.BLAS_MIN_TOKENS is not None:  # without the integer path, the default picks this one
                    assert np.array_equal(cpu.matmul(m, x, int8=False), y)
    finally:
        cpu.set_threads(before)


def test_matmul_without_blas_falls_back_to_the_fused_kernel(monkeypatch) -> None:
    from qf.runtime.kernels import cpu_blas

    rng = np.random.default_rng(13)
    t, n_out, n_in = GGMLType.Q4_1, 70, 128
    data, w = _quantized(t, n_out, n_in, rng)
    m = cpu.QMatrix(t, data, n_in, n_out)
    x = rng.standard_normal((48, n_in)).astype(np.float32)
    fused = cpu.matmul(m, x, blas=False)
    _check_dot(fused, w, x)
    monkeypatch.setattr(cpu_blas, "SGEMM", None)
    monkeypatch.setattr(cpu, "BLAS_MIN_TOKENS", None)
    monkeypatch.setattr(cpu, "INT8_MIN_TOKENS", None)
    monkeypatch.setattr(cpu_amx_bf16, "ENABLED", False)
    assert np.array_equal(cpu.matmul(m, x), fused)
    assert np.array_equal(cpu.matmul(m, x, blas=True), fused)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_get_rows(t: GGMLType) -> None:
    rng = np.random.default_rng(300 + int(t))
    n_out, n_in = 50, _n_in(t, 2)
    data, w = _quantized(t, n_out, n_in, rng)
    m = cpu.QMatrix(t, data, n_in, n_out)
    ids = np.array([3, 49, 0, 3], dtype=np.int32)
    _check_rows(cpu.get_rows(m, ids), w[ids])
    assert cpu.get_rows(m, np.array([], dtype=np.int64)).shape == (0, n_in)


@pytest.mark.parametrize("t", FLOATS, ids=lambda t: t.name)
def test_float_rows_shorter_than_a_unit(t: GGMLType) -> None:
    """Float rows need not be a multiple of 32: rows of 1 and 20 elements run on the scalar tail only."""
    rng = np.random.default_rng(7)
    for n_in in (1, 20):
        data, w = _quantized(t, 9, n_in, rng)
        m = cpu.QMatrix(t, data, n_in, 9)
        x = rng.standard_normal((3, n_in)).astype(np.float32)
        _check_matvec(m, x[0], w)
        _check_dot(cpu.matmul(m, x), w, x)
        _check_rows(cpu.get_rows(m, np.arange(9)), w)


def test_thread_count_does_not_change_results() -> None:
    """Each output is summed in the same order whatever the split over threads: results are identical."""
    rng = np.random.default_rng(11)
    t, n_out, n_in = GGMLType.Q4_0, 203, 256
    data, _ = _quantized(t, n_out, n_in, rng)
    m = cpu.QMatrix(t, data, n_in, n_out)
    x = rng.standard_normal((9, n_in)).astype(np.float32)
    before = cpu.get_threads()
    try:
        cpu.set_threads(1)
        one = cpu.matvec(m, x[0]), cpu.matmul(m, x)
        cpu.set_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        assert cpu.get_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
        two = cpu.matvec(m, x[0]), cpu.matmul(m, x)
    finally:
        cpu.set_threads(before)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


def test_out_buffer_and_input_conversion() -> None:
    rng = np.random.default_rng(12)
    t, n_out, n_in = GGMLType.Q8_0, 40, 64
    data, w = _quantized(t, n_out, n_in, rng)
    m = cpu.QMatrix(t, data, n_in, n_out)
    x = rng.standard_normal((3, n_in))  # f64, converted
    out = np.full((3, n_out), np.nan, np.float32)
    assert cpu.matmul(m, x, out=out) is out
    _check_dot(out, w, x.astype(np.float32))
    out = np.full((3, n_out), np.nan, np.float32)
    assert cpu.matmul(m, x, out=out, blas=True) is out
    _check_dot(out, w, x.astype(np.float32))
    xs = np.asfortranarray(x.astype(np.float32))  # non-contiguous rows
    _check_dot(cpu.matmul(m, xs), w, x.astype(np.float32))
    y = np.empty(n_out, np.float32)
    assert cpu.matvec(m, x[1, :], out=y) is y
    _check_dot(y, w, x[1].astype(np.float32))


# ------------------------------------------------------------------------------ the matrix wrapper


def test_qmatrix_is_a_read_only_view_of_the_data() -> None:
    data = np.zeros((4, row_bytes(GGMLType.Q4_0, 64)), np.uint8)
    m = cpu.QMatrix(GGMLType.Q4_0, data, 64, 4)
    assert np.shares_memory(m.data, data) and not m.data.flags.writeable
    assert data.flags.writeable  # the caller's array is untouched
    assert m.shape == (4, 64) and m.type is GGMLType.Q4_0
    assert np.array_equal(cpu.matvec(m, np.ones(64, np.float32)), np.zeros(4, np.float32))


@pytest.mark.parametrize("args, match", [
    ((GGMLType.Q4_0, np.zeros((4, 17), np.uint8), 32, 4), "shape"),
    ((GGMLType.Q4_0, np.zeros((4, 18), np.int8), 32, 4), "u8"),
    ((GGMLType.Q4_0, np.zeros((4, 18), np.uint8), 33, 4), "whole number"),
    ((GGMLType.Q4_0, np.zeros((4, 36), np.uint8)[:, ::2], 32, 4), "contiguous"),
    ((GGMLType.Q4_0, np.zeros((4, 0), np.uint8), 0, 4), "positive"),
    ((GGMLType.TQ2_0, np.zeros((4, 66), np.uint8), 256, 4), "no CPU kernel for TQ2_0"),
    ((99, np.zeros((4, 18), np.uint8), 32, 4), "unknown ggml type"),
])
def test_qmatrix_rejects_bad_arguments(args, match) -> None:
    with pytest.raises(cpu.KernelError, match=match):
        cpu.QMatrix(*args)


def test_bad_call_arguments_raise_kernel_errors() -> None:
    m = cpu.QMatrix(GGMLType.Q8_0, np.zeros((5, 34), np.uint8), 32, 5)
    with pytest.raises(cpu.KernelError, match="n_in=32"):
        cpu.matvec(m, np.zeros(31, np.float32))
    with pytest.raises(cpu.KernelError, match=r"\[M, n_in\]"):
        cpu.matmul(m, np.zeros(32, np.float32))
    with pytest.raises(cpu.KernelError, match="out must be"):
        cpu.matvec(m, np.zeros(32, np.float32), out=np.zeros(5, np.float64))
    with pytest.raises(cpu.KernelError, match="row id 5 out of range"):
        cpu.get_rows(m, np.array([0, 5]))
    with pytest.raises(cpu.KernelError, match="row id -1"):
        cpu.get_rows(m, np.array([-1]))
    with pytest.raises(cpu.KernelError, match="1-D integer"):
        cpu.get_rows(m, np.array([[0]]))
    with pytest.raises(cpu.KernelError, match="1-D integer"):
        cpu.get_rows(m, np.array([0.0]))
    with pytest.raises(cpu.KernelError, match="thread count"):
        cpu.set_threads(0)
    assert isinstance(cpu.KernelError("x"), ValueError)


# ------------------------------------------------------------------------------ real model tensors


def _check_real_tensor(f, name: str, rng: np.random.Generator, n_rows: int | None = None) -> None:
    """matvec / matmul / get_rows on a real mapped tensor against f.dequantize (first n_rows rows)."""
    ti = f.tensors[name]
    n_out, n_in = ti.shape
    raw = f.raw(name)
    if n_rows is not None:
        n_out, raw = n_rows, raw[:n_rows]
    w = get_codec(ti.type).dequantize(raw)
    m = cpu.QMatrix(ti.type, raw, n_in, n_out)
    assert np.shares_memory(m.data, raw)
    x = rng.standard_normal((5, n_in)).astype(np.float32)
    _check_matvec(m, x[0], w)
    _check_dot(cpu.matmul(m, x), w, x)
    xb = rng.standard_normal((48, n_in)).astype(np.float32)
    _check_dot(cpu.matmul(m, xb, blas=True), w, xb)  # the decoded-tiles + BLAS path
    if ti.type in cpu.int8_types():  # the integer path: against the f64 product of what it reads
        from test_h4_int8 import _check_q8_matmul

        xq = cpu.quantize_q8(xb)
        _check_q8_matmul(cpu.matmul(m, xb, int8=True), m, xq)
    ids = rng.integers(0, n_out, 6)
    _check_rows(cpu.get_rows(m, ids), w[ids])


@pytest.mark.slow
def test_real_smollm2_tensors(smollm2_gguf) -> None:
    from qf.format.reader import open_gguf

    rng = np.random.default_rng(21)
    with open_gguf(smollm2_gguf) as f:
        for name in ("blk.0.ffn_down.weight", "blk.0.ffn_up.weight", "blk.3.attn_k.weight",
                     "blk.29.attn_output.weight"):
            assert f.tensors[name].type == GGMLType.Q4_1
            _check_real_tensor(f, name, rng)
        assert f.tensors["token_embd.weight"].type == GGMLType.Q8_0
        _check_real_tensor(f, "token_embd.weight", rng, n_rows=8192)


@pytest.mark.slow
def test_real_gemma3_tensors(gemma3_gguf) -> None:
    """One tensor of each type in Gemma 3 270M Q4_K_M: Q4_K, Q6_K, Q5_0, Q8_0 (embedding: 4096 rows)."""
    from qf.format.reader import open_gguf

    rng = np.random.default_rng(22)
    with open_gguf(gemma3_gguf) as f:
        seen: set[GGMLType] = set()
        for name, ti in f.tensors.items():
            if len(ti.ne) == 2 and ti.type not in seen and ti.type != GGMLType.F32:
                seen.add(ti.type)
                _check_real_tensor(f, name, rng, n_rows=min(ti.shape[0], 4096))
        assert {GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q5_0, GGMLType.Q8_0} <= seen
