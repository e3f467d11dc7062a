"""CPU kernels of the nine IQ types against gguf.quants.dequantize (not our codecs) on random bytes:
rows bit for bit, products within the f32 summation bound of test_kernels_cpu, batched rows equal to each
row alone, the integer prefill form (w = s q + m) equal to the reference, and hostile bytes (NaN and
infinite scales, every index and sign bit) through every kernel, reading nothing outside the tables."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import quants as gq
from test_h4_int8 import _check_q8_matmul
from test_kernels_cpu import _check_dot

from qf.format.ggml_types import GGMLType, block_size, row_bytes, type_size
from qf.runtime.backend import CpuBackend
from qf.runtime.kernels import cpu
from qf.runtime.kernels.cpu_iq_grids import SIZES, tables

IQ = [GGMLType.IQ4_NL, GGMLType.IQ4_XS, GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ2_XXS, GGMLType.IQ2_XS,
      GGMLType.IQ2_S, GGMLType.IQ1_S, GGMLType.IQ1_M]
EPS = float(np.finfo(np.float32).eps)
# byte of each block holding the top exponent bit of its f16 scale (bit 6); IQ1_M spreads d over 4 nibbles
SCALE_HI = {t: 1 for t in IQ} | {GGMLType.IQ1_M: 55}


def _ref(t: GGMLType, data: np.ndarray) -> np.ndarray:
    """gguf-py's dequantization of packed rows u8 [n_out, row_bytes] -> f32 [n_out, n_in]."""
    with np.errstate(invalid="ignore", over="ignore"):
        return gq.dequantize(data, gguf.GGMLQuantizationType[t.name]).reshape(data.shape[0], -1)


def _bytes(t: GGMLType, n_out: int, n_in: int, rng: np.random.Generator, finite: bool = True) -> np.ndarray:
    """Random packed rows: every index, sign and scale bit; finite: f16 scales below 2 (no inf/NaN)."""
    data = rng.integers(0, 256, (n_out, row_bytes(t, n_in)), dtype=np.uint8)
    if finite:
        data.reshape(n_out, -1, type_size(t))[..., SCALE_HI[t]] &= 0xBF
    return data


def test_grid_tables_have_the_sizes_the_index_masks_assume() -> None:
    for name, (n, width) in SIZES.items():
        assert tables()[name].shape == (n * width,)
    assert set(IQ) <= set(cpu.supported_types()) and set(IQ) <= set(cpu.int8_types())


@pytest.mark.parametrize("t", IQ, ids=lambda t: t.name)
def test_rows_products_and_batches(t: GGMLType) -> None:
    rng = np.random.default_rng(int(t))
    for n_out, blocks in ((1, 1), (37, 2), (70, 3)):
        n_in = blocks * 256
        data = _bytes(t, n_out, n_in, rng)
        ref = _ref(t, data)
        m = cpu.QMatrix(t, data, n_in, n_out)
        np.testing.assert_array_equal(cpu.get_rows(m, np.arange(n_out)), ref)
        x = rng.standard_normal((9, n_in)).astype(np.float32)
        fused = cpu.matmul(m, x, blas=False)
        _check_dot(fused, ref, x)
        alone = np.stack([cpu.matvec(m, xi) for xi in x])
        if t in cpu.INT8_DECODE_TYPES:  # decode on 8-bit activations: within bound of the quantized product
            from test_iq_decode import _check as _check_q8_row
            for xi, yi in zip(x, alone):
                _check_q8_row(yi, ref, cpu.quantize_q8(xi[None], 1))
            fused = CpuBackend(1).linear(m, x, exact_rows=True)  # a multi-sequence decode step
        else:
            _check_dot(alone[0], ref, x[0])
        np.testing.assert_array_equal(fused, alone)  # batch = alone
        xb = rng.standard_normal((40, n_in)).astype(np.float32)
        _check_dot(cpu.matmul(m, xb, blas=True, int8=False), ref, xb)


@pytest.mark.parametrize("t", IQ, ids=lambda t: t.name)
def test_integer_form_is_the_reference(t: GGMLType) -> None:
    """unpack_int8 (w = s q + m, what the integer prefill reads) equals gguf's values; matmul_q8 within bound."""
    rng = np.random.default_rng(300 + int(t))
    n_out, n_in = 21, 512
    data = _bytes(t, n_out, n_in, rng)
    want = _ref(t, data)
    w = cpu.QMatrix(t, data, n_in, n_out)
    q, s, m = cpu.unpack_int8(w)
    per = n_in // s.shape[1]
    assert per == 32 // cpu.IDECODERS[t].subs
    sq = q.reshape(n_out, -1, per) * s[..., None].astype(np.float64)
    got = (sq + m[..., None]).reshape(n_out, n_in)
    np.testing.assert_array_equal(got, want)  # every product and sum here is exact
    for parts in (1, 2):
        for n_tok in (1, 5, 33):
            x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
            xq = cpu.quantize_q8(x, parts)
            _check_q8_matmul(cpu.matmul_q8(w, xq), w, xq)


@pytest.mark.parametrize("t", IQ, ids=lambda t: t.name)
def test_hostile_bytes_through_every_kernel(t: GGMLType) -> None:
    """Arbitrary bytes (NaN / infinite scales too): every kernel runs, rows equal gguf's (NaN where it has NaN)."""
    rng = np.random.default_rng(900 + int(t))
    n_out, n_in = 33, 2 * block_size(t) * (256 // block_size(t))
    data = _bytes(t, n_out, n_in, rng, finite=False)
    data[:, :2] = 0xFF  # first block: every index and sign bit set, scale NaN
    ref = _ref(t, data)
    m = cpu.QMatrix(t, data, n_in, n_out)
    np.testing.assert_array_equal(cpu.get_rows(m, np.arange(n_out)), ref)
    x = rng.standard_normal((40, n_in)).astype(np.float32)
    want = np.where(np.isfinite(ref), ref, 0).astype(np.float64) @ x.T.astype(np.float64)  # [n_out, 40]
    bad = ~np.isfinite(ref).all(axis=1)
    for y in (cpu.matvec(m, x[0])[:, None], cpu.matmul(m, x[:5], blas=False).T, cpu.matmul(m, x, blas=True).T,
              cpu.matmul_q8(m, cpu.quantize_q8(x)).T):
        assert y.shape[0] == n_out
        assert np.all(np.isnan(y[bad]) | np.isinf(y[bad]))  # a NaN or infinite weight poisons its row only
        ok = np.abs(y[~bad] - want[~bad, :y.shape[1]])
        assert np.all(ok <= 1e-2 * (np.abs(ref[~bad]).sum(1, keepdims=True) * np.abs(x).max() + 1))


@pytest.mark.parametrize("t", IQ, ids=lambda t: t.name)
def test_torch_dequant_of_hostile_bytes(t: GGMLType) -> None:
    """The torch backend's dequantization of arbitrary bytes (every index, sign and scale pattern, NaN and
    infinite scales): the values of gguf.quants, NaN where it has NaN."""
    torch = pytest.importorskip("torch")
    from qf.runtime.kernels import torch_dequant as tq

    rng = np.random.default_rng(1900 + int(t))
    data = _bytes(t, 17, 512, rng, finite=False)
    data[:, :2] = 0xFF
    got = tq.dequantize(tq.pack(t, data, 512, "cpu")).numpy()
    np.testing.assert_array_equal(got, _ref(t, data))
    assert torch.is_tensor(tq.dequantize_t(tq.pack(t, data[:1], 512, "cpu"), dtype=torch.float16))
