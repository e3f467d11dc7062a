"""Prefill products on AMX-BF16 tiles (kernels/cpu_amx_bf16.py) against numpy's float64 product.

1. The kernel, for types of each decoder family (legacy, K, IQ, float), rows that are not a multiple of the 16-row
   panel, rows longer than a chunk of inputs and M = 1..130, is within 2^-15 of sum |w x| of the float64 product
   of the dequantized weight (its error budget is about 2^-16 per product plus f32 sums; the integer path's two
   8-bit parts are ~2^-15 of a block's largest activation).
2. The split halves give back every activation within 2^-17 of its magnitude (hi alone: the nearest bf16);
   padding rows are zero.
3. `cpu.matmul` and `cpu.matmul_many` take the tiles from MIN_TOKENS tokens and agree bit for bit; a row
   does not depend on the batch or the thread count; QF_AMX=0 turns the tiles off.
4. A repacking backend runs prefill on the tiles and decode steps on its panels.
5. Whole model: SmolLM2 Q4_K_M prefill on the tiles against the f32 decode path, KLD <= 1e-6.

Skipped where the host or numba's target lacks AMX-BF16 (CI hosts without it run the integer path).
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pytest

from qf.format.ggml_types import GGMLType
from qf.runtime.kernels import cpu, cpu_amx_bf16
from test_kernels_cpu import _quantized, _random_bytes

pytestmark = pytest.mark.skipif(not cpu_amx_bf16.ENABLED, reason="needs AMX-BF16 tiles (and the kernel's permission)")

# one or two of each decoder family (the kernel reads every type through the same decoders as the f32 kernels,
# tested per type in test_kernels_cpu.py; each type here compiles its own tile kernel, ~5 s)
TYPES = (GGMLType.Q4_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.IQ4_XS, GGMLType.IQ2_XXS, GGMLType.F16)
TOKEN_COUNTS = (1, 2, 15, 16, 17, 31, 32, 33, 64, 130)


def _n_in(t: GGMLType) -> int:
    """A row length the type allows: two K-quant superblocks, else 96 (three tile steps)."""
    return 512 if t.name[-2:] in ("_K", "XS", "XXS") or t.name.startswith("IQ3") else 96


def _tiles(w: cpu.QMatrix, x: np.ndarray, n_threads: int = 2) -> np.ndarray:
    """x @ w.T straight from the kernel."""
    m = x.shape[0]
    y = np.full((m, w.n_out), np.nan, np.float32)
    none = np.empty((m, 0), np.float32)
    ah, al = cpu_amx_bf16.split(x)
    cpu_amx_bf16.matmul_kernel(w.kind, w.data, w.data[:0], w.data[:0], ah, al, m, y, none, none, n_threads)
    return y


def _check(y: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """|y - x @ w.T| <= 2^-15 sum |w x| (float64 reference), and y finite."""
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = np.abs(x).astype(np.float64) @ np.abs(w.T).astype(np.float64)
    assert np.isfinite(y).all()
    err = np.abs(y - ref)
    assert (err <= 2.0 ** -15 * bound + 1e-30).all(), float(np.max(err / np.maximum(bound, 1e-30)))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_tiles_against_float64(t: GGMLType) -> None:
    rng = np.random.default_rng(int(t))
    n_in, n_out = _n_in(t), 37
    data, w = _quantized(t, n_out, n_in, rng)
    m = cpu.QMatrix(t, data, n_in, n_out)
    for n_tok in TOKEN_COUNTS:
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        x[:, 3] *= 40.0  # an outlier channel, as real activations have
        _check(_tiles(m, x), w, x)


@pytest.mark.parametrize("t", (GGMLType.Q4_0, GGMLType.Q6_K, GGMLType.F16), ids=lambda t: t.name)
def test_tiles_on_every_bit_pattern(t: GGMLType) -> None:
    """Random bytes in every quant field (finite scales): still within the bound."""
    rng = np.random.default_rng(5)
    n_in = _n_in(t)
    data, w = _random_bytes(t, 48, n_in, rng)
    x = rng.standard_normal((33, n_in)).astype(np.float32)
    _check(_tiles(cpu.QMatrix(t, data, n_in, 48), x), w, x)


def test_rows_past_a_chunk() -> None:
    """Rows longer than CHUNK_STEPS tile steps keep their partial sums between chunks (cacc)."""
    rng = np.random.default_rng(7)
    n_in = cpu_amx_bf16.STEP * (cpu_amx_bf16.CHUNK_STEPS + 3)
    data, w = _quantized(GGMLType.Q4_0, 21, n_in, rng)
    x = rng.standard_normal((40, n_in)).astype(np.float32)
    _check(_tiles(cpu.QMatrix(GGMLType.Q4_0, data, n_in, 21), x), w, x)


def test_split_halves() -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((19, 64)) * np.logspace(-30, 30, 64)).astype(np.float32)
    ah, al = cpu_amx_bf16.split(x)
    assert ah.shape == al.shape == (32, 64)
    assert not ah[19:].any() and not al[19:].any()

    def value(b: np.ndarray) -> np.ndarray:
        return (b.astype(np.uint32) << 16).view(np.float32)

    hi, lo = value(ah[:19]), value(al[:19])
    assert (np.abs(hi - x) <= 2.0 ** -8 * np.abs(x)).all()  # hi: x to the nearest bf16
    assert (np.abs(hi.astype(np.float64) + lo - x) <= 2.0 ** -17 * np.abs(x)).all()


def test_matmul_takes_the_tiles_and_matmul_many_agrees() -> None:
    rng = np.random.default_rng(3)
    mats, refs = [], []
    for t, n_out in ((GGMLType.Q4_0, 80), (GGMLType.Q4_0, 24), (GGMLType.Q8_0, 50), (GGMLType.Q4_0, 40)):
        data, w = _quantized(t, n_out, 128, rng)
        mats.append(cpu.QMatrix(t, data, 128, n_out))
        refs.append(w)
    x = rng.standard_normal((cpu_amx_bf16.MIN_TOKENS + 5, 128)).astype(np.float32)
    singles = [cpu.matmul(m, x) for m in mats]
    for y, m, w in zip(singles, mats, refs):
        assert np.array_equal(y, _tiles(m, x))  # matmul ran the tiles
        _check(y, w, x)
    for y, s in zip(cpu.matmul_many(mats, x), singles):
        assert np.array_equal(y, s)
    short = x[:cpu_amx_bf16.MIN_TOKENS - 1]
    assert not np.array_equal(cpu.matmul(mats[0], short), _tiles(mats[0], short))  # below: the other paths


def test_rows_do_not_depend_on_the_batch_or_threads() -> None:
    rng = np.random.default_rng(4)
    data, _ = _quantized(GGMLType.Q4_K, 70, 256, rng)
    m = cpu.QMatrix(GGMLType.Q4_K, data, 256, 70)
    x = rng.standard_normal((130, 256)).astype(np.float32)
    full = _tiles(m, x, 2)
    assert np.array_equal(_tiles(m, x, 1), full)
    assert np.array_equal(_tiles(m, x[57:90], 2), full[57:90])


def test_qf_amx_0_turns_the_tiles_off(monkeypatch) -> None:
    monkeypatch.setenv("QF_AMX", "0")
    assert not cpu_amx_bf16.enabled()
    monkeypatch.delenv("QF_AMX")
    assert cpu_amx_bf16.enabled()


def test_repacking_backend_prefills_on_the_tiles() -> None:
    from qf.runtime.backend import CpuBackend

    rng = np.random.default_rng(6)
    data, w = _quantized(GGMLType.Q4_0, 64, 128, rng)
    m = cpu.QMatrix(GGMLType.Q4_0, data, 128, 64)
    be = CpuBackend(2, repack=True)
    x = rng.standard_normal((cpu_amx_bf16.MIN_TOKENS_REPACKED, 128)).astype(np.float32)
    assert np.array_equal(be.linear(m, x), _tiles(m, x))
    assert np.array_equal(be.linears([m, m], x, [None, None])[1], _tiles(m, x))
    assert be.repacked_bytes == 0  # nothing repacked yet
    shorter = x[:cpu_amx_bf16.MIN_TOKENS_REPACKED - 1]  # the repacked panels win below: built on first use
    assert not np.array_equal(be.linear(m, shorter), _tiles(m, shorter))
    assert be.repacked_bytes > 0
    assert np.allclose(be.linear(m, x[:1]), x[:1] @ w.T, rtol=1e-3, atol=1e-3)  # a decode step: the panels


SMOLLM2_Q4_K_M = Path.home() / ".cache" / "qf" / "bench" / "smollm2-135m-q4_k_m.qf"


@pytest.mark.skipif(not SMOLLM2_Q4_K_M.is_file(), reason="needs the cached SmolLM2 Q4_K_M bench file")
def test_whole_model_kld_against_the_f32_path() -> None:
    """SmolLM2 Q4_K_M: logits of a prefill on the tiles against f32 decode steps."""
    from qf.runtime import Model
    from qf.runtime.backend import CpuBackend

    ids = list(np.random.default_rng(9).integers(100, 40000, cpu_amx_bf16.MIN_TOKENS + 16))

    def logp(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float64)
        a -= a.max(axis=-1, keepdims=True)
        return a - np.log(np.exp(a).sum(axis=-1, keepdims=True))

    with Model.load(SMOLLM2_Q4_K_M, n_ctx=128, n_threads=2, cpu_backend=CpuBackend(2)) as model:
        eng = model.engine
        eng.cache.clear()
        ref = logp(np.stack([eng.step(int(t)) for t in ids]))
        got = logp(model.logits(ids))
    kld = float(np.mean(np.sum(np.exp(ref) * (ref - got), axis=-1)))
    print(f"KLD of the tiles' prefill against f32 decode steps: {kld:.3g}")
    assert kld <= 1e-6, kld
    assert np.array_equal(np.argmax(got, -1), np.argmax(ref, -1))
