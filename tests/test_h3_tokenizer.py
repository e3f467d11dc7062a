"""Hostile input, round two (#16): tokenizer metadata of the wrong type or nesting, and bounded encoding."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qf.runtime.tokenizer as tokmod
from gguf_builder import RawGGUF, arr, gstr, kv
from qf.format.errors import ContextOverflowError, FormatError, ModelError, QFError
from qf.format.reader import open_gguf
from qf.format.values import GGUFValueType as V
from qf.runtime.tokenizer import BpeTokenizer, SpmTokenizer, Tokenizer, load_tokenizer
from test_tokenizer import TEXTS, DictMeta, _spm_meta_from_model

# ---------------------------------------------------------------------------------------------
# Raw tokenizer files: every value typed by hand, so any type or nesting can be written


def strings(items: list[str]) -> bytes:
    """An ARRAY of STRING value."""
    return arr(V.STRING, len(items), b"".join(gstr(s.encode("utf-8", "surrogateescape")) for s in items))


def numbers(vtype: V, code: str, items: list[Any]) -> bytes:
    """An ARRAY of a numeric type (struct code)."""
    return arr(vtype, len(items), struct.pack(f"<{len(items)}{code}", *items))


def scalar(vtype: V, code: str, v: Any) -> tuple[int, bytes]:
    """(type tag, payload) of one scalar value."""
    return vtype, struct.pack(f"<{code}", v)


def _byte_chars() -> list[str]:
    from qf.runtime.tokenizer import _byte_decoder

    return sorted(_byte_decoder(), key=lambda c: _byte_decoder()[c])


BPE_TOKENS = ["<|endoftext|>", "<|im_start|>"] + _byte_chars() + ["he", "ll", "hell", "Ġw"]
BPE_MERGES = ["h e", "l l", "he ll", "Ġ w"]
SPM_TOKENS = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab"] + [f"<0x{i:02X}>" for i in range(256)]


def bpe_kvs() -> dict[str, tuple[int, bytes]]:
    """A valid gpt2 tokenizer: key -> (type tag, payload)."""
    n = len(BPE_TOKENS)
    return {"tokenizer.ggml.model": (V.STRING, gstr("gpt2")), "tokenizer.ggml.pre": (V.STRING, gstr("smollm")),
            "tokenizer.ggml.tokens": (V.ARRAY, strings(BPE_TOKENS)),
            "tokenizer.ggml.token_type": (V.ARRAY, numbers(V.INT32, "i", [3, 3] + [1] * (n - 2))),
            "tokenizer.ggml.merges": (V.ARRAY, strings(BPE_MERGES)),
            "tokenizer.ggml.bos_token_id": scalar(V.UINT32, "I", 1),
            "tokenizer.ggml.eos_token_id": scalar(V.UINT32, "I", 0)}


def spm_kvs() -> dict[str, tuple[int, bytes]]:
    """A valid llama (SentencePiece) tokenizer with byte fallback."""
    n = len(SPM_TOKENS)
    types = [2, 3, 3] + [1] * 5 + [6] * 256
    return {"tokenizer.ggml.model": (V.STRING, gstr("llama")),
            "tokenizer.ggml.tokens": (V.ARRAY, strings(SPM_TOKENS)),
            "tokenizer.ggml.scores": (V.ARRAY, numbers(V.FLOAT32, "f", [0.0] * 3 + [-1.0 * i for i in range(n - 3)])),
            "tokenizer.ggml.token_type": (V.ARRAY, numbers(V.INT32, "i", types)),
            "tokenizer.ggml.bos_token_id": scalar(V.UINT32, "I", 1),
            "tokenizer.ggml.eos_token_id": scalar(V.UINT32, "I", 2)}


def load(tmp_path: Path, kvs: dict[str, tuple[int, bytes]]) -> Tokenizer:
    """Write kvs as a GGUF file, open it with the reader and build its tokenizer."""
    p = tmp_path / "tok.gguf"
    p.write_bytes(RawGGUF(kvs=[kv(k, t, payload) for k, (t, payload) in kvs.items()]).build())
    with open_gguf(p) as f:
        return load_tokenizer(f.meta, str(p))


def test_the_hand_built_files_are_valid(tmp_path: Path) -> None:
    bpe = load(tmp_path, bpe_kvs())
    assert isinstance(bpe, BpeTokenizer) and bpe.decode(bpe.encode("hello world")) == "hello world"
    spm = load(tmp_path, spm_kvs())
    assert isinstance(spm, SpmTokenizer) and spm.decode(spm.encode("ab a b xyz")) == "ab a b xyz"


N_BPE, N_SPM = len(BPE_TOKENS), len(SPM_TOKENS)
# (base, key, (type tag, payload) or None to delete, regex the error must match)
HOSTILE = {
    "merges as integers": ("bpe", "tokenizer.ggml.merges", (V.ARRAY, numbers(V.INT32, "i", [1, 2])),
                           r"tokenizer\.ggml\.merges: expected ARRAY of STRING, found ARRAY of INT32"),
    "merges nested": ("bpe", "tokenizer.ggml.merges", (V.ARRAY, arr(V.ARRAY, 1, strings(["h e"]))),
                      r"tokenizer\.ggml\.merges: expected ARRAY of STRING, found ARRAY of ARRAY"),
    "merges as a string": ("bpe", "tokenizer.ggml.merges", (V.STRING, gstr("h e")),
                           r"tokenizer\.ggml\.merges.*expected ARRAY, found STRING"),
    "tokens nested": ("spm", "tokenizer.ggml.tokens", (V.ARRAY, arr(V.ARRAY, 2, strings(["a"]) * 2)),
                      r"tokenizer\.ggml\.tokens: expected ARRAY of STRING, found ARRAY of ARRAY"),
    "tokens as floats": ("bpe", "tokenizer.ggml.tokens", (V.ARRAY, numbers(V.FLOAT32, "f", [1.0] * N_BPE)),
                         r"tokenizer\.ggml\.tokens: expected ARRAY of STRING, found ARRAY of FLOAT32"),
    "token types as strings": ("spm", "tokenizer.ggml.token_type", (V.ARRAY, strings(["1"] * N_SPM)),
                               r"tokenizer\.ggml\.token_type: expected ARRAY of an integer type, "
                               r"found ARRAY of STRING"),
    "token types as floats": ("bpe", "tokenizer.ggml.token_type", (V.ARRAY, numbers(V.FLOAT64, "d", [1.0] * N_BPE)),
                              r"tokenizer\.ggml\.token_type: expected ARRAY of an integer type, "
                              r"found ARRAY of FLOAT64"),
    "token type out of range": ("spm", "tokenizer.ggml.token_type",
                                (V.ARRAY, numbers(V.INT32, "i", [2, 3, 7] + [1] * (N_SPM - 3))),
                                r"tokenizer\.ggml\.token_type\[2\]: token type 7 is out of range \[0, 6\]"),
    "token type negative": ("bpe", "tokenizer.ggml.token_type",
                            (V.ARRAY, numbers(V.INT64, "q", [1] * (N_BPE - 1) + [-2**40])),
                            rf"tokenizer\.ggml\.token_type\[{N_BPE - 1}\]: token type -1099511627776 is out of range"),
    "scores as integers": ("spm", "tokenizer.ggml.scores", (V.ARRAY, numbers(V.INT32, "i", [0] * N_SPM)),
                           r"tokenizer\.ggml\.scores: expected ARRAY of FLOAT32 or FLOAT64, found ARRAY of INT32"),
    "scores as strings": ("spm", "tokenizer.ggml.scores", (V.ARRAY, strings(["0.5"] * N_SPM)),
                          r"tokenizer\.ggml\.scores: expected ARRAY of FLOAT32 or FLOAT64, found ARRAY of STRING"),
    "scores as a float": ("spm", "tokenizer.ggml.scores", scalar(V.FLOAT32, "f", 0.5),
                          r"tokenizer\.ggml\.scores.*expected ARRAY, found FLOAT32"),
    "scores too short": ("spm", "tokenizer.ggml.scores", (V.ARRAY, numbers(V.FLOAT32, "f", [0.0] * 5)),
                         rf"tokenizer\.ggml\.scores: has 5 entries for {N_SPM} tokens"),
    "token types too long": ("bpe", "tokenizer.ggml.token_type", (V.ARRAY, numbers(V.INT32, "i", [1] * (N_BPE + 1))),
                             rf"tokenizer\.ggml\.token_type: has {N_BPE + 1} entries for {N_BPE} tokens"),
    "eos id out of range": ("spm", "tokenizer.ggml.eos_token_id", scalar(V.UINT32, "I", N_SPM),
                            rf"tokenizer\.ggml\.eos_token_id: token id {N_SPM} is out of range \[0, {N_SPM}\)"),
    "bos id huge": ("bpe", "tokenizer.ggml.bos_token_id", scalar(V.UINT64, "Q", 2**64 - 1),
                    r"tokenizer\.ggml\.bos_token_id: token id 18446744073709551615 is out of range"),
    "bos id negative": ("bpe", "tokenizer.ggml.bos_token_id", scalar(V.INT32, "i", -1),
                        r"tokenizer\.ggml\.bos_token_id: token id -1 is out of range"),
    "eos id as a string": ("bpe", "tokenizer.ggml.eos_token_id", (V.STRING, gstr("0")),
                           r"tokenizer\.ggml\.eos_token_id.*expected an integer, found STRING"),
    "eos id as a float": ("spm", "tokenizer.ggml.eos_token_id", scalar(V.FLOAT32, "f", 2.0),
                          r"tokenizer\.ggml\.eos_token_id.*expected an integer, found FLOAT32"),
    "pad id as a bool": ("spm", "tokenizer.ggml.padding_token_id", scalar(V.BOOL, "?", True),
                         r"tokenizer\.ggml\.padding_token_id.*expected an integer, found BOOL"),
    "unknown id as an array": ("spm", "tokenizer.ggml.unknown_token_id", (V.ARRAY, numbers(V.UINT32, "I", [0])),
                               r"tokenizer\.ggml\.unknown_token_id.*expected an integer, found ARRAY of UINT32"),
    "unknown model": ("spm", "tokenizer.ggml.model", (V.STRING, gstr("bert")),
                      r"tokenizer\.ggml\.model: 'bert' is not supported \(supported: gpt2, llama\)"),
    "model as an integer": ("bpe", "tokenizer.ggml.model", scalar(V.UINT32, "I", 2),
                            r"tokenizer\.ggml\.model.*expected STRING, found UINT32"),
    "pre as an array": ("bpe", "tokenizer.ggml.pre", (V.ARRAY, strings(["smollm"])),
                        r"tokenizer\.ggml\.pre.*expected STRING, found ARRAY of STRING"),
    "unknown pre": ("bpe", "tokenizer.ggml.pre", (V.STRING, gstr("bert")),
                    r"tokenizer\.ggml\.pre: 'bert' is not supported"),
    "flag as an integer": ("bpe", "tokenizer.ggml.add_bos_token", scalar(V.UINT8, "B", 1),
                           r"tokenizer\.ggml\.add_bos_token.*expected BOOL, found UINT8"),
    "tokens missing": ("spm", "tokenizer.ggml.tokens", None, r"tokenizer\.ggml\.tokens: missing"),
    "tokens empty": ("spm", "tokenizer.ggml.tokens", (V.ARRAY, strings([])), r"tokenizer\.ggml\.tokens: empty"),
    "bpe token not UTF-8": ("bpe", "tokenizer.ggml.tokens", (V.ARRAY, strings(BPE_TOKENS[:-1] + ["\udcff"])),
                            rf"tokenizer\.ggml\.tokens\[{N_BPE - 1}\]: not valid UTF-8"),
    "spm token not UTF-8": ("spm", "tokenizer.ggml.tokens", (V.ARRAY, strings(SPM_TOKENS[:7] + ["a\udc80"]
                                                                              + SPM_TOKENS[8:])),
                            r"tokenizer\.ggml\.tokens\[7\]: not valid UTF-8"),
    "merge not UTF-8": ("bpe", "tokenizer.ggml.merges", (V.ARRAY, strings(["h e", "\udcff l"])),
                        r"tokenizer\.ggml\.merges\[1\]: not valid UTF-8"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_tokenizer_metadata_is_a_clean_error(tmp_path: Path, case: str) -> None:
    base, key, value, match = HOSTILE[case]
    kvs = bpe_kvs() if base == "bpe" else spm_kvs()
    if value is None:
        del kvs[key]
    else:
        kvs[key] = value
    with pytest.raises(QFError, match=match) as e:
        load(tmp_path, kvs)
    assert isinstance(e.value, (FormatError, ModelError))
    assert "tok.gguf" in str(e.value)  # the file is named


def test_in_memory_metadata_of_the_wrong_type_is_a_clean_error(tiny_spm_model: Path) -> None:
    """Metadata built in memory (no reader types): the Python types found are named instead."""
    meta = _spm_meta_from_model(tiny_spm_model)
    n = len(meta["tokenizer.ggml.tokens"])
    bad = {"tokenizer.ggml.tokens": [["a"]] * n, "tokenizer.ggml.token_type": ["1"] * n,
           "tokenizer.ggml.scores": np.zeros(n, np.int16), "tokenizer.ggml.merges": [1, 2]}
    for key, value in bad.items():
        with pytest.raises(ModelError, match=rf"{key}: expected ARRAY of .*, found ARRAY of"):
            load_tokenizer(DictMeta(meta | {key: value}), "m.gguf")
    with pytest.raises(ModelError, match="eos_token_id: expected an integer token id, found str"):
        load_tokenizer(_StrIdMeta(meta), "m.gguf")


class _StrIdMeta(DictMeta):
    """Metadata whose get_int hands back whatever is stored (a sloppy in-memory implementation)."""

    def get_int(self, k: str) -> Any:
        return "2" if k == "tokenizer.ggml.eos_token_id" else super().get_int(k)


# ---------------------------------------------------------------------------------------------
# Bounded encoding


def _bpe_meta(d: dict[str, Any], pre: str) -> DictMeta:
    """gpt2 tokenizer metadata from a tokenizer.json dict (added tokens CONTROL)."""
    vocab = d["model"]["vocab"]
    added = {a["id"]: a["content"] for a in d["added_tokens"]}
    tokens = [t for t, _ in sorted((vocab | {c: i for i, c in added.items()}).items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    ws = [("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("Ċ", "Ċ"), ("ĉ", "ĉ"), ("Ġ", "Ċ")]  # whitespace runs, as in real vocabularies
    tokens += [a + b for a, b in ws]
    merges += [f"{a} {b}" for a, b in ws]
    types = np.array([3 if i in added else 1 for i in range(len(tokens))], np.int32)
    return DictMeta({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
                     "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.add_bos_token": True})


PIECES = ["the", "quick", "fox", "hello", " ", " ", " ", "  ", "\n", "\n\n", "\t", ".", ",", "!", "?", ";", ":",
          "'s", "'M", "42", "3.14", "12345", "héllo", "日本語", "🎉", "naïve", "<|im_start|>", "<|im_end|>",
          "<tool>", "\u2581", "\u2581x", "  x", "A", "Z9", "don't", "…", "\r\n"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=60).map("".join)


@pytest.fixture(scope="module")
def tiny_tokenizers(tiny_bpe_json: dict[str, Any], tiny_spm_model: Path) -> dict[str, Tokenizer]:
    """Tiny BPE tokenizers under every pre-tokenizer, and a tiny SentencePiece one."""
    toks: dict[str, Tokenizer] = {f"bpe-{pre}": load_tokenizer(_bpe_meta(tiny_bpe_json, pre))
                                  for pre in ("smollm", "llama-bpe", "qwen2", "gpt2", "default")}
    toks["spm"] = load_tokenizer(DictMeta(_spm_meta_from_model(tiny_spm_model)))
    return toks


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, chunk=st.integers(1, 12), special=st.booleans())
def test_bounded_encoding_equals_whole_encoding(tiny_tokenizers: dict[str, Tokenizer], text: str, chunk: int,
                                                special: bool) -> None:
    """Cut into pieces of a few characters, the text still encodes to the same ids."""
    old = tokmod.ENCODE_CHUNK_CHARS
    tokmod.ENCODE_CHUNK_CHARS = chunk
    try:
        for name, tok in tiny_tokenizers.items():
            whole = tok.encode(text, parse_special=special)
            assert tok.encode(text, parse_special=special, max_tokens=len(whole)) == whole, (name, text)
            if whole:
                with pytest.raises(ContextOverflowError):
                    tok.encode(text, parse_special=special, max_tokens=len(whole) - 1)
    finally:
        tokmod.ENCODE_CHUNK_CHARS = old


def test_encoding_spans_cut_only_after_a_word(tiny_tokenizers: dict[str, Tokenizer]) -> None:
    text = "alpha beta  gamma\n delta," + " x" * 5 + "日本 語 end"
    spans = list(tokmod.encoding_spans(text, lambda t, p: True, chunk=3))
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a == b0 for (_, a), (b0, _) in zip(spans, spans[1:]))
    for _, end in spans[:-1]:
        assert text[end] == " " and text[end - 1] in "abcdefghijklmnopqrstuvwxyz,x"
    assert list(tokmod.encoding_spans("日本語" * 10, lambda t, p: True, chunk=3)) == [(0, 30)]  # no cut point


def test_overflow_names_the_limit_and_counts_bos(tiny_tokenizers: dict[str, Tokenizer]) -> None:
    tok = tiny_tokenizers["bpe-smollm"]
    ids = tok.encode("the quick fox")
    assert ids[0] == tok.bos_id
    assert tok.encode("the quick fox", max_tokens=len(ids)) == ids
    with pytest.raises(ContextOverflowError, match=f"limit of {len(ids) - 1} tokens"):
        tok.encode("the quick fox", max_tokens=len(ids) - 1)
    assert tok.encode("the quick fox", add_special=False, max_tokens=len(ids) - 1) == ids[1:]
    with pytest.raises(ContextOverflowError, match="limit of 0 tokens"):
        tok.encode("", max_tokens=0)  # BOS alone is over
    assert tok.encode("", add_special=False, max_tokens=0) == []


def _bounded_cost(tok: Tokenizer, text: str, limit: int) -> float:
    """Seconds until encode(text, max_tokens=limit) raises ContextOverflowError."""
    t = time.perf_counter()
    with pytest.raises(ContextOverflowError):
        tok.encode(text, max_tokens=limit)
    return time.perf_counter() - t


def _encoded_chars(tok: Tokenizer, text: str, limit: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Characters handed to the underlying tokenizer before encode(text, max_tokens=limit) gives up."""
    seen = [0]
    if isinstance(tok, BpeTokenizer):
        inner = tok._encode_text

        def counting(t: str, parse_special: bool) -> list[int]:
            seen[0] += len(t)
            return inner(t, parse_special)

        monkeypatch.setattr(tok, "_encode_text", counting)
    else:
        sp = tok._sp

        class Counting:
            def encode(self, t: str) -> list[int]:
                seen[0] += len(t)
                return sp.encode(t)

        monkeypatch.setattr(tok, "_sp", Counting())
    with pytest.raises(ContextOverflowError):
        tok.encode(text, max_tokens=limit)
    monkeypatch.undo()
    return seen[0]


HUGE = ("the quick brown fox jumps over a lazy dog; hello world, 42 towers. " * 300_000)[:20_000_000]


@pytest.mark.parametrize("name", ["bpe-smollm", "bpe-llama-bpe", "spm"])
def test_a_huge_prompt_stops_early(tiny_tokenizers: dict[str, Tokenizer], name: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tok = tiny_tokenizers[name]
    assert _encoded_chars(tok, HUGE, 8192, monkeypatch) == 0  # the length alone proves it: no tokenizing
    assert _bounded_cost(tok, HUGE, 8192) < 1
    limit = -(-len(HUGE) // tok._longest) + 2  # too many for the length to prove: tokenized piece by piece
    assert tok._min_tokens(HUGE, limit) <= limit
    done = _encoded_chars(tok, HUGE, limit, monkeypatch)
    assert 0 < done < len(HUGE) // 2, done


def test_characters_without_tokens_are_not_counted(tiny_tokenizers: dict[str, Tokenizer]) -> None:
    """Bytes the vocabulary lacks are dropped by the BPE model: such characters prove no tokens."""
    tok = tiny_tokenizers["bpe-smollm"]
    missing = "\x04" * 100_000
    tok._droppable = tokmod._droppable_chars([4])
    try:
        assert tok._min_tokens(missing, 10) == 0
        assert tok._min_tokens(missing + "x" * 1000, 10) == -(-1000 // tok._longest)
    finally:
        tok._droppable = None
    pattern = tokmod._droppable_chars([0x05, 0x80, 0xC3, 0xE6, 0xF1, 0xC0, 0xFF])
    assert pattern.fullmatch("\x05é日\U00040000") and not pattern.search("abc")
    assert tokmod._droppable_chars([0xC0, 0xC1, 0xF5, 0xFF]) is None


# ---------------------------------------------------------------------------------------------
# Real vocabularies (cached models; slow)


def _mixed_text(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    parts = TEXTS + PIECES + ["<start_of_turn>user\nhi<end_of_turn>\n", "    def f(x):\n        return x\n"]
    return "".join(parts[i] for i in rng.integers(0, len(parts), n))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2_tok", "gemma3_tok"])
def test_bounded_encoding_equals_whole_encoding_on_real_vocabularies(request: pytest.FixtureRequest, which: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tok = request.getfixturevalue(which)
    text = _mixed_text(4000)
    for special in (True, False):
        whole = tok.encode(text, parse_special=special)
        for chunk in (7, 61, 1000):
            monkeypatch.setattr(tokmod, "ENCODE_CHUNK_CHARS", chunk)
            assert tok.encode(text, parse_special=special, max_tokens=len(whole)) == whole, (chunk, special)
        with pytest.raises(ContextOverflowError):
            tok.encode(text, parse_special=special, max_tokens=len(whole) - 1)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2_tok", "gemma3_tok"])
def test_a_20mb_prompt_on_real_vocabularies_stops_early(request: pytest.FixtureRequest, which: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tok = request.getfixturevalue(which)
    for text in ((_mixed_text(2000) * 400)[:20_000_000], "日本語のテキスト" * 2_500_000):
        assert _encoded_chars(tok, text, 8192, monkeypatch) == 0
        assert _bounded_cost(tok, text, 8192) < 2
    limit = -(-len(HUGE) // tok._longest) + 2
    assert 0 < _encoded_chars(tok, HUGE, limit, monkeypatch) < len(HUGE) // 2


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf: Path) -> Tokenizer:
    with open_gguf(smollm2_gguf) as f:
        return load_tokenizer(f.meta, str(smollm2_gguf))


@pytest.fixture(scope="module")
def gemma3_tok(gemma3_gguf: Path) -> Tokenizer:
    with open_gguf(gemma3_gguf) as f:
        return load_tokenizer(f.meta, str(gemma3_gguf))


# ---------------------------------------------------------------------------------------------
# Special-token splitting: a trie regex, checked against the plain leftmost-longest scan


def _reference_split(texts: dict[str, int], text: str) -> list[str | int]:
    """Leftmost, then longest special text at each position; plain fragments between (llama.cpp's rule)."""
    out: list[str | int] = []
    start = i = 0
    by_len = sorted(texts, key=len, reverse=True)
    while i < len(text):
        hit = next((s for s in by_len if text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        if i > start:
            out.append(text[start:i])
        out.append(texts[hit])
        i = start = i + len(hit)
    if start < len(text):
        out.append(text[start:])
    return out


SPECIAL_ALPHABET = "<>|ab \n▁"


@settings(max_examples=300, deadline=None)
@given(specials=st.sets(st.text(SPECIAL_ALPHABET, min_size=1, max_size=6), max_size=12),
       text=st.text(SPECIAL_ALPHABET + "xé", max_size=40))
def test_special_splitter_is_leftmost_longest(specials: set[str], text: str) -> None:
    texts = {s: i for i, s in enumerate(sorted(specials))}
    splitter = tokmod.SpecialSplitter(texts)
    assert splitter.split(text) == _reference_split(texts, text)


def test_special_splitter_falls_back_on_deep_tries() -> None:
    texts = {"a" * k: k for k in range(1, tokmod.MAX_TRIE_DEPTH + 10)}
    splitter = tokmod.SpecialSplitter(texts)
    assert splitter.pattern is None and splitter.finder is not None
    text = "xa" + "a" * 80 + "b" * 3 + "a" * 5
    assert splitter.split(text) == _reference_split(texts, text)


def test_special_splitting_is_linear_with_thousands_of_specials() -> None:
    texts = {f"<unused{i}>": i for i in range(6000)} | {" " * k: 6000 + k for k in range(2, 32)}
    splitter = tokmod.SpecialSplitter(texts)
    text = "<a  b <unused12> <unused59999> " * 40_000  # 1.2 MB, every other character a candidate
    t = time.perf_counter()
    parts = splitter.split(text)
    assert time.perf_counter() - t < 2
    assert parts[:4] == ["<a", 6002, "b ", 12]


@pytest.fixture(scope="module")
def spanning_tokenizers(tiny_bpe_json: dict[str, Any]) -> dict[str, Tokenizer]:
    """Vocabularies with tokens across a space: a SentencePiece piece 'a▁b', a BPE added token 'x y'."""
    n = len(SPM_TOKENS) + 3
    spm = DictMeta({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": SPM_TOKENS + ["\u2581b", "a\u2581b",
                                                                                           "b\u2581a\u2581b"],
                    "tokenizer.ggml.scores": np.array([0.0] * 3 + [-1.0 * i for i in range(n - 6)] + [5, 9, 10],
                                                      np.float32),
                    "tokenizer.ggml.token_type": np.array([2, 3, 3] + [1] * 5 + [6] * 256 + [1, 1, 1], np.int32)})
    bpe = _bpe_meta(tiny_bpe_json, "smollm")
    bpe.d["tokenizer.ggml.tokens"] = bpe.d["tokenizer.ggml.tokens"] + ["x y", "o q"]
    bpe.d["tokenizer.ggml.token_type"] = np.concatenate([bpe.d["tokenizer.ggml.token_type"], [4, 3]]).astype(np.int32)
    return {"spm": load_tokenizer(spm), "bpe": load_tokenizer(bpe)}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(["a", "b", " ", "x", "y", "o", "q", "\u2581", "ab", "a b", "x y", "o q"]),
                     max_size=40).map("".join), chunk=st.integers(1, 6))
def test_no_cut_inside_a_token_that_spans_a_space(spanning_tokenizers: dict[str, Tokenizer], text: str,
                                                   chunk: int) -> None:
    old = tokmod.ENCODE_CHUNK_CHARS
    tokmod.ENCODE_CHUNK_CHARS = chunk
    try:
        for name, tok in spanning_tokenizers.items():
            whole = tok.encode(text)
            assert tok.encode(text, max_tokens=len(whole)) == whole, (name, text)
    finally:
        tokmod.ENCODE_CHUNK_CHARS = old


def test_spanning_tokens_are_used(spanning_tokenizers: dict[str, Tokenizer]) -> None:
    spm, bpe = spanning_tokenizers["spm"], spanning_tokenizers["bpe"]
    assert spm.vocab.tokens.index("a\u2581b") in spm.encode("a b", add_special=False)
    assert bpe.vocab.tokens.index("x y") in bpe.encode("x y", add_special=False)
