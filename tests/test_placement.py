"""Per-layer backends from a planner Plan, and the real SmolLM2 run with 0, some and all units on a
TorchBackend (torch's CPU device standing in for the GPU) against the pure CPU backend."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qf.format.errors import ModelError
from qf.format.reader import open_gguf
from qf.runtime.arch.llama import ARCHS, LlamaForward
from qf.runtime.backend import CpuBackend
from qf.runtime.hparams import hparams_from_metadata
from qf.runtime.placement import Placement, build_forward, placement_from_plan, uniform_placement
from qf.runtime.kv_cache import KVSpec
from qf.runtime.planner import plan_from_file
from qf.runtime.weights import load_tensors

torch = pytest.importorskip("torch")

from qf.runtime.backend_torch import TorchBackend  # noqa: E402

N_LAYER = 30
ON_CPU = {"cuda:0": "cpu", "cuda:1": "cpu"}  # the hypothetical GPUs run on torch's CPU device
PROMPT = np.array([1, 9690, 28, 638, 359, 346, 47, 2])  # prefill, then two decode steps
DECODE = (1201, 30)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread for numba and torch: on two shared cores torch's pool stalls under contention. Both are set
    because numba's OpenMP layer re-applies its own count to the OpenMP runtime torch shares."""
    import numba

    n_torch, n_numba = torch.get_num_threads(), numba.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    numba.set_num_threads(n_numba)
    torch.set_num_threads(n_torch)


def plan(path, gpu_layers, vram="4GiB"):
    """A plan for hypothetical GPU(s) of the given size (devices=[]: whatever this machine has is ignored)."""
    return plan_from_file(path, n_ctx=64, gpu_layers=gpu_layers, vram=vram, devices=[])


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    """(hp, tensors) of SmolLM2 from the mapped file."""
    f = open_gguf(smollm2_gguf)
    hp = hparams_from_metadata(f.meta, "llama", str(smollm2_gguf))
    yield hp, load_tensors(f, hp, str(smollm2_gguf))
    f.close()


def run(fwd) -> np.ndarray:
    """Logits [len(PROMPT) + len(DECODE), n_vocab]: a prefill with all logits, then single-token steps."""
    cache = fwd.new_cache()
    out = [fwd.forward(PROMPT, 0, cache, all_logits=True)]
    for i, tok in enumerate(DECODE):
        out.append(fwd.forward(np.array([tok]), len(PROMPT) + i, cache))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def cpu_logits(model):
    hp, tensors = model
    return run(build_forward(LlamaForward, hp, ARCHS["llama"], tensors, uniform_placement(hp.n_layer, CpuBackend()),
                             64))


# ------------------------------------------------------------------------------------------ placement


@pytest.mark.parametrize("gpu_layers,n_torch,head_on_gpu,crossings", [
    (0, 0, False, 0),
    (10, 10, False, 2),  # layers 20-29 on the GPU: in at 20, out to the CPU head
    (30, 30, False, 2),  # every layer, head on the CPU (llama.cpp -ngl 30 of 30)
    (31, 30, True, 1),  # "-ngl 31": the head as well; only the embedding lookup stays on the CPU
])
def test_backends_follow_the_plan(smollm2_gguf, gpu_layers, n_torch, head_on_gpu, crossings):
    p = plan(smollm2_gguf, gpu_layers)
    pl = placement_from_plan(p, device_map=ON_CPU)
    assert len(pl.layers) == N_LAYER
    assert sum(isinstance(b, TorchBackend) for b in pl.layers) == n_torch
    for dev, be in zip(p.layer_devices, pl.layers):
        assert isinstance(be, TorchBackend if dev.startswith("cuda") else CpuBackend)
        assert be is pl.devices[dev]  # one backend object per device: crossings only at boundaries
    assert isinstance(pl.embed, CpuBackend)
    assert isinstance(pl.head, TorchBackend) == head_on_gpu
    assert pl.crossings() == crossings


def test_two_gpus_get_their_own_backends(smollm2_gguf):
    p = plan(smollm2_gguf, "all", vram="2GiB,2GiB")
    pl = placement_from_plan(p, device_map=ON_CPU)
    assert set(pl.devices) == {"cpu", "cuda:0", "cuda:1"}
    assert pl.devices["cuda:0"] is not pl.devices["cuda:1"]
    assert pl.layers[0] is pl.devices["cuda:0"] and pl.head is pl.devices["cuda:1"]
    assert pl.crossings() == 2  # CPU embedding -> cuda:0 -> cuda:1


def test_cuda_stand_in_keeps_f32(smollm2_gguf):
    p = plan(smollm2_gguf, 5)
    be = placement_from_plan(p, device_map=ON_CPU).layers[-1]
    assert be.device.type == "cpu" and be.attn_dtype == torch.float32 and be.weight_dtype == torch.float32


@pytest.mark.parametrize("type_k,type_v", [("f32", "f32"), ("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "f16")])
def test_plan_kv_bytes_equal_what_the_backends_allocate(model, smollm2_gguf, type_k, type_v):
    """One KVSpec: the plan's KV bytes per device are what the CPU and torch caches allocate, for every type."""
    hp, tensors = model
    p = plan_from_file(smollm2_gguf, gpu_layers=12, vram="4GiB", devices=[],
                       kv_spec=KVSpec(3, 64, hp.n_head_kv, hp.head_dim, hp.head_dim, type_k, type_v))
    pl = placement_from_plan(p, device_map=ON_CPU)
    fwd = build_forward(LlamaForward, hp, ARCHS["llama"], tensors, pl, 64)
    cache = fwd.new_cache(3, type_k, type_v)
    got: dict[str, int] = {}
    for be, layer in zip(pl.layers, cache.layers):
        name = "cpu" if isinstance(be, CpuBackend) else "cuda:0"
        got[name] = got.get(name, 0) + layer.nbytes
    assert got == {"cpu": p.device_usage("cpu").kv, "cuda:0": p.device_usage("cuda:0").kv}
    per_value = {"f32": 4, "f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}
    want = 30 * 3 * 64 * hp.n_head_kv * hp.head_dim * (per_value[type_k] + per_value[type_v])
    assert sum(got.values()) == cache.nbytes() == want


@pytest.mark.parametrize("gpu_layers", [12, 31])
def test_device_bytes_match_the_plan(model, smollm2_gguf, gpu_layers):
    """Packed on the device, the GPU's weights take exactly the bytes the planner budgeted (Q4_1/Q8_0/F32)."""
    hp, tensors = model
    p = plan(smollm2_gguf, gpu_layers)
    pl = placement_from_plan(p, device_map=ON_CPU)
    build_forward(LlamaForward, hp, ARCHS["llama"], tensors, pl, 64)
    assert pl.devices["cuda:0"].weight_bytes == p.device_usage("cuda:0").weights > 0


def test_tied_embedding_uploaded_once(model, smollm2_gguf):
    """Embedding and tied head on one torch backend share one upload: the device holds the file's bytes."""
    hp, tensors = model
    be = TorchBackend("cpu")
    build_forward(LlamaForward, hp, ARCHS["llama"], tensors, uniform_placement(hp.n_layer, be), 64)
    with open_gguf(smollm2_gguf) as f:
        assert be.weight_bytes == sum(ti.nbytes for ti in f.tensors.values())


def test_build_forward_checks_layer_count(model):
    hp, tensors = model
    with pytest.raises(ModelError, match="29 layers"):
        build_forward(LlamaForward, hp, ARCHS["llama"], tensors, uniform_placement(29, CpuBackend()), 64)


def test_missing_torch_is_a_clear_error(smollm2_gguf, monkeypatch):
    monkeypatch.delitem(sys.modules, "qf.runtime.backend_torch", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ModelError, match="torch is not importable"):
        placement_from_plan(plan(smollm2_gguf, 4))


def test_cpu_plans_never_import_torch(smollm2_gguf):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from qf.runtime.planner import plan_from_file\n"
            "from qf.runtime.placement import placement_from_plan\n"
            f"p = placement_from_plan(plan_from_file({str(smollm2_gguf)!r}, n_ctx=64, gpu_layers=0))\n"
            "assert p.crossings() == 0 and type(p.head).__name__ == 'CpuBackend'\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ------------------------------------------------------------------------------------------ whole model


@pytest.mark.parametrize("gpu_layers,vram", [(0, "4GiB"), (12, "4GiB"), (31, "4GiB"), (31, "2GiB,2GiB")],
                         ids=["none", "some", "all", "all-2gpu"])
def test_smollm2_logits_match_cpu(model, smollm2_gguf, cpu_logits, gpu_layers, vram):
    """Prefill + 2 decode steps: logits within f32 summation-order noise of the CPU backend, same argmax."""
    hp, tensors = model
    pl = placement_from_plan(plan(smollm2_gguf, gpu_layers, vram), device_map=ON_CPU)
    fwd = build_forward(LlamaForward, hp, ARCHS["llama"], tensors, pl, 64)
    got = run(fwd)
    diff = float(np.abs(got - cpu_logits).max())
    print(f"gpu_layers={gpu_layers} vram={vram}: max |logits - cpu| = {diff:.3g} "
          f"(logit range {cpu_logits.min():.1f}..{cpu_logits.max():.1f})")
    assert diff < 2e-3 * float(np.abs(cpu_logits).max())
    np.testing.assert_array_equal(got.argmax(-1), cpu_logits.argmax(-1))


def test_smollm2_cuda_precision_on_cpu(model, cpu_logits):
    """The CUDA dtypes (fp16 dequant + matmul, fp16 KV cache) run on the CPU: fp16-sized noise, same argmax."""
    hp, tensors = model
    gpu = TorchBackend("cpu", weight_dtype=torch.float16)
    pl = Placement(layers=(gpu,) * hp.n_layer, embed=CpuBackend(), head=gpu)
    got = run(build_forward(LlamaForward, hp, ARCHS["llama"], tensors, pl, 64))
    diff = float(np.abs(got - cpu_logits).max())
    print(f"fp16 weights and KV: max |logits - cpu| = {diff:.3g}")
    assert diff < 0.3
    assert (got.argmax(-1) == cpu_logits.argmax(-1)).mean() >= 0.9


def test_hidden_state_crosses_only_at_boundaries(model, smollm2_gguf, monkeypatch):
    """Count host<->device hand-offs in one decode step: exactly the CPU/torch boundaries the forward uses."""
    hp, tensors = model
    pl = placement_from_plan(plan(smollm2_gguf, 12), device_map=ON_CPU)
    fwd = build_forward(LlamaForward, hp, ARCHS["llama"], tensors, pl, 64)
    cache = fwd.new_cache()
    calls = {"from_host": 0, "to_host": 0}
    for op in calls:
        real = getattr(TorchBackend, op)

        def counted(self, x, _op=op, _real=real):
            calls[_op] += 1
            return _real(self, x)

        monkeypatch.setattr(TorchBackend, op, counted)
    fwd.forward(PROMPT[:1], 0, cache)
    units = [fwd.embed_be, *(layer.be for layer in fwd.layers), fwd.head_be]
    into = sum(isinstance(b, TorchBackend) and a is not b for a, b in zip(units, units[1:]))
    out = sum(isinstance(a, TorchBackend) and a is not b for a, b in zip(units, units[1:]))
    out += isinstance(fwd.head_be, TorchBackend)  # the logits come back to the host
    assert calls == {"from_host": into, "to_host": out} and into == 1
