"""Mixture of experts: routing, expert placement (--cpu-moe, --n-cpu-moe, -ot) in the planner, the runtime
and qrun, and the plan of a Qwen3-30B-A3B-shaped file written as a header alone (a sparse file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from gguf_builder import RawGGUF, kv_str, kv_u32, tinfo

from qf.format.errors import PlanError
from qf.format.ggml_types import GGMLType, tensor_bytes
from qf.runtime.arch.blocks import Batch, Experts, moe_ffn, route
from qf.runtime.backend import CpuBackend
from qf.runtime.planner import GiB, format_plan, moe_overrides, parse_overrides, plan_from_file

torch = pytest.importorskip("torch")


# ---------------------------------------------------------------------------------------------- routing

def test_route_softmax_topk_renormalised_per_row() -> None:
    logits = np.array([[0.0, 2.0, 1.0, -1.0], [3.0, 3.0, 0.0, 0.0]], np.float32)
    sel, w = route(logits, 2, renormalise=True)
    assert sel.tolist() == [[1, 2], [0, 1]]  # ties: lower index first
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(w[0], p[[1, 2]] / p[[1, 2]].sum(), rtol=1e-6)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    _, raw = route(logits, 2, renormalise=False)
    np.testing.assert_allclose(raw[0], p[[1, 2]], rtol=1e-6)
    one, _ = route(logits[:1], 2, True)
    assert one.tolist() == sel[:1].tolist()  # a row routes the same alone


class _Recorder(CpuBackend):
    """A CPU backend that records which matrices its linear reads."""

    def __init__(self) -> None:
        super().__init__(1)
        self.used: list[int] = []

    def linear(self, w: Any, x: np.ndarray, bias: Any = None, exact_rows: bool = False) -> np.ndarray:
        self.used.append(id(w))
        return x @ w.T


def test_expert_matmuls_touch_only_the_selected_experts() -> None:
    rng = np.random.default_rng(0)
    n_expert, d, ff = 6, 8, 4
    mats = [[rng.standard_normal((ff, d)).astype(np.float32) for _ in range(n_expert)] for _ in range(2)]
    down = [rng.standard_normal((d, ff)).astype(np.float32) for _ in range(n_expert)]
    be = _Recorder()
    ex = Experts(be, mats[0], mats[1], down)
    h = rng.standard_normal((3, d)).astype(np.float32)
    sel = np.array([[4, 1], [1, 2], [4, 2]])
    w = np.full((3, 2), 0.5, np.float32)
    out = moe_ffn(ex, h, sel, w, False, d)
    touched = {i for i in range(n_expert) if id(down[i]) in be.used or id(mats[0][i]) in be.used}
    assert touched == {1, 2, 4} and len(be.used) == 9  # three experts, three matrices each, once per batch
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    want = sum(0.5 * (silu(h[0] @ mats[0][e].T) * (h[0] @ mats[1][e].T)) @ down[e].T for e in (4, 1))
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- runtime

@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory, tiny_bpe_json: dict[str, Any]) -> Path:
    """A tiny Qwen3-MoE (transformers' classes, random weights) converted to Q8_0."""
    from test_arch_tiny import build_hf

    from qf.convert.pipeline import convert

    root = tmp_path_factory.mktemp("moe")
    hf = build_hf("qwen3moe", root / "hf", tiny_bpe_json)
    out = root / "moe.qf"
    convert(hf, out, "Q8_0")
    return out


PROMPT = [5, 17, 42, 101, 7, 250, 3, 99]


def _load(path: Path, **kw: Any) -> Any:
    from qf.runtime import Model

    return Model.load(path, n_ctx=32, warmup=False, type_k="f32", type_v="f32", **kw)


def test_experts_on_the_cpu_rest_on_the_torch_stand_in_equals_all_cpu(tiny_moe: Path) -> None:
    with _load(tiny_moe, gpu_layers=0) as m:
        ref = m.logits(PROMPT)
    stand_in = {"device_map": {"cuda:0": "cpu"}}
    with _load(tiny_moe, gpu_layers="all", vram="1GiB", cpu_moe=True, torch_options=stand_in) as m:
        assert m.plan.layer_devices == ("cuda:0",) * 2 and m.plan.expert_devices == ("cpu",) * 2
        fwd = m._forward
        assert all(type(L.experts.be) is CpuBackend and L.be is not L.experts.be for L in fwd.layers)
        got = m.logits(PROMPT)
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, float(np.abs(ref).max()))
    with _load(tiny_moe, gpu_layers="all", vram="1GiB", n_cpu_moe=1, torch_options=stand_in) as m:
        assert m.plan.expert_devices == ("cpu", "cuda:0")
        assert np.abs(m.logits(PROMPT) - ref).max() < 1e-3 * max(1.0, float(np.abs(ref).max()))


def test_batched_rows_route_as_alone(tiny_moe: Path) -> None:
    with _load(tiny_moe, gpu_layers=0, n_seq=3) as m:
        fwd = m._forward
        cache = fwd.new_cache(3, "f32", "f32")
        alone = [fwd.forward(np.asarray(PROMPT[:4 + s]), 0, cache, slot=s)[-1] for s in range(3)]
        batch = Batch(np.asarray([PROMPT[4], PROMPT[5], PROMPT[6]]), np.asarray([4, 5, 6]), np.arange(3),
                      exact_rows=True)
        nxt = fwd.forward_batch(batch, cache)
        for s in range(3):
            single = fwd.new_cache(1, "f32", "f32")
            want = fwd.forward(np.asarray(PROMPT[:5 + s]), 0, single)[-1]
            assert np.array_equal(nxt[s], want)
        assert len(alone) == 3


# ---------------------------------------------------------------------------------------------- planning

A = "qwen3moe"
SHAPE = dict(n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff=6144, n_expert=128, n_used=8,
             n_ff_exp=768, n_vocab=151936, n_ctx=40960)


def _tensors(s: dict[str, int]) -> list[tuple[str, tuple[int, ...], GGMLType]]:
    """The tensor table of a Qwen3-30B-A3B Q4_K_M-like file (types simplified)."""
    e, q, kvd = s["n_embd"], s["n_head"] * s["head_dim"], s["n_head_kv"] * s["head_dim"]
    out = [("token_embd.weight", (e, s["n_vocab"]), GGMLType.Q4_K), ("output_norm.weight", (e,), GGMLType.F32),
           ("output.weight", (e, s["n_vocab"]), GGMLType.Q6_K)]
    for i in range(s["n_layer"]):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (e,), GGMLType.F32), (b + "attn_q.weight", (e, q), GGMLType.Q4_K),
                (b + "attn_k.weight", (e, kvd), GGMLType.Q4_K), (b + "attn_v.weight", (e, kvd), GGMLType.Q6_K),
                (b + "attn_output.weight", (q, e), GGMLType.Q4_K),
                (b + "attn_q_norm.weight", (s["head_dim"],), GGMLType.F32),
                (b + "attn_k_norm.weight", (s["head_dim"],), GGMLType.F32), (b + "ffn_norm.weight", (e,), GGMLType.F32),
                (b + "ffn_gate_inp.weight", (e, s["n_expert"]), GGMLType.F32),
                (b + "ffn_gate_exps.weight", (e, s["n_ff_exp"], s["n_expert"]), GGMLType.Q4_K),
                (b + "ffn_up_exps.weight", (e, s["n_ff_exp"], s["n_expert"]), GGMLType.Q4_K),
                (b + "ffn_down_exps.weight", (s["n_ff_exp"], e, s["n_expert"]), GGMLType.Q6_K)]
    return out


def write_header_only(path: Path, s: dict[str, int] = SHAPE) -> int:
    """A GGUF whose header describes the whole model and whose data is a hole (sparse); its tensor bytes."""
    kvs = [kv_str("general.architecture", A), kv_u32(f"{A}.block_count", s["n_layer"]),
           kv_u32(f"{A}.context_length", s["n_ctx"]), kv_u32(f"{A}.embedding_length", s["n_embd"]),
           kv_u32(f"{A}.feed_forward_length", s["n_ff"]), kv_u32(f"{A}.attention.head_count", s["n_head"]),
           kv_u32(f"{A}.attention.head_count_kv", s["n_head_kv"]), kv_u32(f"{A}.attention.key_length", s["head_dim"]),
           kv_u32(f"{A}.attention.value_length", s["head_dim"]), kv_u32(f"{A}.expert_count", s["n_expert"]),
           kv_u32(f"{A}.expert_used_count", s["n_used"]), kv_u32(f"{A}.vocab_size", s["n_vocab"]),
           kv_u32(f"{A}.expert_feed_forward_length", s["n_ff_exp"])]
    infos, offset = [], 0
    for name, ne, t in _tensors(s):
        infos.append(tinfo(name, ne, int(t), offset))
        offset += tensor_bytes(t, ne)
        offset += -offset % 32
    path.write_bytes(RawGGUF(kvs=kvs, infos=infos).build())
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + offset)  # a hole: no disk blocks, no weights needed for a plan
    return offset


def test_qwen3_30b_a3b_plan_with_cpu_moe_fits_8gib(tmp_path: Path) -> None:
    p = tmp_path / "qwen3-30b-a3b-header.gguf"
    total = write_header_only(p)
    plan = plan_from_file(p, 4096, "auto", vram="8GiB", devices=[], ram=64 * GiB, overrides=moe_overrides(True))
    assert plan.n_gpu_layers == 48 and plan.output_device == "cuda:0"
    assert plan.expert_devices == ("cpu",) * 48
    gpu, cpu = plan.device_usage("cuda:0"), plan.device_usage("cpu")
    assert gpu.experts == 0 and cpu.experts > 0.85 * total and cpu.expert_layers == tuple(range(48))
    assert gpu.fits and gpu.weights < 2 * GiB
    text = format_plan(plan)
    assert "experts 0-47" in text and "of which experts" in text and "48/48 layers on GPU" in text
    assert "experts of 48 of them on the CPU" in text
    dense = plan_from_file(p, 4096, "auto", vram="8GiB", devices=[], ram=64 * GiB)
    assert dense.n_gpu_layers < 24  # without --cpu-moe the experts crowd the layers out
    with pytest.raises(PlanError, match="--cpu-moe or --n-cpu-moe"):
        plan_from_file(p, 4096, 48, vram="8GiB", devices=[], ram=64 * GiB)
    some = plan_from_file(p, 4096, "all", vram="80GiB", devices=[], ram=64 * GiB, overrides=moe_overrides(n_cpu_moe=10))
    assert some.expert_devices == ("cpu",) * 10 + ("cuda:0",) * 38


def test_override_tensor_rules(tmp_path: Path) -> None:
    p = tmp_path / "h.gguf"
    write_header_only(p)
    kw = dict(vram="80GiB", devices=[], ram=64 * GiB)
    plan = plan_from_file(p, 1024, "all", overrides=parse_overrides(r"blk\.(4[0-7])\.ffn_.*_exps=CPU"), **kw)
    assert plan.expert_devices == ("cuda:0",) * 40 + ("cpu",) * 8
    assert parse_overrides(["exps=CPU,attn=CUDA0"])[1].device == "cuda:0"
    for bad, match in [("exps", "REGEX=DEVICE"), ("exps=TPU", "unknown device"), ("(=CPU", "bad regex")]:
        with pytest.raises(PlanError, match=match):
            parse_overrides(bad)
    with pytest.raises(PlanError, match="only expert tensors"):
        plan_from_file(p, 1024, "all", overrides=parse_overrides(r"attn_q\.=CPU"), **kw)
    with pytest.raises(PlanError, match="split the experts of layer 0"):
        plan_from_file(p, 1024, "all", overrides=parse_overrides(r"blk\.0\.ffn_up_exps=CPU"), **kw)
    with pytest.raises(PlanError, match="names cuda:1"):
        plan_from_file(p, 1024, "all", overrides=parse_overrides("exps=CUDA1"), **kw)


def test_qrun_plan_flags(tmp_path: Path) -> None:
    from qf.tools.qrun import main

    p = tmp_path / "h.gguf"
    write_header_only(p)
    r = CliRunner().invoke(main, [str(p), "--plan", "-c", "4096", "--vram", "8GiB", "--cpu-moe"])
    assert r.exit_code == 0, r.output
    assert "experts 0-47" in r.output and "48/48 layers on GPU" in r.output
    r = CliRunner().invoke(main, [str(p), "--plan", "-c", "4096", "--vram", "80GiB", "-ngl", "all",
                                  "--n-cpu-moe", "2", "-ot", r"blk\.47\.ffn_.*_exps=CPU"])
    assert r.exit_code == 0, r.output
    assert "experts 0-1, 47" in r.output
