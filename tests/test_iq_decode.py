"""The integer decode matvec of the IQ types (cpu_iq_dot.py) against gguf.quants' dequantization (not our
codecs) times the dequantized 8-bit activations, in f64: each unit's integer sum is exact, then one f32
rounding of its scaling and one of each accumulation, so |y - ref| <= (units + 4) 2 eps sum |w| |a|. Also:
the forms' assumptions (grid bytes >= 0; w = s (q - 128)), hostile bytes (NaN / infinite scales, every index
and sign bit: NaN rows stay NaN, the others within the bound, no read outside the tables), thread-count
independence, and bad input."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from test_iq_kernels import _bytes, _ref

from qf.format.ggml_types import GGMLType
from qf.runtime.kernels import cpu, cpu_iq_dot as D
from qf.runtime.kernels.cpu_iq_grids import tables

EPS = float(np.finfo(np.float32).eps)
# two 8-bit parts compile a second kernel: checked on one type of each form (signed; q + 128)
PARTS = {t: (1, 2) if t in (GGMLType.IQ3_S, GGMLType.IQ4_XS) else (1,) for t in D.TYPES}
GRIDS = {GGMLType.IQ3_S: "iq3s", GGMLType.IQ3_XXS: "iq3xxs", GGMLType.IQ2_XXS: "iq2xxs", GGMLType.IQ2_XS: "iq2xs",
         GGMLType.IQ2_S: "iq2s"}


def _check(y: np.ndarray, wref: np.ndarray, xq: cpu.Q8Activations) -> None:
    """y within the bound of the f64 product of the reference rows and the dequantized activations."""
    a = xq.dequantize()[0]
    ok = np.isfinite(wref).all(axis=1)
    w = np.where(ok[:, None], wref, 0).astype(np.float64)
    ref = w @ a
    bound = (wref.shape[1] / 32 + 4) * 2 * EPS * (np.abs(w) @ np.abs(a))
    assert y.dtype == np.float32 and y.shape == (wref.shape[0],)
    err = np.abs(y[ok].astype(np.float64) - ref[ok])
    assert np.all(err <= bound[ok] + 1e-30), f"max err/bound {np.max(err / (bound[ok] + 1e-30)):.3g}"
    assert np.all(~np.isfinite(y[~ok]))  # a NaN or infinite weight poisons its row only


@pytest.mark.parametrize("t", D.TYPES, ids=lambda t: t.name)
def test_matvec_q8_against_gguf(t: GGMLType) -> None:
    rng = np.random.default_rng(40 + int(t))
    for n_out, n_in in ((1, 256), (37, 512), (19, 768)):
        data = _bytes(t, n_out, n_in, rng)
        w = cpu.QMatrix(t, data, n_in, n_out)
        x = (rng.standard_normal(n_in) * rng.uniform(0.1, 10)).astype(np.float32)
        for parts in PARTS[t]:
            xq = cpu.quantize_q8(x[None], parts)
            _check(D.matvec_q8(w, xq), _ref(t, data), xq)
        _check(D.matvec_int(w, x), _ref(t, data), cpu.quantize_q8(x[None], 1))  # quantizes as quantize_q8


@pytest.mark.parametrize("t", D.TYPES, ids=lambda t: t.name)
def test_hostile_bytes(t: GGMLType) -> None:
    rng = np.random.default_rng(700 + int(t))
    n_out, n_in = 33, 512
    data = _bytes(t, n_out, n_in, rng, finite=False)
    data[:, :2] = 0xFF  # first block: every index and sign bit set, scale NaN
    w = cpu.QMatrix(t, data, n_in, n_out)
    xq = cpu.quantize_q8(rng.standard_normal((1, n_in)).astype(np.float32), 1)
    with np.errstate(invalid="ignore", over="ignore"):
        _check(D.matvec_q8(w, xq), _ref(t, data), xq)


def test_form_assumptions() -> None:
    """The signed form reads grid bytes as unsigned magnitudes; the q + 128 form assumes m = -128 s."""
    for t, name in GRIDS.items():
        assert t in D.SIGNED and tables()[name].view(np.int8).min() >= 0
    rng = np.random.default_rng(5)
    for t in D.TYPES:
        q, s, m = cpu.unpack_int8(cpu.QMatrix(t, _bytes(t, 3, 256, rng), 256, 3))
        np.testing.assert_array_equal(m, np.float32(-128) * s)


def test_threads_do_not_change_results() -> None:
    rng = np.random.default_rng(9)
    t = GGMLType.IQ3_S
    w = cpu.QMatrix(t, _bytes(t, 70, 512, rng), 512, 70)
    xq = cpu.quantize_q8(rng.standard_normal((1, 512)).astype(np.float32), 1)
    n = cpu.get_threads()
    try:
        cpu.set_threads(1)
        one = D.matvec_q8(w, xq)
        cpu.set_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        np.testing.assert_array_equal(D.matvec_q8(w, xq), one)
    finally:
        cpu.set_threads(n)


def test_bad_input() -> None:
    t = GGMLType.IQ3_S
    w = cpu.QMatrix(t, np.zeros((2, 110), np.uint8), 256, 2)
    with pytest.raises(cpu.KernelError, match="one token"):
        D.matvec_q8(w, cpu.quantize_q8(np.ones((2, 256), np.float32), 1))
    k = cpu.QMatrix(GGMLType.Q4_K, np.zeros((2, 144), np.uint8), 256, 2)
    with pytest.raises(cpu.KernelError, match="integer matvec computes"):
        D.matvec_q8(k, cpu.quantize_q8(np.ones((1, 256), np.float32), 1))
