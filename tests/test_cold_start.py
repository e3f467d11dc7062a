"""Cold start: the integer prefill kernels compile in background processes that the kernels then wait for;
a fresh install's first tokens run on numpy (kernels/cold.py, backend.ColdStartBackend) and match the
compiled path; the gate switches each kernel set over as its marker appears (qf.runtime.coldstart)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType

from qf.format.ggml_types import GGMLType
from qf.quant.codecs import get_codec
from qf.runtime import coldstart
from qf.runtime.backend import ColdStartBackend, CpuBackend
from qf.runtime.kernels import cold, cpu
from qf.runtime.kernels import cpu_attention as attn

from test_gemma3 import build_tiny_gemma3
from test_runtime_forward import build_tiny_gguf


def test_background_precompile_runs_once_and_is_awaited(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cpu, "_STARTED", set())
    monkeypatch.setattr(cpu, "_precompiled_marker", lambda t, parts: tmp_path / f"{t.name}.done")
    procs = cpu.precompile_background(["Q4_0", GGMLType.F32, "Q4_0"], processes=4)
    assert len(procs) == 1  # one uncached integer type: one process; F32 has no integer kernel
    assert cpu.precompile_background(["Q4_0"]) == []  # already under way in this process
    cpu.wait_precompiled()
    assert procs[0].returncode == 0 and not cpu._BACKGROUND


def test_background_precompile_splits_types_over_processes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cpu, "_STARTED", set())
    (tmp_path / "Q8_0.done").touch()  # cached already
    monkeypatch.setattr(cpu, "_precompiled_marker", lambda t, parts: tmp_path / f"{t.name}.done")
    procs = cpu.precompile_background(["Q4_0", "Q6_K", "Q8_0"], processes=2)
    assert len(procs) == 2 and cpu._STARTED == {GGMLType.Q4_0, GGMLType.Q6_K}
    cpu.wait_precompiled()
    assert all(p.returncode == 0 for p in procs)


# ---------------------------------------------------------------------------------------------------------
# numpy ops against their references


@pytest.mark.parametrize("t", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K", "F16", "BF16", "F32"])
def test_dequantize_rows_is_gguf_bit_for_bit(t: str) -> None:
    qt = GGMLType[t]
    a = (np.random.default_rng(1).standard_normal((20, 512)) * 0.3).astype(np.float32)
    a[3, :32] = 0.0  # an all-zero block
    data = a if qt == GGMLType.F32 else get_codec(qt).quantize(a)
    data = np.ascontiguousarray(data).view(np.uint8).reshape(20, -1)
    want = quants.dequantize(data, GGMLQuantizationType(int(qt))).reshape(20, 512)
    got = cold.dequantize_rows(qt, data, 512)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    rows = cold.get_rows(qt, data, 512, np.array([7, 0, 7]))
    np.testing.assert_array_equal(rows, want[[7, 0, 7]])


def test_matmul_tiles_and_exact_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cold, "TILE_VALUES", 16 * 64)  # 16 rows a tile: 5 tiles, the last one short
    a = (np.random.default_rng(2).standard_normal((70, 64)) * 0.3).astype(np.float32)
    data = get_codec(GGMLType.Q8_0).quantize(a).view(np.uint8).reshape(70, -1)
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    w = cold.dequantize_rows(GGMLType.Q8_0, data, 64)
    np.testing.assert_allclose(cold.matmul(GGMLType.Q8_0, data, 64, x), x @ w.T, rtol=1e-5, atol=1e-5)
    rows = cold.matmul_rows(GGMLType.Q8_0, data, 64, x)
    for i in range(5):  # each row what it gives alone
        np.testing.assert_array_equal(rows[i], cold.matmul_rows(GGMLType.Q8_0, data, 64, x[i:i + 1])[0])


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_kv_quantizers_match_the_kernels(kind: str) -> None:
    """The numpy KV quantizers write the bytes and scales the numba stores write (ggml's reference ones)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    x[0, 0, :32] = 0.0
    x[1, 1, 5], x[1, 1, 9] = 4.0, -4.0  # a tie of magnitudes: the first one sets q4_0's scale
    per = 1 if kind == "q8_0" else 2
    data = np.zeros((1, 2, 3, 64 // per), np.int8 if kind == "q8_0" else np.uint8)
    d = np.empty((3, 2, 2), np.float32)
    (attn.store_q8_0 if kind == "q8_0" else attn.store_q4_0)(x, data, d, np.zeros(3, np.int64), np.arange(3))
    q, dc = (cold.quantize_q8_0 if kind == "q8_0" else cold.quantize_q4_0)(x)
    np.testing.assert_array_equal(dc, d)
    np.testing.assert_array_equal(q, data[0].transpose(1, 0, 2))
    scales = np.zeros((1, 2, 3, 2), np.uint16)
    scales[0] = d.astype(np.float16).view(np.uint16).transpose(1, 0, 2)
    back = cold.read_keys(kind, data, scales, 0, 3)  # [Hkv, n, D]
    assert np.abs(back - x.transpose(1, 0, 2)).max() <= np.abs(x).max() / (100 if kind == "q8_0" else 6)


def test_small_ops_match_the_kernels() -> None:
    rng = np.random.default_rng(5)
    be = CpuBackend(1)
    x = rng.standard_normal((7, 48)).astype(np.float32)
    w = rng.standard_normal(48).astype(np.float32)
    np.testing.assert_allclose(cold.rms_norm(x, w, 1e-5), be.rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    g, u = rng.standard_normal((2, 7, 48)).astype(np.float32)
    np.testing.assert_allclose(cold.swiglu(g.copy(), u), be.swiglu(g.copy(), u), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cold.geglu(g.copy(), u), be.geglu(g.copy(), u), rtol=1e-5, atol=1e-6)
    cos, sin = rng.standard_normal((2, 16, 10)).astype(np.float32)
    pos = np.array([3, 0, 15, 4, 4, 1, 9])
    for neox in (False, True):
        q = rng.standard_normal((7, 3, 24)).astype(np.float32)  # 20 of 24 dims rotate
        a, b = q.copy(), q.copy()
        cold.rope(a, cos, sin, pos, neox)
        be.rope(b, cos, sin, pos, neox)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The cold backend against the compiled one, whole models


class StubGate:
    """A gate whose sets the test flips by hand (refresh reads nothing)."""

    def __init__(self, compiled: bool = False) -> None:
        self.matvec = self.decode = self.prefill = compiled
        self.on_switch: list = []

    @property
    def warm(self) -> bool:
        return self.prefill

    def refresh(self) -> None:
        pass

    def set(self, compiled: bool) -> None:
        self.matvec = self.decode = self.prefill = compiled


def _kld(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) over rows of softmax(logits), in f64."""
    lp = p_logits - p_logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q_logits - q_logits.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _load(path: Path, gate: StubGate | None, **kw):
    """A model on the compiled kernels (gate None) or on a ColdStartBackend driven by gate."""
    from qf.runtime import Model

    if gate is None:
        return Model.load(path, n_ctx=64, n_threads=1, cold_start=False, **kw)
    return Model.load(path, n_ctx=64, n_threads=1, warmup=False, cpu_backend=ColdStartBackend(gate, 1), **kw)


TOKENS = [1, 40, 71, 260, 12, 99, 5, 200, 150, 77, 3, 64, 31, 8, 17, 250, 44, 90, 2, 13]  # 20: a tiled chunk
MODELS = {  # head sizes of 32 and 64 (the quantized KV caches need multiples of 32)
    "llama-q4_0-untied": lambda p: build_tiny_gguf(p, qtype=GGMLType.Q4_0, n_embd=128, tied=False),
    "llama-q5_0-partial-rotary": lambda p: build_tiny_gguf(p, qtype=GGMLType.Q5_0, n_embd=128, n_rot=8),
    "qwen2-q8_0-bias": lambda p: build_tiny_gguf(p, arch="qwen2", qtype=GGMLType.Q8_0, n_embd=128, bias=True,
                                                 tied=False),
    "llama-q4_k": lambda p: build_tiny_gguf(p, qtype=GGMLType.Q4_K, n_embd=256, n_ff=256),
    "gemma3-q8_0-window": lambda p: build_tiny_gemma3(p, qtype=GGMLType.Q8_0, n_layer=3, window=5),
}


@pytest.fixture(scope="module")
def cold_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cold")
    return {name: build(d / f"{name}.gguf") for name, build in MODELS.items()}


@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("name", list(MODELS))
def test_cold_logits_match_compiled(cold_models: dict[str, Path], name: str, kv: str) -> None:
    """A prompt in two batches (14 + 6 rows: tiled and row attention), every position's logits."""
    kw = dict(type_k=kv, type_v=kv, n_batch=14)
    with _load(cold_models[name], None, **kw) as warm, _load(cold_models[name], StubGate(), **kw) as cold_m:
        want, got = warm.logits(TOKENS), cold_m.logits(TOKENS)
    assert _kld(want.astype(np.float64), got.astype(np.float64)) < 1e-6
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("name", ["llama-q4_0-untied", "gemma3-q8_0-window"])
def test_cold_prompt_continues_on_compiled_kernels(cold_models: dict[str, Path], name: str) -> None:
    """A prompt evaluated cold, then decode steps after the switch, read the KV cache the cold pass wrote."""
    gate = StubGate()
    with _load(cold_models[name], None) as warm, _load(cold_models[name], gate) as m:
        ew, ec = warm.engine, m.engine
        lw, _ = ew.prefill(TOKENS)
        lc, _ = ec.prefill(TOKENS)
        gate.set(True)  # the compile process's markers appear
        steps_w, steps_c = [lw], [lc]
        tok = int(lw.argmax())
        for _ in range(4):
            steps_w.append(ew.step(tok))
            steps_c.append(ec.step(tok))
            tok = int(steps_w[-1].argmax())
    want, got = np.stack(steps_w), np.stack(steps_c)
    assert _kld(want.astype(np.float64), got.astype(np.float64)) < 1e-6
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)


def test_cold_multi_sequence_step_keeps_rows_exact(cold_models: dict[str, Path]) -> None:
    """A cold decode step of several sequences gives each row what it gives alone (exact_rows)."""
    from qf.runtime.arch.blocks import Batch

    with _load(cold_models["llama-q4_0-untied"], StubGate(), n_seq=2) as m:
        f, cache = m._forward, m.engine.cache
        f.forward_batch(Batch.sequence(TOKENS[:6], 0, 0), cache)
        f.forward_batch(Batch.sequence(TOKENS[6:9], 0, 1), cache)
        both = f.forward_batch(Batch(np.array([5, 7]), np.array([6, 3]), np.array([0, 1]), exact_rows=True), cache)
        alone = f.forward_batch(Batch(np.array([7]), np.array([3]), np.array([1]), exact_rows=True), cache)
    np.testing.assert_array_equal(both[1], alone[0])


def test_cold_backend_gives_a_thread_to_the_compile_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(cpu, "set_threads", calls.append)
    gate = StubGate()
    be = ColdStartBackend(gate, 1)
    be.n_threads = 4  # as if the numba pool had 4
    be.set_threads()
    gate.set(True)
    be.set_threads()
    assert calls == [3, 4]


# ---------------------------------------------------------------------------------------------------------
# The gate and Model.load's cold path


class Running:
    """A compile process still at work."""

    def poll(self) -> None:
        return None

    def wait(self, timeout: float | None = None) -> None:
        return None


def test_gate_switches_sets_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coldstart, "_cache_folder", lambda: tmp_path)
    gate = coldstart.ColdGate.for_model("k")
    seen: list[int] = []
    gate.on_switch.append(lambda: seen.append(1))
    monkeypatch.setitem(coldstart._PROCS, str(gate.markers["decode"]), Running())
    gate.refresh()
    assert (gate.matvec, gate.decode, gate.prefill, gate.warm) == (False, False, False, False) and not seen
    gate.markers["decode"].touch()  # not before matvec's: nothing switches
    gate.refresh()
    assert not gate.decode
    gate.markers["matvec"].touch()
    gate.refresh()
    assert (gate.matvec, gate.decode, gate.prefill) == (True, True, False) and seen == [1]
    assert set(gate.switched_at) == {"matvec", "decode"}
    gate.markers["prefill"].touch()
    assert coldstart.ColdGate.for_model("k").warm  # a later load finds every set cached


def test_gate_of_a_failed_compile_process_lets_kernels_compile_in_process(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coldstart, "_cache_folder", lambda: tmp_path)
    gate = coldstart.ColdGate.for_model("gone")

    class Exited:
        def poll(self) -> int:
            return 1

        def wait(self, timeout: float | None = None) -> int:
            return 1

    monkeypatch.setitem(coldstart._PROCS, str(gate.markers["decode"]), Exited())
    assert gate.wait() and gate.warm


def test_model_key_follows_what_selects_kernels() -> None:
    base = coldstart.model_key([GGMLType.Q4_K, GGMLType.F32], "f16", "f16", "swiglu", False)
    assert base == coldstart.model_key([GGMLType.F32, GGMLType.Q4_K, GGMLType.Q4_K], "f16", "f16", "swiglu", False)
    others = [coldstart.model_key([GGMLType.Q6_K, GGMLType.F32], "f16", "f16", "swiglu", False),
              coldstart.model_key([GGMLType.Q4_K, GGMLType.F32], "q8_0", "f16", "swiglu", False),
              coldstart.model_key([GGMLType.Q4_K, GGMLType.F32], "f16", "f16", "geglu", False),
              coldstart.model_key([GGMLType.Q4_K, GGMLType.F32], "f16", "f16", "swiglu", True)]
    assert base not in others and len(set(others)) == 4


def test_model_load_takes_the_cold_path_until_the_markers_appear(cold_models: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from qf.runtime import Model

    monkeypatch.setattr(coldstart, "_cache_folder", lambda: tmp_path)
    spawned: list[str] = []

    def spawn(gate: coldstart.ColdGate, path: str, *args: object) -> None:
        spawned.append(path)
        monkeypatch.setitem(coldstart._PROCS, str(gate.markers["decode"]), Running())

    monkeypatch.setattr(coldstart, "spawn_compile", spawn)
    path = cold_models["llama-q4_0-untied"]
    with Model.load(path, n_ctx=64, n_threads=1, cold_start=False) as warm:
        want = warm.logits(TOKENS)
    with Model.load(path, n_ctx=64, n_threads=1, cold_start=True) as m:
        assert isinstance(m._cpu, ColdStartBackend) and spawned == [str(path)] and not m.kernels_ready
        got = m.logits(TOKENS)
        for name in coldstart.SETS:
            m._gate.markers[name].touch()
        assert m.kernels_ready and m.wait_kernels(0)
        again = m.logits(TOKENS)
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)
    np.testing.assert_array_equal(again, want)  # compiled from here on: the plain path's logits
    with Model.load(path, n_ctx=64, n_threads=1, cold_start=True) as m:  # every set cached: the plain backend
        assert type(m._cpu) is CpuBackend and m._gate is None and len(spawned) == 1
    monkeypatch.setenv(coldstart.ENV, "0")
    assert not coldstart.enabled(None) and coldstart.enabled(True)


# ---------------------------------------------------------------------------------------------------------
# SmolLM2 (slow: a fetched model)


@pytest.mark.slow
def test_smollm2_cold_logits_match_compiled(smollm2_gguf: Path) -> None:
    """The cold path against the compiled (integer prefill) path on a 165-token prompt: KLD ~1e-6."""
    from qf.runtime import Model

    with Model.load(smollm2_gguf, n_ctx=512, n_threads=2, cold_start=False) as warm:
        ids = warm.tokenize("Once upon a time, " * 64)[:165]
        want = warm.logits(ids)
    with Model.load(smollm2_gguf, n_ctx=512, n_threads=2, warmup=False,
                    cpu_backend=ColdStartBackend(StubGate(), 2)) as m:
        got = m.logits(ids)
    assert _kld(want.astype(np.float64), got.astype(np.float64)) < 1e-5
    assert (want.argmax(-1) == got.argmax(-1)).mean() > 0.99


def test_cold_experts_match_compiled() -> None:
    """A mixture-of-experts feed-forward on the cold backend (rows routed to experts, one product each)."""
    from qf.runtime.arch.blocks import Experts, moe_ffn, route

    rng = np.random.default_rng(6)
    codec = get_codec(GGMLType.Q8_0)
    mats = [[codec.quantize((rng.standard_normal(s) * 0.2).astype(np.float32)).view(np.uint8).reshape(s[0], -1)
             for _ in range(4)] for s in ((96, 64), (96, 64), (64, 96))]
    h = rng.standard_normal((6, 64)).astype(np.float32)
    sel, w = route(rng.standard_normal((6, 4)).astype(np.float32), 2, True)
    outs = []
    for be in (CpuBackend(1), ColdStartBackend(StubGate(), 1)):
        ex = Experts(be, *[[cpu.QMatrix(GGMLType.Q8_0, m, m.shape[1] // 34 * 32, m.shape[0]) for m in ms]
                           for ms in mats])
        outs.append(moe_ffn(ex, h, sel, w, False, 64))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4 * np.abs(outs[0]).max(), rtol=0)


def test_compile_process_touches_each_marker(cold_models: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile process runs the model once per set and leaves the markers (its kernels are then cached)."""
    monkeypatch.setattr(cpu, "BACKGROUND_NICE", cpu.BACKGROUND_NICE)  # main() sets it for its own process
    marks = [tmp_path / f"{name}.done" for name in coldstart.SETS]
    coldstart.main([str(cold_models["llama-q4_0-untied"]), "64", "1", "f16", "f16", "0", *map(str, marks)])
    assert all(m.exists() for m in marks)
