"""Device placement planner: llama.cpp -ngl / --tensor-split semantics, memory accounting, budgets, errors."""

from __future__ import annotations

import subprocess
import sys
import types
from fractions import Fraction

import numpy as np
import pytest

from qf.format.errors import FormatError, ModelError, PlanError
from qf.runtime import devices as devmod
from qf.runtime.devices import Device
from qf.runtime.planner import (
    DEFAULT_MARGIN_BYTES, GiB, MiB, ModelSizes, PlanConfig, TensorGroup, activation_bytes, assign_units,
    embedding_bytes, fmt_bytes, format_plan, kv_bytes_per_layer, logits_bytes, parse_bytes, parse_split,
    parse_vram, plan_from_file, plan_placement, resolve_margin, sizes_from_gguf,
)

LAYER = 10 * MiB
EMBD = 30 * MiB
OUT = 25 * MiB
NORM = 4096


def toy(n_layer: int = 10, tied: bool = False, layer: int = LAYER, n_embd: int = 512, n_ff: int = 1536,
        n_head: int = 8, n_head_kv: int = 2, n_vocab: int = 32000, n_ctx_train: int = 4096) -> ModelSizes:
    """A synthetic model: n_layer equal layers, token_embd, output (absent when tied)."""
    return ModelSizes(
        arch="toy", n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=n_embd // n_head, head_dim_v=n_embd // n_head, n_vocab=n_vocab,
        layers=(TensorGroup(layer, n_embd * n_ff),) * n_layer,
        token_embd=TensorGroup(EMBD, n_embd * n_vocab),
        output=TensorGroup(NORM + (0 if tied else OUT), 0 if tied else n_embd * n_vocab),
        tied=tied, n_ctx_train=n_ctx_train)


def cfg(n_ctx: int = 1024, **kw) -> PlanConfig:
    """A config without the dequant scratch and with a zero margin unless asked: easy hand arithmetic."""
    kw.setdefault("dequant_scratch", False)
    kw.setdefault("margin", 0)
    return PlanConfig(n_ctx, **kw)


def gpu(free: int, name: str = "cuda:0") -> Device:
    """A GPU with `free` bytes free."""
    return Device(name, free, free)


RAM = 64 * GiB


# ------------------------------------------------------------------------------------------------ parsers

@pytest.mark.parametrize("text, expected", [
    ("6GiB", 6 * 2**30), ("6Gi", 6 * 2**30), ("6 gib", 6 * 2**30), ("6G", 6 * 10**9), ("6GB", 6 * 10**9),
    ("512MiB", 512 * 2**20), ("512M", 512 * 10**6), ("1.5GiB", 3 * 2**29), ("6e9", 6 * 10**9),
    ("1.5e3", 1500), ("123", 123), ("0", 0), ("64KiB", 65536), (" 2TiB ", 2 * 2**40), ("100b", 100),
    (123, 123), (6e9, 6 * 10**9),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["6X", "-1", "", "GiB", "inf", "nan", "1e999", "6 G B x", True, -5])
def test_parse_bytes_rejects(bad):
    with pytest.raises(PlanError):
        parse_bytes(bad)


def test_parse_vram_and_split():
    assert parse_vram("8GiB", 2) == [8 * GiB, 8 * GiB]
    assert parse_vram("8GiB,4GiB", 2) == [8 * GiB, 4 * GiB]
    assert parse_vram(None, 2) is None
    with pytest.raises(PlanError, match="3 sizes but 2 GPU"):
        parse_vram("1G,2G,3G", 2)
    assert parse_split("3,1", 2) == (Fraction(3), Fraction(1))
    assert parse_split([0.75, 0.25], 3) == (Fraction(3, 4), Fraction(1, 4), Fraction(0))
    assert parse_split("0,0", 2) is None and parse_split(None, 2) is None
    for bad in ("1,2,3", "1,-1", "a,b", "1,,2"):
        with pytest.raises(PlanError):
            parse_split(bad, 2)


def test_margin_policy():
    assert resolve_margin(None, 100 * MiB, capped=True) == 5 * MiB  # 5% of a user cap
    assert resolve_margin("10%", 1001, capped=False) == 101  # rounded up
    assert resolve_margin(None, 4 * GiB, capped=False) == DEFAULT_MARGIN_BYTES  # 5% of 4 GiB < 512 MiB
    assert resolve_margin(None, 80 * GiB, capped=False) == 4 * GiB  # 5% of 80 GiB > 512 MiB
    assert resolve_margin("10%", 1000, capped=False) == 100
    assert resolve_margin(0.25, 1000, capped=True) == 250
    assert resolve_margin("256MiB", 8 * GiB, capped=False) == 256 * MiB
    assert resolve_margin(0, 8 * GiB, capped=False) == 0
    with pytest.raises(PlanError):
        resolve_margin("150%", 1000, capped=False)


# ------------------------------------------------------------------------------------ llama.cpp semantics

def test_assign_units_single_gpu_matches_ngl():
    one = [Fraction(1)]
    assert assign_units(4, 0, one) == (-1, -1, -1, -1, -1)
    assert assign_units(4, 2, one) == (-1, -1, 0, 0, -1)  # the last 2 layers; head (unit 4) stays
    assert assign_units(4, 4, one) == (0, 0, 0, 0, -1)  # every layer, head still on CPU
    assert assign_units(4, 5, one) == (0, 0, 0, 0, 0)  # N > n_layer: the head too
    assert assign_units(4, 99, one) == (0, 0, 0, 0, 0)
    assert assign_units(4, 3, []) == (-1,) * 5  # no GPU


def test_assign_units_tensor_split_contiguous():
    # 5 units over two equal GPUs: unit u -> first GPU whose cumulative share exceeds u/5
    assert assign_units(4, 5, [Fraction(1), Fraction(1)]) == (0, 0, 0, 1, 1)
    assert assign_units(7, 8, [Fraction(3), Fraction(1)]) == (0, 0, 0, 0, 0, 0, 1, 1)
    assert assign_units(4, 5, [Fraction(0), Fraction(1)]) == (1,) * 5  # a zero share gets nothing
    units = assign_units(30, 20, [Fraction(2), Fraction(5), Fraction(3)])
    gpu_units = [u for u in units if u != -1]
    assert gpu_units == sorted(gpu_units) and len(gpu_units) == 20  # contiguous, in device order
    assert [gpu_units.count(k) for k in range(3)] == [4, 10, 6]


# ------------------------------------------------------------------------------------- memory accounting

def test_formulas_by_hand():
    s, c = toy(), cfg(2048, n_batch=512)
    assert kv_bytes_per_layer(s, c) == 2 * 2048 * 2 * 64 * 2  # 2 * n_ctx * n_head_kv * head_dim * f16
    assert kv_bytes_per_layer(s, cfg(2048, kv_dtype="f32")) == 2 * kv_bytes_per_layer(s, c)
    per_token = 2 * 512 + 8 * 64 + 2 * 128 + 8 * 64 + 3 * 1536 + 8 * 2048
    assert activation_bytes(s, c) == 4 * 512 * per_token
    assert logits_bytes(s, c) == 4 * (32000 + 512)
    assert logits_bytes(s, cfg(2048, all_logits=True)) == 4 * 512 * (32000 + 512)
    assert embedding_bytes(s, c) == 4 * 512 * 512
    assert cfg(100).batch == 100  # the micro-batch never exceeds the context


def test_key_length_overrides_head_dim():
    s = ModelSizes(arch="g", n_embd=640, n_ff=2048, n_head=4, n_head_kv=1, head_dim_k=256, head_dim_v=256,
                   n_vocab=1000, layers=(TensorGroup(1),), token_embd=TensorGroup(1), output=TensorGroup(1),
                   tied=True)
    assert kv_bytes_per_layer(s, cfg(4096)) == 4096 * 1 * (256 + 256) * 2


def test_gpu_breakdown_exact():
    s, c = toy(), cfg(1024)
    plan = plan_placement(s, c, [gpu(8 * GiB)], RAM, gpu_layers=4)
    assert plan.layer_devices == ("cpu",) * 6 + ("cuda:0",) * 4
    g = plan.device_usage("cuda:0")
    assert g.layers == (6, 7, 8, 9) and not g.has_output
    assert g.weights == 4 * LAYER
    assert g.kv == 4 * kv_bytes_per_layer(s, c)
    assert g.compute == activation_bytes(s, c)
    assert g.required == g.weights + g.kv + g.compute
    cpu = plan.device_usage("cpu")
    assert cpu.weights == 6 * LAYER + EMBD + NORM + OUT and cpu.has_output
    assert cpu.kv == 6 * kv_bytes_per_layer(s, c)
    assert cpu.compute == activation_bytes(s, c) + logits_bytes(s, c) + embedding_bytes(s, c)
    assert cpu.required == cpu.kv + cpu.compute  # weights are mmapped
    assert plan.summary() == "4/10 layers on GPU (cuda:0: 6-9), output head on CPU"


def test_dequant_scratch_counts_largest_quantized_tensor():
    s = toy()
    plain = plan_placement(s, cfg(1024), [gpu(8 * GiB)], RAM, gpu_layers=11).device_usage("cuda:0")
    scratch = plan_placement(s, cfg(1024, dequant_scratch=True), [gpu(8 * GiB)], RAM, gpu_layers=11)
    assert scratch.device_usage("cuda:0").compute - plain.compute == 2 * 512 * 32000  # f16 copy of the head


# ------------------------------------------------------------------------------------------------ budgets

def test_budgets_from_zero_to_more_than_the_model():
    s, c = toy(), cfg(1024)
    per_layer = LAYER + kv_bytes_per_layer(s, c)
    base = activation_bytes(s, c)
    last_n = -1
    for budget in [0, 1, base, base + per_layer - 1, base + per_layer, base + 5 * per_layer + 7,
                   base + 10 * per_layer, 2 * GiB]:
        plan = plan_placement(s, c, [gpu(budget)], RAM, "auto")
        assert plan.fits and plan.n_gpu_layers >= last_n
        last_n = plan.n_gpu_layers
        g = plan.device_usage("cuda:0")
        assert g.required <= budget
        if plan.gpu_layers <= s.n_layer:  # the next layer (or the head) must not have fitted
            with pytest.raises(PlanError):
                plan_placement(s, c, [gpu(budget)], RAM, plan.gpu_layers + 1)
    expected = {0: 0, base + per_layer - 1: 0, base + per_layer: 1, base + 5 * per_layer + 7: 5}
    for budget, n in expected.items():
        assert plan_placement(s, c, [gpu(budget)], RAM).n_gpu_layers == n
    big = plan_placement(s, c, [gpu(2 * GiB)], RAM)
    assert big.gpu_layers == 11 and big.output_device == "cuda:0"
    assert big.summary() == "10/10 layers on GPU (cuda:0: 0-9), output head on cuda:0"
    # all layers fit but not the head: the head stays on the CPU
    no_head = plan_placement(s, c, [gpu(base + 10 * per_layer)], RAM)
    assert no_head.n_gpu_layers == 10 and no_head.output_device == "cpu"


def test_context_sizes_trade_layers():
    s = toy()
    counts = [plan_placement(s, cfg(n), [gpu(200 * MiB)], RAM).n_gpu_layers for n in (256, 1024, 4096, 16384)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    kv = [plan_placement(s, cfg(n), [gpu(8 * GiB)], RAM, 10).device_usage("cuda:0").kv for n in (512, 1024)]
    assert kv[1] == 2 * kv[0]


def test_vram_cap_and_discovered_free():
    s = toy()
    capped = plan_placement(s, PlanConfig(1024), [gpu(2 * GiB)], RAM, vram="1GiB")
    g = capped.device_usage("cuda:0")
    assert g.available == GiB and g.margin == -(-GiB * 5 // 100)  # a cap: 5% headroom
    uncapped = plan_placement(s, PlanConfig(1024), [gpu(2 * GiB)], RAM, vram="8GiB")
    g = uncapped.device_usage("cuda:0")
    assert g.available == 2 * GiB and g.margin == DEFAULT_MARGIN_BYTES  # free memory is the limit


def test_hypothetical_gpu_without_cuda():
    plan = plan_placement(toy(), PlanConfig(1024), [], RAM, vram="100MiB")
    assert plan.hypothetical and plan.device_usage("cuda:0").available == 100 * MiB
    assert any("hypothetical" in w for w in plan.warnings)
    two = plan_placement(toy(), PlanConfig(1024), [], RAM, vram="1GiB,1GiB", gpu_layers="all")
    assert {u.device for u in two.usage} == {"cuda:0", "cuda:1", "cpu"}


# ------------------------------------------------------------------------------------------- several GPUs

def test_split_by_free_memory_uneven():
    s, c = toy(n_layer=30), cfg(1024)
    plan = plan_placement(s, c, [gpu(8 * GiB, "cuda:0"), gpu(4 * GiB, "cuda:1")], RAM, "all")
    a, b = plan.device_usage("cuda:0"), plan.device_usage("cuda:1")
    assert a.layers == tuple(range(21)) and b.layers == tuple(range(21, 30)) and b.has_output  # 31 units, 2:1
    assert plan.output_device == "cuda:1"
    assert b.weights == 9 * LAYER + OUT + NORM and a.weights == 21 * LAYER
    assert a.compute == activation_bytes(s, c) and b.compute == activation_bytes(s, c) + logits_bytes(s, c)
    assert plan.summary() == "30/30 layers on GPU (cuda:0: 0-20, cuda:1: 21-29), output head on cuda:1"


def test_explicit_split_and_overflow():
    s, c = toy(n_layer=30), cfg(1024)
    gpus = [gpu(8 * GiB, "cuda:0"), gpu(300 * MiB, "cuda:1")]
    plan = plan_placement(s, c, gpus, RAM, 30, tensor_split="1,1")
    assert plan.device_usage("cuda:0").layers == tuple(range(15))
    with pytest.raises(PlanError, match="cuda:1"):
        plan_placement(s, c, gpus, RAM, 30, tensor_split="1,9")  # 27 layers on a 300 MiB GPU
    auto = plan_placement(s, c, gpus, RAM, "auto", tensor_split="1,9")
    assert auto.fits and auto.n_gpu_layers < 30
    only_second = plan_placement(s, c, [gpu(8 * GiB, "cuda:0"), gpu(8 * GiB, "cuda:1")], RAM, 31,
                                 tensor_split="0,1")
    idle = only_second.device_usage("cuda:0")
    assert idle.layers == () and idle.required == 0


# ------------------------------------------------------------------------------------------ tied embeddings

def test_tied_head_duplicates_token_embd_on_gpu():
    s, c = toy(tied=True), cfg(1024)
    plan = plan_placement(s, c, [gpu(8 * GiB)], RAM, "all")
    assert plan.output_device == "cuda:0" and plan.embd_device == "cpu"
    assert plan.device_usage("cuda:0").weights == 10 * LAYER + NORM + EMBD  # the head's copy of token_embd
    assert plan.device_usage("cpu").weights == EMBD  # the lookup table stays on the CPU
    on_cpu = plan_placement(s, c, [gpu(8 * GiB)], RAM, 10)
    assert on_cpu.device_usage("cpu").weights == EMBD + NORM  # one shared copy
    untied = plan_placement(toy(tied=False), c, [gpu(8 * GiB)], RAM, "all")
    assert untied.device_usage("cuda:0").weights == 10 * LAYER + NORM + OUT
    assert untied.device_usage("cpu").weights == EMBD


# --------------------------------------------------------------------------------------------------- errors

def test_explicit_n_too_big_names_required_and_available():
    s, c = toy(), cfg(2048)
    with pytest.raises(PlanError) as e:
        plan_placement(s, c, [gpu(130 * MiB)], RAM, gpu_layers=10)
    need = 10 * (LAYER + kv_bytes_per_layer(s, c)) + activation_bytes(s, c)
    msg = str(e.value)
    assert f"requires {need} bytes" in msg and f"{130 * MiB} bytes" in msg and "cuda:0" in msg
    assert "smaller context (at most -c " in msg and "fewer GPU layers (at most" in msg and "quantization" in msg
    best = plan_placement(s, c, [gpu(130 * MiB)], RAM).n_gpu_layers
    ctx = int(msg.split("at most -c ")[1].split()[0])
    assert f"at most {best} fit" in msg and 256 <= ctx < 2048
    assert plan_placement(s, cfg(ctx), [gpu(130 * MiB)], RAM, 10).fits  # the suggestion holds
    with pytest.raises(PlanError) as e:  # the weights alone fill the GPU: no context can help
        plan_placement(s, c, [gpu(100 * MiB)], RAM, gpu_layers=10)
    assert "smaller context" not in str(e.value) and "fewer GPU layers" in str(e.value)


def test_ngl_without_gpu_and_bad_values():
    with pytest.raises(PlanError, match="no CUDA device"):
        plan_placement(toy(), cfg(), [], RAM, gpu_layers=5)
    cpu_only = plan_placement(toy(), cfg(), [], RAM, "auto")
    assert cpu_only.n_gpu_layers == 0 and cpu_only.summary() == "0/10 layers on GPU, output head on CPU"
    assert plan_placement(toy(), cfg(), [], RAM, 0).gpu_layers == 0
    for bad in (-1, "many", 2.5, True):
        with pytest.raises(PlanError):
            plan_placement(toy(), cfg(), [gpu(GiB)], RAM, bad)
    for bad in (dict(n_ctx=0), dict(n_ctx=8, n_batch=0), dict(n_ctx=8, kv_dtype="q5_7"), dict(n_ctx=8, type_v="bf17"), dict(n_ctx=8, n_seq=0)):
        with pytest.raises(PlanError):
            PlanConfig(**bad)


def test_ram_too_small():
    s, c = toy(), cfg(1024)
    need_cpu = 10 * kv_bytes_per_layer(s, c) + activation_bytes(s, c) + logits_bytes(s, c) + embedding_bytes(s, c)
    with pytest.raises(PlanError, match="RAM") as e:
        plan_placement(s, c, [], need_cpu - 1, "auto")
    assert str(need_cpu) in str(e.value)
    assert plan_placement(s, c, [], need_cpu, "auto").fits
    # a GPU takes the KV off the CPU: auto offloads, gpu_layers=0 cannot fit
    assert plan_placement(s, c, [gpu(8 * GiB)], need_cpu - 1, "auto").gpu_layers == 11
    with pytest.raises(PlanError, match="more GPU layers"):
        plan_placement(s, c, [gpu(8 * GiB)], need_cpu - 1, 0)


def test_warnings():
    plan = plan_placement(toy(), cfg(8192), [], 10 * GiB)
    assert any("training context 4096" in w for w in plan.warnings)
    s, c = toy(), cfg(256)
    tight = plan_placement(s, c, [], plan_placement(s, c, [], RAM).device_usage("cpu").required)
    assert any("re-read from disk" in w for w in tight.warnings)


# ---------------------------------------------------------------------------------------------- printing

def test_format_plan_shows_the_numbers():
    s, c = toy(), cfg(1024)
    plan = plan_placement(s, c, [gpu(8 * GiB)], RAM, 4)
    text = format_plan(plan)
    g = plan.device_usage("cuda:0")
    for n in (g.weights, g.kv, g.compute, g.required, g.available):
        assert fmt_bytes(n) in text
    assert "40.00 MiB" in text  # 4 layers of 10 MiB
    assert "layers 0-5" in text and "layers 6-9" in text and "-> cuda:0" in text
    assert text.splitlines()[-1] == "4/10 layers on GPU (cuda:0: 6-9), output head on CPU"
    assert fmt_bytes(0) == "0 B" and fmt_bytes(1536) == "1.50 KiB" and fmt_bytes(3 * GiB // 2) == "1.50 GiB"


# ------------------------------------------------------------------------------------------- real headers

@pytest.fixture(scope="module")
def smollm2():
    from qf.tools.fetch import fetch_model
    return fetch_model()


@pytest.mark.slow
def test_smollm2_sizes_match_gguf_py(smollm2):
    from gguf import GGUFReader

    from qf.format.reader import open_gguf
    with open_gguf(smollm2) as f:
        s = sizes_from_gguf(f, smollm2)
    ref = GGUFReader(smollm2)
    nbytes = {t.name: int(t.n_bytes) for t in ref.tensors}
    assert s.file_bytes == sum(nbytes.values())
    for i in (0, 29):
        assert s.layers[i].nbytes == sum(v for k, v in nbytes.items() if k.startswith(f"blk.{i}."))
    assert s.n_layer == 30 and s.tied and s.n_vocab == 49152 and s.head_dim_k == 64 and s.n_head_kv == 3
    assert s.token_embd.nbytes == nbytes["token_embd.weight"] and s.output.nbytes == nbytes["output_norm.weight"]


@pytest.mark.slow
def test_smollm2_plan_100mib(smollm2):
    plan = plan_from_file(smollm2, 2048, vram="100MiB", devices=[], ram=8 * GiB)
    assert 0 < plan.n_gpu_layers < 30 and plan.output_device == "cpu" and plan.hypothetical
    assert plan.layer_devices[-1] == "cuda:0" and plan.layer_devices[0] == "cpu"
    g = plan.device_usage("cuda:0")
    assert g.required <= 100 * MiB and g.kv == plan.n_gpu_layers * 2 * 2048 * 3 * 64 * 2
    text = format_plan(plan)
    assert f"{plan.n_gpu_layers}/30 layers on GPU" in text and "100.00 MiB" in text
    full = plan_from_file(smollm2, 2048, vram="1GiB", devices=[], ram=8 * GiB)
    assert full.gpu_layers == 31 and full.output_device == "cuda:0"
    with pytest.raises(PlanError, match="104857600 bytes"):
        plan_from_file(smollm2, 2048, 30, vram="100MiB", devices=[], ram=8 * GiB)


@pytest.mark.slow
def test_gemma3_header_uses_key_length():
    from qf.tools.fetch import fetch_model
    plan = plan_from_file(fetch_model("gemma3-270m-q4_k_m"), 4096, "all", vram="4GiB", devices=[], ram=8 * GiB)
    assert plan.device_usage("cuda:0").kv == 18 * 4096 * 1 * (256 + 256) * 2


# ------------------------------------------------------------------------------------ synthetic GGUF files

def _write_gguf(path, n_layer=2, kv=None, tensors=None, tied=True):
    """A tiny llama GGUF written with gguf-py: F32 tensors, hyperparameters overridable."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    hp = dict(block_count=n_layer, embedding_length=64, feed_forward_length=128, context_length=256,
              **{"attention.head_count": 4, "attention.head_count_kv": 2})
    hp.update(kv or {})
    for k, v in hp.items():
        if isinstance(v, list):
            w.add_array(f"llama.{k}", v)
        else:
            w.add_uint32(f"llama.{k}", v)
    names = tensors if tensors is not None else (
        ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
        + [f"blk.{i}.{t}" for i in range(n_layer) for t in ("attn_q.weight", "ffn_up.weight")])
    for n in names:
        shape = (64,) if "norm" in n else (100, 64) if n in ("token_embd.weight", "output.weight") else (64, 64)
        w.add_tensor(n, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_plan_from_tiny_file(tmp_path):
    p = _write_gguf(tmp_path / "t.gguf", tied=False)
    plan = plan_from_file(p, 128, "all", vram="1GiB", devices=[], ram=GiB)
    g = plan.device_usage("cuda:0")
    assert g.weights == 2 * 2 * 64 * 64 * 4 + 64 * 4 + 100 * 64 * 4  # 2 layers x 2 tensors, norm, output
    assert g.kv == 2 * 128 * 2 * (16 + 16) * 2
    cpu_only = plan_from_file(p, devices=[], ram=GiB)  # n_ctx defaults to the training context
    assert cpu_only.n_ctx == 256 and cpu_only.n_gpu_layers == 0
    per_layer = _write_gguf(tmp_path / "a.gguf", kv={"attention.head_count_kv": [2, 1]})
    with pytest.raises(ModelError, match="head_count_kv: per-layer values"):  # the runtime's reader refuses them
        plan_from_file(per_layer, 128, "all", vram="1GiB", devices=[], ram=GiB)


@pytest.mark.parametrize("kv, tensors, match", [
    ({"block_count": 0}, None, "block_count"),
    ({"attention.head_count": 0}, None, "head_count"),
    ({"attention.head_count_kv": 3}, None, "head_count_kv"),
    ({"embedding_length": 66}, None, "embedding_length"),
    ({}, ["token_embd.weight", "blk.0.attn_q.weight", "blk.2.attn_q.weight"], "blk.2"),
    ({}, ["token_embd.weight", "blk.0.attn_q.weight"], "layer 1 has no tensors"),
    ({}, ["blk.0.attn_q.weight", "blk.1.attn_q.weight"], "token_embd.weight"),
])
def test_bad_hyperparameters(tmp_path, kv, tensors, match):
    p = _write_gguf(tmp_path / "bad.gguf", kv=kv, tensors=tensors)
    with pytest.raises(ModelError, match=match):
        plan_from_file(p, 128, devices=[], ram=GiB)


def test_missing_hyperparameter_and_wrong_type(tmp_path):
    import gguf
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_string("llama.embedding_length", "big")
    w.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(FormatError, match="embedding_length"):
        plan_from_file(p, 128, devices=[], ram=GiB)


# ---------------------------------------------------------------------------------------------- devices

def test_devices_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert devmod.cuda_devices() == []
    assert devmod.free_ram() > 0 and devmod.host_device().name == "cpu"


def test_devices_with_fake_cuda(monkeypatch):
    cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                                 mem_get_info=lambda k: ((7 - k) * GiB, 8 * GiB))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert devmod.cuda_devices() == [Device("cuda:0", 7 * GiB, 8 * GiB), Device("cuda:1", 6 * GiB, 8 * GiB)]

    def lost(k):
        raise RuntimeError("CUDA error: device lost")
    cuda.mem_get_info = lost
    assert devmod.cuda_devices() == []


def test_planner_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import qf.runtime.planner, qf.runtime.devices; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
