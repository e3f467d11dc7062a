"""Hostile checkpoints, round two (issue #16): qconvert refuses them before writing, in bounded time and memory.

Each case builds a tiny random checkpoint, breaks one thing, and checks: our own error type naming the file and
field, a few seconds at most, a bounded Python heap peak (tracemalloc), nothing at a fresh output path, and an
existing output left byte for byte intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from qf.convert.checkpoint import Checkpoint
from qf.convert.pipeline import convert, plan_conversion
from qf.convert.tokenizer import MAX_PAD_TOKENS, tokenizer_kv
from qf.format.errors import ConvertError, FormatError, QFError
from qf.format.model_check import MAX_TEMPLATE_CHARS, KVMetadata, TensorDecl, validate_model
from qf.format.reader import open_gguf

MAX_SECONDS = 10.0  # per refused conversion (they take milliseconds; the bound is for a loaded 2-core machine)
MAX_PEAK_MIB = 48  # Python heap peak of a refused conversion (the tiny checkpoint itself needs a few MiB)
OLD = b"an existing output that must survive"


def measured(fn: Callable[[], Any], err: type[BaseException] = QFError) -> tuple[str, float, float]:
    """Run fn, which must raise err: (message, seconds, peak MiB of Python allocations)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(err) as ei:
            fn()
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    assert seconds < MAX_SECONDS, f"took {seconds:.1f} s"
    assert peak < MAX_PEAK_MIB, f"peak {peak:.1f} MiB"
    return str(ei.value), seconds, peak


def refused(d: Path, tmp: Path, err: type[BaseException] = ConvertError, qtype: str = "F16") -> str:
    """convert(d) fails with err, bounded; a fresh output is never created, an existing one is intact."""
    fresh, existing = tmp / "fresh.qf", tmp / "existing.qf"
    existing.write_bytes(OLD)
    before = sorted(os.listdir(tmp))
    msg, _, _ = measured(lambda: convert(d, fresh, qtype), err)
    measured(lambda: convert(d, existing, qtype), err)
    assert not fresh.exists() and existing.read_bytes() == OLD
    assert sorted(os.listdir(tmp)) == before, "no temp file left behind"
    return msg


def edit_json(path: Path, **changes: Any) -> None:
    """Set (or, with None, delete) top-level keys of a JSON file."""
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    path.write_text(json.dumps(obj))


def rewrite_weights(d: Path, writer, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Load the checkpoint's f32 weights, let change() edit the dict, write model.safetensors again."""
    with Checkpoint(d) as ck:
        w = {n: ck.to_f32(n).copy() for n in ck.names()}
    change(w)
    (d / "model.safetensors").unlink()
    writer(d, w)


@pytest.fixture
def gemma_checkpoint(tmp_path: Path, tiny_spm_model: Path) -> Callable[..., Path]:
    """Factory: a tiny random Gemma3ForCausalLM checkpoint (test_gemma3's builder)."""
    from test_gemma3 import _hf_gemma3

    count = [0]

    def make(config: dict[str, Any] | None = None) -> Path:
        count[0] += 1
        return _hf_gemma3(tmp_path / f"gemma{count[0]}", tiny_spm_model, config=config)

    return make


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


# ---------------------------------------------------------------------------------------------------------
# 1. nothing sized by an untrusted number before it is checked

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("size, words", [(20_000_000, "4194304"), (1_000_000, "320 rows")])
def test_huge_vocab_size_is_refused_before_padding(tiny_checkpoint, gemma_checkpoint, out_dir, arch, size, words):
    d = tiny_checkpoint() if arch == "llama" else gemma_checkpoint()
    edit_json(d / "config.json", vocab_size=size)
    msg = refused(d, out_dir)
    assert "config.json 'vocab_size'" in msg and str(size) in msg and words in msg


def test_huge_added_token_id_is_refused_before_padding(tiny_checkpoint, out_dir):
    d = tiny_checkpoint()
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 10**12, "content": "<far>", "special": True})
    (d / "tokenizer.json").write_text(json.dumps(tok))
    msg = refused(d, out_dir)
    assert "tokenizer.json" in msg and f"{10**12 + 1} tokens but embed_tokens has 320 rows" in msg


def test_huge_sentencepiece_added_id_is_refused(tiny_checkpoint, out_dir):
    d = tiny_checkpoint(tokenizer="spm")
    (d / "added_tokens.json").write_text(json.dumps({"<far>": 10**12}))
    assert "does not follow the vocabulary" in refused(d, out_dir)


@pytest.mark.parametrize("tokenizer", ["bpe", "spm"])
def test_padding_without_embedding_rows_is_bounded(tiny_checkpoint, tokenizer):
    d = tiny_checkpoint(tokenizer=tokenizer)
    msg, _, _ = measured(lambda: tokenizer_kv(d, {"vocab_size": 20_000_000}))
    assert "'vocab_size'" in msg and "4194304" in msg  # the shared limit on vocab_size
    msg, _, _ = measured(lambda: tokenizer_kv(d, {"vocab_size": 4_000_000}))
    assert f"limit {MAX_PAD_TOKENS}" in msg


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_absurd_layer_count_is_refused_before_any_loop(tiny_checkpoint, gemma_checkpoint, out_dir, arch):
    d = tiny_checkpoint() if arch == "llama" else gemma_checkpoint()
    edit_json(d / "config.json", num_hidden_layers=10**9)
    msg = refused(d, out_dir)
    assert "'num_hidden_layers'" in msg and "block_count" in msg and "[1, 512]" in msg


def test_absurd_head_dim_is_refused_before_the_rope_table(tiny_checkpoint, out_dir):
    d = tiny_checkpoint()
    edit_json(d / "config.json", head_dim=10**9, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    assert "'head_dim'" in refused(d, out_dir)


def test_layer_number_of_5000_digits_is_an_unknown_tensor(tiny_checkpoint, out_dir, weights_writer):
    d = tiny_checkpoint()
    rewrite_weights(d, weights_writer,
                    lambda w: w.update({f"model.layers.{'9' * 5000}.input_layernorm.weight": np.ones(64, np.float32)}))
    assert "no llama mapping" in refused(d, out_dir)


def test_oversized_template_file_is_refused_unread(tiny_checkpoint, out_dir):
    d = tiny_checkpoint()
    edit_json(d / "tokenizer_config.json", chat_template=None)
    (d / "chat_template.jinja").write_bytes(b"x" * (4 * MAX_TEMPLATE_CHARS + 1))
    msg = refused(d, out_dir)
    assert "chat_template.jinja" in msg and str(MAX_TEMPLATE_CHARS) in msg


# ---------------------------------------------------------------------------------------------------------
# 2. the conversion is cross-checked (by the runtime's validator) before anything is written

@pytest.mark.parametrize("config, words", [
    ({"hidden_size": 128}, "token_embd.weight"),
    ({"intermediate_size": 96}, "ffn_gate.weight"),
    ({"num_attention_heads": 8}, "attn_k.weight"),
    ({"num_key_value_heads": 4}, "attn_k.weight"),
    ({"head_dim": 32}, "attn_q.weight"),
    ({"num_key_value_heads": 3}, "does not divide"),
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' (llama.attention.layer_norm_rms_epsilon): value nan"),
    ({"rms_norm_eps": -1e-5}, "'rms_norm_eps'"),
    ({"rope_theta": float("inf")}, "'rope_theta' (llama.rope.freq_base): value inf"),
    ({"rope_theta": 1e39}, "'rope_theta' (llama.rope.freq_base): value inf"),  # f32 overflow
    ({"rope_theta": 0}, "'rope_theta'"),
    ({"max_position_embeddings": 1 << 30}, "'max_position_embeddings' (llama.context_length)"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}, "'rope_scaling.factor'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_config_contradicting_tensors_or_runtime_is_refused(tiny_checkpoint, out_dir, config, words):
    d = tiny_checkpoint()
    edit_json(d / "config.json", **config)
    msg = refused(d, out_dir)
    assert words in msg and ("config.json" in msg or "tensor" in msg)


def test_shape_disagreeing_with_tensor_names_the_hf_tensor(tiny_checkpoint, out_dir):
    d = tiny_checkpoint()
    edit_json(d / "config.json", intermediate_size=96)
    msg = refused(d, out_dir)
    assert "'model.layers.0.mlp.gate_proj.weight' (blk.0.ffn_gate.weight)" in msg and "(64, 128)" in msg


def test_3d_norm_is_refused(tiny_checkpoint, out_dir, weights_writer):
    d = tiny_checkpoint()
    rewrite_weights(d, weights_writer, lambda w: w.update({"model.norm.weight": w["model.norm.weight"].reshape(2, 4, 8)}))
    msg = refused(d, out_dir)
    assert "model.norm.weight" in msg and "(8, 4, 2)" in msg and "(64,)" in msg


def test_safetensors_shape_disagreeing_with_bytes_is_refused(tiny_checkpoint, out_dir):
    d = tiny_checkpoint()
    raw = bytearray((d / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["shape"] = [32]  # "[64]" -> "[32]": same length, half the bytes
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    raw[8:8 + n] = new
    (d / "model.safetensors").write_bytes(bytes(raw))
    msg = refused(d, out_dir, FormatError)
    assert "model.norm.weight" in msg and "needs 128 bytes" in msg


def test_output_bias_the_runtime_does_not_read_is_refused(tiny_checkpoint, out_dir, weights_writer):
    d = tiny_checkpoint()
    rewrite_weights(d, weights_writer,
                    lambda w: w.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}))
    msg = refused(d, out_dir)
    assert "wrong number of tensors" in msg and "blk.0.attn_output.bias" in msg


@pytest.mark.parametrize("where", ["tokenizer_config", "named"])
def test_oversized_chat_template_is_refused(tiny_checkpoint, out_dir, where):
    d = tiny_checkpoint()
    big = "x" * (MAX_TEMPLATE_CHARS + 1)
    tmpl = big if where == "tokenizer_config" else [{"name": "default", "template": "A"},
                                                    {"name": "tool_use", "template": big}]
    edit_json(d / "tokenizer_config.json", chat_template=tmpl)
    msg = refused(d, out_dir)
    assert "tokenizer_config.json" in msg and "exceeds the limit" in msg


def test_plan_and_written_file_pass_the_same_validator(tiny_checkpoint, tmp_path):
    """What plan_conversion checked is what the runtime reads back: the same HParams from both."""
    from qf.quant.codecs import registered_types

    d = tiny_checkpoint(config={"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    plan, ck = plan_conversion(d, "Q8_0")
    ck.close()
    out = convert(d, tmp_path / "m.qf", "Q8_0").path
    planned = validate_model(KVMetadata(plan.kv), {t.name: TensorDecl(t.ne, t.type) for t in plan.tensors},
                             str(d), registered_types(), {t.name: t.data for t in plan.tensors}.__getitem__)
    with open_gguf(out) as f:
        table = {n: TensorDecl(tuple(ti.ne), ti.type) for n, ti in f.tensors.items()}
        assert validate_model(f.meta, table, str(out), registered_types(), f.dequantize) == planned


# ---------------------------------------------------------------------------------------------------------
# 3. every error is our own error, naming the file, the field and what it must be

DEEP = "[" * 100_000 + "]" * 100_000
BIG_INT = "1" * 5000


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize("text", [DEEP, f'{{"a": {BIG_INT}}}', '{"a": 1'], ids=["deep", "bigint", "truncated"])
def test_malformed_json_is_a_convert_error(tiny_checkpoint, out_dir, name, text):
    d = tiny_checkpoint()
    (d / name).write_text(text)
    msg = refused(d, out_dir)
    assert name in msg and "not valid JSON" in msg


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_oversized_json_is_refused_unread(tiny_checkpoint, out_dir, name):
    from qf.convert.json_fields import MAX_JSON_BYTES

    d = tiny_checkpoint()
    with open(d / name, "r+b") as fh:  # sparse: no disk used
        fh.truncate(MAX_JSON_BYTES + 1)
    msg = refused(d, out_dir)
    assert name in msg and f"limit of {MAX_JSON_BYTES}" in msg


@pytest.mark.parametrize("text", [DEEP, f'{{"a": {BIG_INT}}}'], ids=["deep", "bigint"])
def test_malformed_safetensors_header_is_a_format_error(tiny_checkpoint, out_dir, text):
    d = tiny_checkpoint()
    body = text.encode()
    (d / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    msg = refused(d, out_dir, FormatError)
    assert "model.safetensors" in msg and "not valid JSON" in msg


@pytest.mark.parametrize("rope, words", [
    ({"rope_type": "linear"}, "'rope_scaling.factor' is missing"),
    ({"rope_type": "linear", "factor": "2"}, "'rope_scaling.factor' must be a number"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0}, "'rope_scaling.low_freq_factor' must be a finite number > 0"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
     "'rope_scaling.high_freq_factor' must be a finite number > 4.0"),
    ({"rope_type": "llama3", "factor": "eight"}, "'rope_scaling.factor' must be a finite number"),
    ({"rope_type": "llama3", "factor": float("inf")}, "'rope_scaling.factor' must be a finite number"),
    ({"rope_type": "llama3", "original_max_position_embeddings": 8192.5}, "'rope_scaling.original_max_position_embeddings'"),
    ({"rope_type": 3}, "'rope_scaling.rope_type' must be a string"),
    ([1, 2], "'rope_scaling' must be a JSON object"),
])
def test_bad_rope_scaling_names_the_field(tiny_checkpoint, out_dir, rope, words):
    d = tiny_checkpoint()
    edit_json(d / "config.json", rope_scaling=rope)
    assert words in refused(d, out_dir)


@pytest.mark.parametrize("key, value, words", [
    ("num_hidden_layers", True, "'num_hidden_layers' must be a positive integer, got True"),
    ("num_hidden_layers", 2.0, "'num_hidden_layers' must be a positive integer, got 2.0"),
    ("hidden_size", "64", "'hidden_size' must be a positive integer"),
    ("max_position_embeddings", -1, "'max_position_embeddings' must be a positive integer"),
    ("rms_norm_eps", "tiny", "'rms_norm_eps' must be a number"),
    ("rope_theta", [10000], "'rope_theta' must be a number"),
    ("tie_word_embeddings", "no", "'tie_word_embeddings' must be true or false"),
    ("vocab_size", "320", "'vocab_size' must be a positive integer"),
    ("bos_token_id", "1", "'bos_token_id' must be an integer"),
    ("_name_or_path", 7, "'_name_or_path' must be a string"),
])
def test_mistyped_config_fields_name_the_field(tiny_checkpoint, out_dir, key, value, words):
    d = tiny_checkpoint()
    edit_json(d / "config.json", **{key: value})
    msg = refused(d, out_dir)
    assert words in msg and "config.json" in msg


@pytest.mark.parametrize("edit, words", [
    (lambda t: t["model"].update(vocab=list(t["model"]["vocab"])), "'model.vocab' must be a JSON object"),
    (lambda t: t.update(added_tokens=5), "'added_tokens' must be a JSON array"),
    (lambda t: t["model"]["vocab"].update(zzz="5"), "'model.vocab.zzz' must be an integer >= 0, got '5'"),
    (lambda t: t["added_tokens"][0].update(id="0"), "'added_tokens[0].id' must be an integer >= 0"),
    (lambda t: t["added_tokens"].append(7), "'added_tokens[3]' must be a JSON object"),
    (lambda t: t["model"].update(merges={"a": "b"}), "'model.merges' must be a JSON array"),
    (lambda t: t["model"]["merges"].append(3), "'model.merges["),
    (lambda t: t.update(model=[]), "'model' must be a JSON object"),
])
def test_mistyped_tokenizer_json_names_the_field(tiny_checkpoint, out_dir, edit, words):
    d = tiny_checkpoint()
    tok = json.loads((d / "tokenizer.json").read_text())
    edit(tok)
    (d / "tokenizer.json").write_text(json.dumps(tok))
    msg = refused(d, out_dir)
    assert words in msg and "tokenizer.json" in msg


@pytest.mark.parametrize("tokenizer, changes, words", [
    ("bpe", {"add_bos_token": "yes"}, "'add_bos_token' must be true or false"),
    ("bpe", {"bos_token": 5}, "'bos_token' must be a string or"),
    ("bpe", {"bos_token": {"content": 5}}, "'bos_token.content' must be a string"),
    ("bpe", {"chat_template": 5}, "'chat_template' must be a string or a JSON array"),
    ("bpe", {"chat_template": [{"name": "x"}]}, "'chat_template[0].template' is missing"),
    ("bpe", {"add_prefix_space": 1}, "'add_prefix_space' must be true or false"),
    ("spm", {"added_tokens_decoder": {"abc": {"content": "x"}}}, "'added_tokens_decoder.abc' must be keyed"),
    ("spm", {"added_tokens_decoder": {"9" * 5000: {"content": "x"}}}, "must be keyed by a decimal token id"),
    ("spm", {"added_tokens_decoder": {"3": {"content": 3}}}, "'added_tokens_decoder.3.content' must be a string"),
    ("spm", {"added_tokens_decoder": []}, "'added_tokens_decoder' must be a JSON object"),
])
def test_mistyped_tokenizer_config_names_the_field(tiny_checkpoint, out_dir, tokenizer, changes, words):
    d = tiny_checkpoint(tokenizer=tokenizer)
    edit_json(d / "tokenizer_config.json", **changes)
    msg = refused(d, out_dir)
    assert words in msg and "tokenizer_config.json" in msg


def test_mistyped_added_tokens_json_names_the_field(tiny_checkpoint, out_dir):
    d = tiny_checkpoint(tokenizer="spm")
    (d / "added_tokens.json").write_text(json.dumps({"<x>": "320"}))
    assert "added_tokens.json '<x>' must be an integer >= 0" in refused(d, out_dir)


@pytest.mark.parametrize("config, words", [
    ({"query_pre_attn_scalar": "x"}, "'query_pre_attn_scalar' must be a finite number"),
    ({"final_logit_softcapping": "x"}, "'final_logit_softcapping' must be a number"),
    ({"rope_local_base_freq": "x"}, "'rope_local_base_freq' must be a number"),
    ({"sliding_window": "4"}, "'sliding_window' must be a positive integer"),
    ({"sliding_window_pattern": 0}, "'sliding_window_pattern' must be a positive integer"),
    ({"layer_types": "sliding"}, "'layer_types' must be a JSON array"),
    ({"rope_parameters": {"full_attention": []}}, "'rope_parameters.full_attention' must be a JSON object"),
    ({"rope_local_base_freq": float("nan")}, "gemma3.rope.freq_base_swa"),
])
def test_mistyped_gemma3_config_names_the_field(gemma_checkpoint, out_dir, config, words):
    d = gemma_checkpoint()
    edit_json(d / "config.json", **config)
    assert words in refused(d, out_dir)


# ---------------------------------------------------------------------------------------------------------
# 4. the output may not be one of the inputs

def _hash(p: Path) -> bytes:
    import hashlib

    return hashlib.sha256(p.read_bytes()).digest()


@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink", "config", "shard"])
def test_output_resolving_to_an_input_is_refused(tiny_checkpoint, tmp_path, how, monkeypatch):
    d = tiny_checkpoint(shards=2 if how == "shard" else 1)
    target = {"config": d / "config.json",
              "shard": d / "model-00002-of-00002.safetensors"}.get(how, d / "model.safetensors")
    out = target
    if how == "relative":
        monkeypatch.chdir(tmp_path)
        out = Path(d.name) / ".." / d.name / target.name
    elif how == "symlink":
        out = tmp_path / "link.qf"
        out.symlink_to(target)
    elif how == "hardlink":
        out = tmp_path / "hard.qf"
        os.link(target, out)
    before = {p.name: _hash(p) for p in d.iterdir()}
    msg, _, _ = measured(lambda: convert(d, out, "F16"), ConvertError)
    assert "is the input file" in msg and str(target.name) in msg
    assert {p.name: _hash(p) for p in d.iterdir()} == before


def test_qconvert_cli_refuses_its_own_checkpoint(tiny_checkpoint):
    d = tiny_checkpoint()
    before = _hash(d / "model.safetensors")
    r = subprocess.run([sys.executable, "-m", "qf.tools.qconvert", str(d), str(d / "model.safetensors"), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "qconvert: error:" in r.stderr and "Traceback" not in r.stderr
    assert _hash(d / "model.safetensors") == before


def test_writing_into_the_checkpoint_folder_is_still_allowed(tiny_checkpoint):
    d = tiny_checkpoint()
    assert convert(d, d / "out.qf", "Q8_0").path.is_file()


# ---------------------------------------------------------------------------------------------------------
# the CLI under an address-space limit: a hostile size cannot make it allocate

def test_qconvert_huge_vocab_under_rlimit_as(tiny_checkpoint, tmp_path):
    """2e7 tokens would need GBs: under a 2 GiB address-space cap the CLI exits 2 with our message."""
    d = tiny_checkpoint()
    edit_json(d / "config.json", vocab_size=20_000_000)
    code = ("import resource, runpy, sys; lim = 2 << 30; resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); "
            "sys.argv = ['qconvert'] + sys.argv[1:]; runpy.run_module('qf.tools.qconvert', run_name='__main__')")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, str(d), str(tmp_path / "o.qf"), "-q"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "'vocab_size'" in r.stderr and "20000000" in r.stderr and "MemoryError" not in r.stderr
    assert not (tmp_path / "o.qf").exists() and time.perf_counter() - t0 < 60
