"""Repacked integer panels (kernels/cpu_repack.py) against the integer matmul they store and the f32 paths.

1. `cpu_repack.matmul` equals `cpu.matmul_q8` on the same quantized activations bit for bit, for every type,
   M = 1..130, rows that are not a multiple of the 16-row panel; matmul_q8 itself is checked against the
   numpy reference in test_h4_int8.py, so this chains to it. The reference check is repeated here directly.
2. A row does not depend on the batch, its position in a tile of 4, or the thread count.
3. The RAM figure `repack_bytes` is what `repack` allocates; Q4_0 / Q8_0 / Q4_1 take no more than the file.
4. Whole model: SmolLM2 Q4_K_M with repacked weights (decode and prefill) against the f32 decode path, KLD
   <= 1e-4 (needs the cached bench file; skipped otherwise).
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pytest

from qf.format.ggml_types import GGMLType, row_bytes
from qf.runtime.kernels import cpu, cpu_amx, cpu_repack
from test_h4_int8 import _check_q8_matmul, _n_in
from test_kernels_cpu import _quantized, _random_bytes

TYPES = [t for t in cpu.int8_types() if t.name.startswith("Q")]  # legacy and K-quants (IQ types: not repacked)
TOKEN_COUNTS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 130)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_repacked_equals_matmul_q8(t: GGMLType) -> None:
    """Bit for bit matmul_q8 (and within the f64 reference bound) for every M and odd row counts."""
    rng = np.random.default_rng(500 + int(t))
    x = rng.standard_normal((max(TOKEN_COUNTS), _n_in(t, 12))).astype(np.float32)
    for n_out in (1, 17, 37):
        data, _ = _quantized(t, n_out, x.shape[1], rng)
        w = cpu.QMatrix(t, data, x.shape[1], n_out)
        r = cpu_repack.repack(w)
        assert r.nbytes == cpu_repack.repack_bytes(t, w.n_in, w.n_out)
        for n_tok in TOKEN_COUNTS:
            xq = cpu.quantize_q8(x[:n_tok])
            y = cpu_repack.matmul(r, x[:n_tok])
            assert np.array_equal(y, cpu.matmul_q8(w, xq)), (t.name, n_out, n_tok)
            if n_tok in (1, 5, 33):
                _check_q8_matmul(y, w, xq)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_one_part_equals_matmul_q8(t: GGMLType) -> None:
    """MergedCall(parts=1) (ggml's Q8_0 activations) equals matmul_q8 on one-part activations, every tile path."""
    rng = np.random.default_rng(520 + int(t))
    n_in = _n_in(t, 8)
    data, _ = _quantized(t, 37, n_in, rng)
    w = cpu.QMatrix(t, data, n_in, 37)
    call = cpu_repack.MergedCall([cpu_repack.repack(w)], parts=1)
    x = rng.standard_normal((49, n_in)).astype(np.float32)
    for n_tok in (1, 5, 16, 35, 49):
        assert np.array_equal(call(x[:n_tok])[0], cpu.matmul_q8(w, cpu.quantize_q8(x[:n_tok], 1))), n_tok
    with pytest.raises(cpu_repack.RepackError, match="1 or 2"):
        cpu_repack.MergedCall([cpu_repack.repack(w)], parts=3)


@pytest.mark.skipif(not cpu_amx.supported(), reason="needs AMX-INT8 (and the kernel's permission)")
@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("parts", (1, 2))
def test_amx_tiles_equal_the_vnni_tiles(t: GGMLType, parts: int) -> None:
    """The AMX groups of 16 tokens (one-scale types) give the VNNI tiles' bits (a stamp without AMX runs the
    same panels through rtile1 only)."""
    rng = np.random.default_rng(540 + int(t) + parts)
    n_in = _n_in(t, 10)
    r = cpu_repack.repack(cpu.QMatrix(t, _quantized(t, 35, n_in, rng)[0], n_in, 35))
    tiles, plain = cpu_repack._Stamp(parts, True), cpu_repack._Stamp(parts, False)
    for n_tok in (16, 31, 64):
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        none = cpu_repack._none(r.panels)
        args = (r.base.kind, cpu.ISA, r.panels, none, none, r.n_out, 0, 0, x, 2)
        got = cpu_repack.matmul_kernel(tiles, *args)[0]
        assert np.array_equal(got, cpu_repack.matmul_kernel(plain, *args)[0]), n_tok


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
def test_repacked_bit_patterns(t: GGMLType) -> None:
    """Every quant bit pattern (scales finite), activations of very different sizes per block."""
    rng = np.random.default_rng(600 + int(t))
    n_out, n_in = 45, _n_in(t, 24)
    data, _ = _random_bytes(t, n_out, n_in, rng)
    w = cpu.QMatrix(t, data, n_in, n_out)
    x = (rng.standard_normal((9, n_in)) * np.exp(rng.uniform(-6, 6, (9, n_in // 32))).repeat(32, 1)).astype(np.float32)
    y = cpu_repack.matmul(cpu_repack.repack(w), x)
    xq = cpu.quantize_q8(x)
    assert np.array_equal(y, cpu.matmul_q8(w, xq))
    _check_q8_matmul(y, w, xq)


def test_rows_do_not_depend_on_the_batch_or_threads() -> None:
    """A row is the same alone (a decode step), in a tile of 4, in the tail, whatever the thread count."""
    rng = np.random.default_rng(7)
    t, n_out, n_in = GGMLType.Q4_0, 203, 512
    w = cpu.QMatrix(t, _quantized(t, n_out, n_in, rng)[0], n_in, n_out)
    r = cpu_repack.repack(w)
    x = rng.standard_normal((37, n_in)).astype(np.float32)
    before = cpu.get_threads()
    try:
        cpu.set_threads(1)
        one = cpu_repack.matmul(r, x)
        cpu.set_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = cpu_repack.matmul(r, x)
    finally:
        cpu.set_threads(before)
    assert np.array_equal(one, two)
    for i in (0, 5, 36):
        assert np.array_equal(one[i], cpu_repack.matmul(r, x[i:i + 1])[0])
        assert np.array_equal(one[i], cpu_repack.matmul(r, x[max(0, i - 2):i + 3])[min(i, 2)])


def test_matmul_many_equals_each_matmul() -> None:
    """Merged products (Q, K, V of one type and a second type) equal the single ones, M = 1 included."""
    rng = np.random.default_rng(8)
    n_in = 256
    ws = [cpu.QMatrix(t, _quantized(t, n, n_in, rng)[0], n_in, n)
          for t, n in ((GGMLType.Q4_K, 64), (GGMLType.Q4_K, 16), (GGMLType.Q6_K, 16), (GGMLType.Q4_K, 33),
                       (GGMLType.Q4_K, 5))]
    rs = [cpu_repack.repack(w) for w in ws]
    for n_tok in (1, 3, 17):
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        for r, y in zip(rs, cpu_repack.matmul_many(rs, x)):
            assert np.array_equal(y, cpu_repack.matmul(r, x))


def test_compact_layouts_cost_no_more_than_the_file() -> None:
    """Q4_0, Q4_1 and Q8_0 panels (nibbles or bytes, f16 scales, derived offsets) take the file's bytes."""
    n_in, n_out = 4096, 4096
    for t in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0):
        assert cpu_repack.repack_bytes(t, n_in, n_out) == n_out * row_bytes(t, n_in), t.name
    assert cpu_repack.repack_bytes(GGMLType.F16, n_in, n_out) == 0


def test_refuses_what_it_cannot_repack() -> None:
    """Float types and wrong shapes give clear errors."""
    f16 = cpu.QMatrix(GGMLType.F16, np.zeros((2, 64), np.uint8), 32, 2)
    with pytest.raises(cpu_repack.RepackError, match="F16"):
        cpu_repack.repack(f16)
    w = cpu.QMatrix(GGMLType.Q4_0, np.zeros((2, 18), np.uint8), 32, 2)
    with pytest.raises(cpu_repack.RepackError, match="n_in=32"):
        cpu_repack.matmul(cpu_repack.repack(w), np.zeros((1, 64), np.float32))


SMOLLM2_Q4_K_M = Path.home() / ".cache" / "qf" / "bench" / "smollm2-135m-q4_k_m.qf"


@pytest.mark.skipif(not SMOLLM2_Q4_K_M.is_file(), reason="needs the cached SmolLM2 Q4_K_M bench file")
def test_whole_model_kld_against_the_f32_path() -> None:
    """SmolLM2 Q4_K_M: logits of repacked decode steps and a repacked prefill against f32 decode steps."""
    from qf.runtime import Model
    from qf.runtime.backend import CpuBackend

    ids = list(np.random.default_rng(9).integers(100, 40000, 48))

    def logp(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float64)
        a -= a.max(axis=-1, keepdims=True)
        return a - np.log(np.exp(a).sum(axis=-1, keepdims=True))

    def steps(model: Model) -> np.ndarray:
        eng = model.engine
        eng.cache.clear()
        return np.stack([eng.step(int(t)) for t in ids])

    with Model.load(SMOLLM2_Q4_K_M, n_ctx=64, n_threads=2, cpu_backend=CpuBackend(2)) as base:
        ref = logp(steps(base))
    be = CpuBackend(2, repack=True)
    with Model.load(SMOLLM2_Q4_K_M, n_ctx=64, n_threads=2, cpu_backend=be) as packed:
        assert be.repacked_bytes > 0
        for got in (steps(packed), packed.logits(ids)):
            lp = logp(got)
            kld = float(np.mean(np.sum(np.exp(ref) * (ref - lp), axis=-1)))
            assert kld <= 1e-4, kld
            assert np.mean(np.argmax(lp, -1) == np.argmax(ref, -1)) >= 0.95
