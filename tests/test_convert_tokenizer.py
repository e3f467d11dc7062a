"""Tokenizer conversion both ways: tokenizer.json / tokenizer.model <-> tokenizer.ggml.* metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from qf.convert.export import export_hf, read_meta
from qf.convert.pipeline import convert
from qf.convert.tokenizer import tokenizer_kv
from qf.convert.tokenizer_export import bpe_tokenizer_json
from qf.convert.tokenizer_pre import CHECK_TEXT, RECIPES, pre_from_structure
from qf.format.errors import ConvertError
from qf.format.reader import open_gguf
from qf.format.vocab import TokenType

def runtime_tokenizer(path):
    """The runtime's own tokenizer built from the file's metadata, or None while qf.runtime cannot be imported."""
    try:
        from qf.runtime.tokenizer import load_tokenizer
    except ImportError:
        return None
    with open_gguf(path) as f:
        return load_tokenizer(f.meta, str(path))


TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, 12345 digits and 3.14159\ttabs\nnewlines\n\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé — “quotes” 😀 漢字 and emojis 🦙🦙",
    "I've been 'told' he's there, 'RE you sure? don't",
    "",
    CHECK_TEXT,
]


def meta_of(path: Path) -> dict:
    with open_gguf(path) as f:
        return read_meta(f)


def kv_dict(d: Path, cfg: dict | None = None) -> dict:
    return {k: v for k, v, _ in tokenizer_kv(d, cfg or json.loads((d / "config.json").read_text()))}


# ---- byte-level BPE (gpt2) -----------------------------------------------------------------

def test_bpe_metadata(tiny_checkpoint, tmp_path):
    d = tiny_checkpoint()
    convert(d, tmp_path / "m.qf", "F16")
    meta = meta_of(tmp_path / "m.qf")
    tok = json.loads((d / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    types = np.asarray(meta["tokenizer.ggml.token_type"])
    assert types[:3].tolist() == [TokenType.CONTROL] * 3 and set(types[3:].tolist()) == {TokenType.NORMAL}
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert (meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (0, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def test_metadata_tokenizer_encodes_like_tokenizer_json(tiny_checkpoint, tmp_path):
    d = tiny_checkpoint()
    convert(d, tmp_path / "m.qf", "Q8_0")
    original = Tokenizer.from_file(str(d / "tokenizer.json"))
    rebuilt = Tokenizer.from_str(json.dumps(bpe_tokenizer_json(meta_of(tmp_path / "m.qf"))))
    runtime = runtime_tokenizer(tmp_path / "m.qf")
    for text in TEXTS:
        assert rebuilt.encode(text).ids == original.encode(text).ids, text
        assert runtime is None or runtime.encode(text, add_special=False) == original.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("pre", sorted(RECIPES))
def test_each_recipe_is_detected_and_rebuilt(tiny_checkpoint, tmp_path, pre):
    d = tiny_checkpoint()
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["pre_tokenizer"], tok["normalizer"] = RECIPES[pre]["pre_tokenizer"], RECIPES[pre]["normalizer"]
    tok["model"]["ignore_merges"] = RECIPES[pre]["ignore_merges"]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    assert pre_from_structure(tok) == pre
    convert(d, tmp_path / "r.qf", "F16")
    meta = meta_of(tmp_path / "r.qf")
    assert meta["tokenizer.ggml.pre"] == pre
    original, rebuilt = Tokenizer.from_str(json.dumps(tok)), Tokenizer.from_str(json.dumps(bpe_tokenizer_json(meta)))
    for text in TEXTS:
        assert rebuilt.encode(text).ids == original.encode(text).ids, (pre, text)


def test_unknown_pre_tokenizer_is_refused(tiny_checkpoint):
    d = tiny_checkpoint()
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConvertError, match="not recognized.*known: .*llama-bpe.*smollm"):
        kv_dict(d)


def test_non_byte_level_tokenizer_json_is_refused(tiny_checkpoint):
    d = tiny_checkpoint()
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"] = {"type": "WordPiece", "vocab": {"a": 0}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConvertError, match="byte-level BPE"):
        kv_dict(d)


def test_template_post_processor_sets_add_bos(tiny_checkpoint):
    d = tiny_checkpoint()
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [], "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                                            "tokens": ["<|im_start|>"]}}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    kv = kv_dict(d)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    rebuilt = Tokenizer.from_str(json.dumps(bpe_tokenizer_json(kv)))
    assert rebuilt.encode("hello").ids[0] == 1
    assert rebuilt.encode("hello").ids == Tokenizer.from_str(json.dumps(tok)).encode("hello").ids


def test_merges_as_pairs_and_padding_tokens(tiny_checkpoint):
    d = tiny_checkpoint()
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in tok["model"]["merges"]]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    n = len(tok["model"]["vocab"])
    kv = kv_dict(d, {"vocab_size": n + 3})
    assert kv["tokenizer.ggml.tokens"][-3:] == [f"[PAD{n}]", f"[PAD{n + 1}]", f"[PAD{n + 2}]"]
    assert kv["tokenizer.ggml.token_type"][-1] == TokenType.UNUSED
    assert all(" " in m for m in kv["tokenizer.ggml.merges"])


def test_chat_template_from_jinja_file_and_named_list(tiny_checkpoint):
    d = tiny_checkpoint()
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    del tcfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (d / "chat_template.jinja").write_text("{{ messages }}")
    assert kv_dict(d)["tokenizer.chat_template"] == "{{ messages }}"
    tcfg["chat_template"] = [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    kv = kv_dict(d)
    assert kv["tokenizer.chat_template"] == "A" and kv["tokenizer.chat_template.tool_use"] == "B"


def test_bad_token_ids_are_refused(tiny_checkpoint):
    d = tiny_checkpoint()
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz"] = -4
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConvertError, match=r"'model\.vocab\.zzz' must be an integer >= 0, got -4"):
        kv_dict(d)
    tok["model"]["vocab"]["zzz"] = 5  # already taken
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConvertError, match="id 5 is used by two tokens"):
        kv_dict(d)


# ---- SentencePiece (llama) -----------------------------------------------------------------

def test_sentencepiece_metadata(tiny_checkpoint, tiny_spm_model, tmp_path):
    d = tiny_checkpoint(tokenizer="spm")
    convert(d, tmp_path / "s.qf", "Q8_0")
    meta = meta_of(tmp_path / "s.qf")
    sp = spm.SentencePieceProcessor(model_file=str(tiny_spm_model))
    n = sp.vocab_size()
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert np.array_equal(meta["tokenizer.ggml.scores"], np.array([sp.get_score(i) for i in range(n)], np.float32))
    types = np.asarray(meta["tokenizer.ggml.token_type"])
    assert types[sp.unk_id()] == TokenType.UNKNOWN
    assert types[sp.bos_id()] == types[sp.eos_id()] == TokenType.CONTROL
    assert types[sp.piece_to_id("<tool>")] == TokenType.USER_DEFINED
    assert all(types[i] == TokenType.BYTE for i in range(n) if sp.is_byte(i))
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    assert meta["tokenizer.ggml.unknown_token_id"] == sp.unk_id()
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.add_space_prefix"] is True


def test_sentencepiece_export_encodes_like_the_original(tiny_checkpoint, tiny_spm_model, tmp_path):
    d = tiny_checkpoint(tokenizer="spm")
    convert(d, tmp_path / "s.qf", "F16")
    out = export_hf(tmp_path / "s.qf", tmp_path / "hf")
    original = spm.SentencePieceProcessor(model_file=str(tiny_spm_model))
    exported = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    runtime = runtime_tokenizer(tmp_path / "s.qf")  # the runtime reads the same metadata
    for text in TEXTS + ["the fox <tool> jumps", "zebra quokka ñ"]:
        assert exported.encode(text) == original.encode(text), text
        if "<tool>" not in text:  # llama.cpp (and so the runtime) puts a space after a user-defined token
            assert runtime is None or runtime.encode(text, add_special=False) == original.encode(text), text
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert tcfg["add_bos_token"] is True


def test_sentencepiece_added_tokens_and_padding(tiny_checkpoint):
    d = tiny_checkpoint(tokenizer="spm")
    (d / "added_tokens.json").write_text(json.dumps({"<extra_0>": 320, "<extra_1>": 321}))
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tcfg["added_tokens_decoder"] = {"3": {"content": "<|tool|>", "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    kv = kv_dict(d, {"vocab_size": 324})
    toks, types, scores = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.scores"]
    assert toks[320:] == ["<extra_0>", "<extra_1>", "[PAD322]", "[PAD323]"]
    assert types[320:].tolist() == [TokenType.USER_DEFINED] * 2 + [TokenType.UNUSED] * 2
    assert toks[3] == "<|tool|>" and types[3] == TokenType.CONTROL and scores[3] == -1000.0


def test_tokenizer_model_takes_precedence(tiny_checkpoint, tiny_bpe_json):
    d = tiny_checkpoint(tokenizer="spm")
    (d / "tokenizer.json").write_text(json.dumps(tiny_bpe_json))
    assert kv_dict(d)["tokenizer.ggml.model"] == "llama"


def test_corrupt_tokenizer_model(tiny_checkpoint):
    d = tiny_checkpoint(tokenizer="spm")
    (d / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(ConvertError, match="tokenizer.model"):
        kv_dict(d)
