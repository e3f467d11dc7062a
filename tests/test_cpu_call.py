"""cpu_call.entry_point: the compiled code it returns computes what the dispatcher computes, and the kernels
that use it (merged repacked products, matvec) agree with their dispatcher calls bit for bit."""

from __future__ import annotations

import numba
import numpy as np

from qf.format.ggml_types import GGMLType
from qf.quant.codecs import get_codec
from qf.runtime.kernels import cpu, cpu_repack
from qf.runtime.kernels.cpu_call import entry_point
from qf.runtime.kernels.cpu_drivers import matvec_kernel


@numba.njit(cache=False)
def _axpy(a, x, y):
    """y += a * x."""
    for i in range(x.shape[0]):
        y[i] += a * x[i]


def test_entry_point_computes_what_the_dispatcher_does() -> None:
    """Same result through the entry point as through the dispatcher, compiled on demand."""
    x = np.arange(5, dtype=np.float32)
    y1, y2 = np.ones(5, np.float32), np.ones(5, np.float32)
    run = entry_point(_axpy, (2.0, x, y1))
    assert run is not _axpy
    run(2.0, x, y1)
    _axpy(2.0, x, y2)
    assert np.array_equal(y1, y2) and y1[4] == 9.0


def test_plain_function_falls_back() -> None:
    """A callable without compiled overloads (NUMBA_DISABLE_JIT) is returned as it is."""
    def f(a: int) -> int:
        return a + 1
    assert entry_point(f, (1,)) is f


def _weight(t: GGMLType, n_out: int, n_in: int, rng: np.random.Generator) -> cpu.QMatrix:
    """A random weight of type t quantized by the codec."""
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    return cpu.QMatrix(t, get_codec(t).quantize(w).reshape(n_out, -1), n_in, n_out)


def test_matvec_and_merged_products_match_dispatcher() -> None:
    """matvec and MergedCall (through entry points) equal the kernels called through numba's dispatcher."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(256).astype(np.float32)
    for t in (GGMLType.F16, GGMLType.Q4_K):
        w = _weight(t, 48, 256, rng)
        ref = np.empty(48, np.float32)
        matvec_kernel(w.kind, w.data, x, ref)
        assert np.array_equal(cpu.matvec(w, x), ref)
        assert np.array_equal(cpu.matvec(w, x), ref)  # the cached entry point
    ws = [cpu_repack.repack(_weight(GGMLType.Q4_0, n, 256, rng)) for n in (32, 16, 16)]
    merged = cpu_repack.MergedCall(ws)
    for m in (1, 5):
        xs = rng.standard_normal((m, 256)).astype(np.float32)
        ro = xs.copy()
        ro.flags.writeable = False  # a read-only batch is copied, not passed under the writable signature
        (_, args), = merged.calls  # one call: three Q4_0 weights
        for a, b, c in zip(merged(xs), merged(ro), cpu_repack.matmul_kernel(*args, xs, cpu.get_threads())):
            assert np.array_equal(a, b) and np.array_equal(a, c)
