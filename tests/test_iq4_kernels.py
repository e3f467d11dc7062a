"""CPU kernels for IQ4_NL and IQ4_XS: rows bit-exact with the codecs, products against float64, exact rows,
and a tiny model run end to end against the numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_runtime_forward import RefModel, build_tiny_gguf

from qf.format.ggml_types import GGMLType
from qf.quant.codecs import get_codec
from qf.runtime.kernels import cpu

TYPES = [GGMLType.IQ4_NL, GGMLType.IQ4_XS]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_out,n_in", [(1, 256), (37, 512), (64, 768)])
def test_iq4_rows_and_products(qtype: GGMLType, n_out: int, n_in: int) -> None:
    rng = np.random.default_rng(n_out)
    w = (rng.standard_normal((n_out, n_in)) * rng.uniform(0.1, 4, (n_out, 1))).astype(np.float32)
    q = get_codec(qtype).quantize(w).reshape(n_out, -1)
    ref = get_codec(qtype).dequantize(q).reshape(n_out, n_in)
    m = cpu.QMatrix(qtype, q, n_in, n_out)
    np.testing.assert_array_equal(cpu.get_rows(m, np.arange(n_out)), ref)
    for rows in (1, 3, 20, 64):
        x = rng.standard_normal((rows, n_in)).astype(np.float32)
        got = cpu.matmul(m, x) if rows > 1 else cpu.matvec(m, x[0])[None]
        want = x.astype(np.float64) @ ref.T.astype(np.float64)
        bound = np.abs(x).sum(1, keepdims=True) * np.abs(ref).max()
        assert np.all(np.abs(got - want) <= 1e-5 * bound)
        if rows > 1:  # batched decode rows equal each row alone, bit for bit
            alone = np.stack([cpu.matvec(m, x[i]) for i in range(rows)])
            np.testing.assert_array_equal(cpu.matmul(m, x, blas=False), alone)


def test_tiny_iq4_nl_model_matches_the_reference(tmp_path: Path) -> None:
    from qf.runtime import Model

    path = build_tiny_gguf(tmp_path / "iq4.gguf", qtype=GGMLType.IQ4_NL, n_embd=64, n_ff=96, tied=False)
    tokens = [1, 40, 71, 260, 12, 99, 5, 200]
    ref = RefModel(path).logits(tokens)
    with Model.load(path, n_ctx=32, n_threads=1, type_k="f32", type_v="f32") as m:
        got = m.logits(tokens)
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
