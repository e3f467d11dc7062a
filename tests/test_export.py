""".qf/.gguf -> Hugging Face folder: values, config, atomic publication; round trips on tiny and real models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qf.convert.checkpoint import Checkpoint
from qf.convert.export import export_hf
from qf.convert.pipeline import convert
from qf.convert.safetensors_io import SafetensorsFile, bf16_bits_to_f32, f32_to_bf16_bits
from qf.format.errors import ConvertError
from qf.format.reader import open_gguf


def hf_tensors(d) -> dict[str, np.ndarray]:
    with Checkpoint(d) as ck:
        return {n: ck.to_f32(n).copy() for n in ck.names()}


def test_f32_export_restores_the_checkpoint_exactly(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(tied=False, bias=True, config={"attention_bias": True})
    convert(src, tmp_path / "m.qf", "F32")
    out = export_hf(tmp_path / "m.qf", tmp_path / "hf", dtype="float32")
    a, b = hf_tensors(src), hf_tensors(out)
    assert set(a) == set(b)
    for n in a:
        assert np.array_equal(a[n], b[n]), n  # Q/K un-permuted, biases included
    cfg, orig = json.loads((out / "config.json").read_text()), json.loads((src / "config.json").read_text())
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "rope_theta", "vocab_size", "tie_word_embeddings",
              "bos_token_id", "eos_token_id"):
        assert cfg[k] == orig[k], k
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["attention_bias"] is True
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_exports_round_the_dequantized_values(tiny_checkpoint, tmp_path, dtype):
    convert(tiny_checkpoint(), tmp_path / "q.qf", "Q4_1")
    out = export_hf(tmp_path / "q.qf", tmp_path / "hf", dtype=dtype)
    with open_gguf(tmp_path / "q.qf") as f, SafetensorsFile(out / "model.safetensors") as st:
        x = f.dequantize("blk.0.ffn_up.weight")
        want = x.astype(np.float16).astype(np.float32) if dtype == "float16" else bf16_bits_to_f32(f32_to_bf16_bits(x))
        assert st.entry("model.layers.0.mlp.up_proj.weight").dtype == ("F16" if dtype == "float16" else "BF16")
        assert np.array_equal(st.to_f32("model.layers.0.mlp.up_proj.weight"), want)
        assert "lm_head.weight" not in st.keys()  # tied
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def test_reconverting_an_f16_export_is_bit_exact(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint(tied=False), tmp_path / "a.qf", "Q5_0")
    hf1 = export_hf(tmp_path / "a.qf", tmp_path / "hf1")
    convert(hf1, tmp_path / "b.qf", "F16")
    hf2 = export_hf(tmp_path / "b.qf", tmp_path / "hf2")
    convert(hf2, tmp_path / "c.qf", "F16")
    with open_gguf(tmp_path / "b.qf") as b, open_gguf(tmp_path / "c.qf") as c:
        assert list(b.tensors) == list(c.tensors)
        for n in b.tensors:
            assert np.array_equal(b.raw(n), c.raw(n)), n
    assert (hf1 / "tokenizer.json").read_bytes() == (hf2 / "tokenizer.json").read_bytes()


def test_qwen2_export(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(arch="Qwen2ForCausalLM", bias=True)
    convert(src, tmp_path / "q.qf", "F32")
    out = export_hf(tmp_path / "q.qf", tmp_path / "hf", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    a, b = hf_tensors(src), hf_tensors(out)
    assert all(np.array_equal(a[n], b[n]) for n in a) and set(a) == set(b)


def test_existing_folder_is_kept_unless_overwrite(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint(), tmp_path / "m.qf", "Q8_0")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists"):
        export_hf(tmp_path / "m.qf", out)
    assert (out / "keep.txt").read_text() == "mine"
    export_hf(tmp_path / "m.qf", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    import qf.convert.export as export

    convert(tiny_checkpoint(), tmp_path / "m.qf", "Q8_0")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_tokenizer_files", boom)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tmp_path / "m.qf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt1", "m.qf"]


def test_stale_temp_folders_of_dead_exports_are_removed(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint(), tmp_path / "m.qf", "Q8_0")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".hf.tmp-{dead.stdout.strip()}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".hf.tmp-{os.getpid()}-cafe"  # a live export's folder is left alone
    alive.mkdir()
    export_hf(tmp_path / "m.qf", tmp_path / "hf")
    assert not stale.exists() and alive.exists()


def test_bad_requests(tiny_checkpoint, tmp_path):
    d = tiny_checkpoint(config={"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    convert(d, tmp_path / "l3.qf", "F16")
    with pytest.raises(ConvertError, match="rope_freqs"):
        export_hf(tmp_path / "l3.qf", tmp_path / "hf")
    with pytest.raises(ConvertError, match="float16, bfloat16, float32"):
        export_hf(tmp_path / "l3.qf", tmp_path / "hf2", dtype="int8")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_unknown_architecture_is_refused_with_the_supported_list(tmp_path):
    from test_runtime_forward import build_tiny_gguf

    src = build_tiny_gguf(tmp_path / "starcoder2.gguf", arch="starcoder2")
    with pytest.raises(ConvertError, match="starcoder2.*supported: .*gemma3.*llama.*qwen2"):
        export_hf(src, tmp_path / "g")
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_smollm2_round_trip_is_bit_exact(smollm2_gguf, smollm2_hf, tmp_path):
    """GGUF -> HF (fixture) -> .qf F16 -> HF -> .qf F16: the two F16 files hold identical tensors."""
    convert(smollm2_hf, tmp_path / "a.qf", "F16")
    hf2 = export_hf(tmp_path / "a.qf", tmp_path / "hf2")
    convert(hf2, tmp_path / "b.qf", "F16")
    with open_gguf(smollm2_gguf) as g, open_gguf(tmp_path / "a.qf") as a, open_gguf(tmp_path / "b.qf") as b:
        assert list(a.tensors) == list(b.tensors) and set(a.tensors) == set(g.tensors)
        for n in a.tensors:
            assert a.info(n).type == b.info(n).type and np.array_equal(a.raw(n), b.raw(n)), n
            want = g.dequantize(n)
            if a.info(n).type.name == "F16":
                want = want.astype(np.float16).astype(np.float32)
            assert np.array_equal(a.dequantize(n), want), n  # and both equal the original, rounded to f16
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
                    "llama.rope.freq_base", "llama.context_length", "tokenizer.ggml.pre"):
            assert a.meta.raw(key)[1] == g.meta.raw(key)[1] == b.meta.raw(key)[1], key
        assert np.array_equal(a.meta.raw("tokenizer.ggml.token_type")[1], g.meta.raw("tokenizer.ggml.token_type")[1])


@pytest.mark.slow
def test_transformers_loads_the_exported_smollm2(smollm2_hf):
    """AutoModelForCausalLM + AutoTokenizer load the folder, and greedy decoding answers sensibly."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids.shape[1]:])
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(smollm2_hf / "tokenizer.json"))
    for text in ("Hello world! 12345", "<|im_start|>user\nhi<|im_end|>"):
        assert tok(text)["input_ids"] == raw.encode(text).ids
