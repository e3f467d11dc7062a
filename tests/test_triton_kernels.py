"""The fused Triton dequant-matmul (qf.runtime.kernels.triton_qmm), run in Triton's CPU interpreter: every
type against the codecs' dequantization + numpy on odd shapes, and inside the torch backend and a model."""

from __future__ import annotations


import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated: they run on CPU tensors

from qf.format.ggml_types import BLOCK, GGMLType  # noqa: E402
from qf.quant.codecs import get_codec  # noqa: E402
from qf.runtime.kernels import torch_dequant as tq  # noqa: E402
from qf.runtime.kernels import triton_qmm  # noqa: E402


TYPES = list(triton_qmm.SUPPORTED)


def _weight(qtype: GGMLType, n_out: int, n_blocks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(packed rows, their dequantized values f32 [n_out, n_in]) of a random weight."""
    n_in = BLOCK[qtype][0] * n_blocks
    w = (rng.standard_normal((n_out, n_in)) * rng.uniform(0.1, 3, (n_out, 1))).astype(np.float32)
    q = get_codec(qtype).quantize(w).reshape(n_out, -1)
    return q, get_codec(qtype).dequantize(q).reshape(n_out, n_in)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_out,n_blocks", [(1, 1), (37, 3), (100, 2)])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_kernel_matches_dequantize_then_matmul(qtype: GGMLType, n_out: int, n_blocks: int, m: int) -> None:
    rng = np.random.default_rng(n_out * 31 + m)
    q, ref_w = _weight(qtype, n_out, n_blocks, rng)
    x = rng.standard_normal((m, ref_w.shape[1])).astype(np.float32)
    got = triton_qmm.qmm(tq.pack(qtype, q, ref_w.shape[1], "cpu"), torch.from_numpy(x)).numpy()
    want = x.astype(np.float64) @ ref_w.T.astype(np.float64)
    scale = np.abs(x).sum(1, keepdims=True) * np.abs(ref_w).max()  # bound on any |dot product|
    # M = 1 sums in f32; M > 1 multiplies in fp16 on tensor cores (f32 accumulation)
    tol = 1e-6 if m == 1 else 2e-3
    assert got.shape == (m, n_out)
    assert np.all(np.abs(got - want) <= tol * scale), np.abs(got - want).max()


def test_bad_shapes_are_refused() -> None:
    rng = np.random.default_rng(0)
    q, ref_w = _weight(GGMLType.Q4_0, 4, 2, rng)
    pw = tq.pack(GGMLType.Q4_0, q, ref_w.shape[1], "cpu")
    with pytest.raises(ValueError):
        triton_qmm.qmm(pw, torch.zeros((17, ref_w.shape[1])))
    with pytest.raises(ValueError):
        triton_qmm.qmm(pw, torch.zeros((1, ref_w.shape[1] + 32)))


def test_torch_backend_uses_the_fused_kernel_for_small_batches() -> None:
    from qf.runtime.backend_torch import TorchBackend

    rng = np.random.default_rng(5)
    q, ref_w = _weight(GGMLType.Q4_K, 48, 2, rng)
    fused, tiles = TorchBackend("cpu", kernels="triton"), TorchBackend("cpu", kernels="torch")
    assert GGMLType.Q4_K in fused.fused and not tiles.fused and not TorchBackend("cpu").fused
    wf, wt = (be._pack(_Ref(GGMLType.Q4_K, q), q, ref_w.shape[1]) for be in (fused, tiles))
    for m in (1, 4, 40):  # 40 rows: past the kernel's 16, back to tiles
        x = torch.from_numpy(rng.standard_normal((m, ref_w.shape[1])).astype(np.float32))
        np.testing.assert_allclose(fused.linear(wf, x).numpy(), tiles.linear(wt, x).numpy(), rtol=0,
                                   atol=2e-3 * float(x.abs().sum(1).max()) * float(np.abs(ref_w).max()))


class _Ref:
    """The fields of a TensorRef that TorchBackend._pack reads."""

    def __init__(self, qtype: GGMLType, data: np.ndarray) -> None:
        self.type, self.data, self.name = qtype, data, "w"


@pytest.mark.slow
def test_model_with_gpu_layers_on_triton_matches_the_cpu(smollm2_gguf) -> None:
    """SmolLM2 with 10 layers on the torch stand-in running the Triton kernels: greedy tokens as on the CPU."""
    from qf.runtime import Model

    prompt = "The capital of France is"
    with Model.load(smollm2_gguf, n_ctx=64, n_threads=2) as cpu:
        want = cpu.generate(prompt, max_tokens=6, temperature=0).wait().tokens
        ref = cpu.logits(cpu.tokenize(prompt))
    with Model.load(smollm2_gguf, n_ctx=64, n_threads=2, gpu_layers=10, vram="4GiB",
                    torch_options={"device_map": {"cuda:0": "cpu"}, "kernels": "triton"}) as gpu:
        assert gpu.plan is not None and gpu.plan.n_gpu_layers == 10
        assert gpu.generate(prompt, max_tokens=6, temperature=0).wait().tokens == want
        got = gpu.logits(gpu.tokenize(prompt))
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()
