"""Tokenizers rebuilt from a GGUF file's own metadata (`tokenizer.ggml.*`).

`gpt2` (byte-level BPE) runs on the `tokenizers` library with llama.cpp's pre-tokenizer regexes;
`llama` (SentencePiece) runs on `sentencepiece` with a ModelProto rebuilt from tokens, scores and types.
Detokenizing goes through per-token byte strings so a stream can hold back an incomplete UTF-8 character.

`encode(text, max_tokens=n)` stops early: it raises ContextOverflowError once the ids would exceed n, either
from a lower bound on the count (text length / longest token) or while encoding the text piece by piece,
cut only where no token can span the cut (so the ids are those of a whole-text encode).
"""

from __future__ import annotations

import codecs
import math
import re
from abc import ABC, abstractmethod
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from qf.format.errors import ContextOverflowError, ModelError
from qf.format.spm_proto import MODEL_TYPE_BPE, SpmModel, encode_spm
from qf.format.vocab import TokenType


# Pre-tokenizer regexes by tokenizer.ggml.pre, applied in sequence (llama.cpp src/llama-vocab.cpp).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "smollm": (r"\p{N}", _GPT2),
}
# tokenizer.ggml.pre name -> regex set (aliases as llama.cpp accepts them).
PRE_ALIASES: dict[str, str] = {
    "default": "default", "gpt-2": "gpt2", "gpt2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3", "dbrx": "llama3",
    "smaug-bpe": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "megrez": "qwen2",
    "smollm": "smollm", "starcoder": "smollm", "refact": "smollm", "codeshell": "smollm",
}
IGNORE_MERGES = {"llama3"}  # whole pre-token looked up in the vocab before merging (llama.cpp ignore_merges)

# Token texts that end generation even when no *_token_id key names them (llama.cpp special_eog_ids).
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
    "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})
SPECIAL_ID_KEYS = ("bos", "eos", "eot", "eom", "unknown", "padding", "seperator")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPM_SPACE = "\u2581"  # ▁
_BYTE, _NORMAL, _UNDEFINED = int(TokenType.BYTE), int(TokenType.NORMAL), int(TokenType.UNDEFINED)
_TYPE_MAX = max(int(t) for t in TokenType)
# Bounded encoding: pieces of about this many characters, cut at a space after one of these characters.
# No pre-tokenizer regex above lets a match run from such a character into the space, so a cut there is
# a pre-token boundary; SentencePiece cuts are further checked against the pieces that could span them.
ENCODE_CHUNK_CHARS = 1 << 16
_CUT = re.compile(r"(?<=[A-Za-z0-9.,;:!?]) ")


def _droppable_chars(missing: Iterable[int]) -> re.Pattern[str] | None:
    """Runs of characters whose UTF-8 form holds one of the missing bytes (None when there are none)."""
    ranges: list[tuple[int, int]] = []
    for b in missing:
        if b < 0x80:
            ranges.append((b, b))
        elif b < 0xC0:  # a continuation byte: any non-ASCII character may hold it
            ranges.append((0x80, 0x10FFFF))
        elif 0xC2 <= b < 0xE0:
            ranges.append(((b & 0x1F) << 6, ((b & 0x1F) << 6) + 0x3F))
        elif 0xE0 <= b < 0xF0:
            ranges.append(((b & 0x0F) << 12, ((b & 0x0F) << 12) + 0xFFF))
        elif 0xF0 <= b < 0xF5:
            ranges.append(((b & 0x07) << 18, min(((b & 0x07) << 18) + 0x3FFFF, 0x10FFFF)))
        # 0xC0, 0xC1 and 0xF5..0xFF never occur in UTF-8
    if not ranges:
        return None
    cls = "".join(f"{re.escape(chr(a))}-{re.escape(chr(z))}" for a, z in ranges)
    return re.compile(f"[{cls}]+")


def _is_utf8(s: str) -> bool:
    """Whether s encodes to UTF-8 (no lone surrogates from undecodable bytes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe(meta: Any, key: str, value: Any) -> str:
    """The type found at key, in GGUF terms when the metadata can tell it ('ARRAY of INT32')."""
    elem_type = getattr(meta, "elem_type", None)
    elem = elem_type(key) if elem_type is not None else None
    if elem is not None:
        return f"ARRAY of {elem.name}"
    if isinstance(value, np.ndarray):
        return f"ARRAY of {value.dtype}"
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"ARRAY of {'/'.join(kinds) or 'nothing'}"
    return type(value).__name__


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode stand-ins for bytes, inverted: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Vocab:
    """Tokens, types, scores, special ids and flags from tokenizer.ggml.*; raises ModelError on bad values."""

    def __init__(self, meta: Any, path: str = "<model>") -> None:
        self.path = str(path)
        if "tokenizer.ggml.tokens" not in meta:
            raise ModelError(f"{path}: tokenizer.ggml.tokens: missing (the file has no vocabulary)")
        tokens = self._strings(meta, "tokenizer.ggml.tokens")
        n = len(tokens)
        if n == 0:
            raise ModelError(f"{path}: tokenizer.ggml.tokens: empty vocabulary")
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp
        self.types = self._token_types(meta, n)
        scores = self._numeric(meta, "tokenizer.ggml.scores", n, "f", "FLOAT32 or FLOAT64")
        self.scores = np.zeros(n, np.float32) if scores is None else scores.astype(np.float32)
        self.model = str(meta.get_str("tokenizer.ggml.model")) if "tokenizer.ggml.model" in meta else "llama"
        self.pre = str(meta.get_str("tokenizer.ggml.pre")) if "tokenizer.ggml.pre" in meta else "default"
        self.special = {name: self._special_id(meta, name, n) for name in SPECIAL_ID_KEYS}
        bpe = self.model == "gpt2"
        self.add_bos = self._flag(meta, "add_bos_token", not bpe or PRE_ALIASES.get(self.pre) == "llama3")
        self.add_eos = self._flag(meta, "add_eos_token", False)
        self.add_space_prefix = self._flag(meta, "add_space_prefix", not bpe)
        self.merges = self._strings(meta, "tokenizer.ggml.merges") if "tokenizer.ggml.merges" in meta else []
        self.eog_ids = self._eog_ids()

    def __len__(self) -> int:
        return len(self.tokens)

    def _strings(self, meta: Any, key: str) -> list[str]:
        """An ARRAY of STRING (tokens, merges); anything else is a ModelError naming the type found."""
        v = meta.get_array(key)
        if not (isinstance(v, (list, tuple)) and all(type(x) is str for x in v)):
            raise ModelError(f"{self.path}: {key}: expected ARRAY of STRING, found {_describe(meta, key, v)}")
        try:
            "".join(v).encode("utf-8")  # the reader keeps invalid bytes as lone surrogates
        except UnicodeEncodeError:
            i, bad = next((i, x) for i, x in enumerate(v) if not _is_utf8(x))
            raise ModelError(f"{self.path}: {key}[{i}]: not valid UTF-8 "
                             f"({bad.encode('utf-8', 'surrogateescape')!r})") from None
        return list(v)

    def _numeric(self, meta: Any, key: str, n: int, kinds: str, want: str) -> np.ndarray | None:
        """A per-token numeric ARRAY whose dtype kind is in kinds, one entry per token (None when absent)."""
        if key not in meta:
            return None
        v = meta.get_array(key)
        if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
                                                for x in v):
            v = np.asarray(v)  # a plain sequence of numbers (metadata built in memory)
        if not isinstance(v, np.ndarray) or v.dtype.kind not in kinds or v.ndim != 1:
            raise ModelError(f"{self.path}: {key}: expected ARRAY of {want}, found {_describe(meta, key, v)}")
        if len(v) != n:
            raise ModelError(f"{self.path}: {key}: has {v.size} entries for {n} tokens")
        return v

    def _token_types(self, meta: Any, n: int) -> np.ndarray:
        """tokenizer.ggml.token_type as int32, each a TokenType id (all NORMAL when absent)."""
        key = "tokenizer.ggml.token_type"
        v = self._numeric(meta, key, n, "iu", "an integer type")
        if v is None:
            return np.full(n, TokenType.NORMAL, dtype=np.int32)
        bad = np.flatnonzero((v < 0) | (v > _TYPE_MAX))
        if bad.size:
            i = int(bad[0])
            raise ModelError(f"{self.path}: {key}[{i}]: token type {int(v[i])} is out of range [0, {_TYPE_MAX}] "
                             f"({bad.size} entries out of range)")
        return v.astype(np.int32)

    def _special_id(self, meta: Any, name: str, n: int) -> int | None:
        """tokenizer.ggml.<name>_token_id, an integer checked against the vocabulary size."""
        key = f"tokenizer.ggml.{name}_token_id"
        if key not in meta:
            return None
        raw = meta.get_int(key)
        if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
            raise ModelError(f"{self.path}: {key}: expected an integer token id, found {type(raw).__name__}")
        tid = int(raw)
        if not 0 <= tid < n:
            raise ModelError(f"{self.path}: {key}: token id {tid} is out of range [0, {n})")
        return tid

    def _flag(self, meta: Any, name: str, default: bool) -> bool:
        """A tokenizer.ggml.<name> boolean with a default."""
        key = f"tokenizer.ggml.{name}"
        return bool(meta.get_bool(key)) if key in meta else default

    def _eog_ids(self) -> frozenset[int]:
        """eos/eot/eom ids plus tokens whose text marks an end of generation."""
        ids = {self.special[k] for k in ("eos", "eot", "eom") if self.special[k] is not None}
        ids.update(i for i, t in enumerate(self.tokens) if t in EOG_TEXTS)
        return frozenset(ids)

    def ids_of_type(self, *types: TokenType) -> list[int]:
        """Token ids whose type is one of `types`."""
        return [int(i) for i in np.flatnonzero(np.isin(self.types, [int(t) for t in types]))]

    def special_texts(self, parse_control: bool) -> dict[str, int]:
        """Texts matched as whole tokens before tokenizing: user-defined always, control/unknown on request."""
        kinds = (TokenType.USER_DEFINED,) + ((TokenType.CONTROL, TokenType.UNKNOWN) if parse_control else ())
        return {self.tokens[i]: i for i in self.ids_of_type(*kinds)}


class Tokenizer(ABC):
    """Text <-> token ids for one vocabulary; subclasses implement `_encode_text` and `_piece_bytes`."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self.bos_id, self.eos_id = vocab.special["bos"], vocab.special["eos"]
        self.eog_ids = vocab.eog_ids
        self._control = set(vocab.ids_of_type(TokenType.CONTROL, TokenType.UNKNOWN, TokenType.UNUSED))
        self._pieces: list[bytes | None] = [None] * len(vocab)  # filled on first use

    @property
    def n_vocab(self) -> int:
        """Number of tokens."""
        return len(self.vocab)

    def token_text(self, tid: int) -> str:
        """The token's text as stored in the file."""
        return self.vocab.tokens[tid]

    def token_bytes(self, tid: int, special: bool = False) -> bytes:
        """The bytes a token stands for; control tokens render as their text only when special=True."""
        if tid in self._control:
            return self.vocab.tokens[tid].encode("utf-8") if special else b""
        piece = self._pieces[tid]
        if piece is None:
            piece = self._pieces[tid] = self._piece_bytes(tid)
        return piece

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True,
               max_tokens: int | None = None) -> list[int]:
        """Token ids of text, with BOS/EOS per the file's flags when add_special.

        max_tokens: ContextOverflowError as soon as the ids (BOS/EOS included) would number more than this;
        under it the ids are the same as without it."""
        bos = add_special and self.vocab.add_bos and self.bos_id is not None
        eos = add_special and self.vocab.add_eos and self.eos_id is not None
        if max_tokens is None:
            ids = self._encode_text(text, parse_special)
        else:
            ids = self._encode_bounded(text, parse_special, int(max_tokens), int(bos) + int(eos))
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def _encode_bounded(self, text: str, parse_special: bool, max_tokens: int, n_added: int) -> list[int]:
        """_encode_text(text) piece by piece, raising once n_added + the ids so far exceed max_tokens."""
        budget = max_tokens - n_added
        at_least = self._min_tokens(text, budget)
        if at_least > budget:
            raise self._overflow(max_tokens, n_added + at_least, estimated=True)
        ids: list[int] = []
        for piece in self._encode_pieces(text, parse_special):
            ids += piece
            if len(ids) > budget:
                raise self._overflow(max_tokens, n_added + len(ids), estimated=False)
        return ids

    @staticmethod
    def _overflow(max_tokens: int, seen: int, estimated: bool) -> ContextOverflowError:
        """The error for text that takes more than max_tokens tokens (seen: a count it reaches)."""
        how = (f"at least {seen} by its length alone, so it was not tokenized" if estimated
               else f"{seen} after tokenizing part of it, where it stopped")
        return ContextOverflowError(f"the text takes more than the limit of {max_tokens} tokens ({how})")

    def _min_tokens(self, text: str, budget: int) -> int:
        """A lower bound on the ids of text, worked out only when it could exceed budget (0: none known)."""
        return 0

    def _encode_pieces(self, text: str, parse_special: bool) -> Iterator[list[int]]:
        """The ids of text in consecutive parts whose concatenation is _encode_text(text)."""
        yield self._encode_text(text, parse_special)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of a whole token sequence (invalid UTF-8 replaced)."""
        data = b"".join(self.token_bytes(int(t), special) for t in ids)
        return data.decode("utf-8", errors="replace")

    def stream(self, special: bool = False) -> "StreamDecoder":
        """An incremental detokenizer for generated tokens."""
        return StreamDecoder(self, special)

    @abstractmethod
    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        """Token ids of text, without BOS/EOS."""

    @abstractmethod
    def _piece_bytes(self, tid: int) -> bytes:
        """The bytes of a non-control token."""


def encoding_spans(text: str, safe: Callable[[str, int], bool], chunk: int | None = None
                   ) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive pieces of text of about `chunk` characters (default ENCODE_CHUNK_CHARS),
    each cut at a space that follows a letter, digit or .,;:!? and that safe(text, position) accepts."""
    chunk = ENCODE_CHUNK_CHARS if chunk is None else chunk
    start = 0
    while len(text) - start > chunk:
        pos, cut = start + chunk, None
        while cut is None:
            m = _CUT.search(text, pos)
            if m is None:
                break
            cut = m.start() if safe(text, m.start()) else None
            pos = m.start() + 1
        if cut is None:
            break
        yield start, cut
        start = cut
    yield start, len(text)


def _spanning(texts: Iterable[str], space: str = " ") -> list[tuple[str, tuple[int, ...]]]:
    """(text, offsets j >= 1 of `space` in it) for the texts that could cover a cut at a space."""
    out = []
    for t in texts:
        if space in t[1:]:
            out.append((t, tuple(j for j in range(1, len(t)) if t[j] == space)))
    return out


def _covers_cut(text: str, p: int, spanning: list[tuple[str, tuple[int, ...]]]) -> bool:
    """Whether one of the spanning texts occurs in text across position p (its space at p)."""
    return any(j <= p and text.startswith(t, p - j) for t, js in spanning for j in js)


class StreamDecoder:
    """Turns tokens into text one at a time, holding bytes until they complete a UTF-8 character."""

    def __init__(self, tok: Tokenizer, special: bool = False) -> None:
        self.tok, self.special = tok, special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tid: int) -> str:
        """Text completed by this token ('' while a character is still incomplete)."""
        return self._dec.decode(self.tok.token_bytes(int(tid), self.special))

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)


class BpeTokenizer(Tokenizer):
    """Byte-level BPE (`gpt2` model) on the `tokenizers` library."""

    def __init__(self, vocab: Vocab) -> None:
        from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

        self._bytes_of = _byte_decoder()
        super().__init__(vocab)
        pre = PRE_ALIASES.get(vocab.pre)
        if pre is None:
            raise ModelError(f"{vocab.path}: tokenizer.ggml.pre: {vocab.pre!r} is not supported "
                             f"(supported: {', '.join(sorted(PRE_ALIASES))})")
        if not vocab.merges:
            raise ModelError(f"{vocab.path}: tokenizer.ggml.merges: missing or empty for a gpt2 tokenizer")
        ids = {t: i for i, t in enumerate(vocab.tokens)}
        merges = [self._split_merge(m, k) for k, m in enumerate(vocab.merges)]
        try:
            model = models.BPE(ids, merges, ignore_merges=pre in IGNORE_MERGES)
        except Exception as e:  # the Rust side reports merges naming unknown tokens
            raise ModelError(f"{vocab.path}: tokenizer.ggml.merges: not usable with these tokens: {e}") from e
        hf = HFTokenizer(model)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
        hf.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                      use_regex=False)])
        special = [AddedToken(vocab.tokens[i], special=vocab.types[i] != TokenType.USER_DEFINED, normalized=False)
                   for i in vocab.ids_of_type(TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)]
        hf.add_special_tokens(special)
        self._hf = hf
        self._lock = threading.Lock()  # encode_special_tokens is a tokenizer-wide switch
        self._added_spanning = _spanning(vocab.tokens[i] for i in vocab.ids_of_type(
            TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN))
        # A byte-level token stands for at most len(token) characters; characters with a byte that has
        # no token are dropped by the BPE model, so they are left out of the count.
        self._longest = max(len(t) for t in vocab.tokens)
        self._droppable = _droppable_chars([b for c, b in self._bytes_of.items() if c not in ids])

    def _min_tokens(self, text: str, budget: int) -> int:
        """len(text) / longest token, not counting characters the vocabulary has no bytes for."""
        if len(text) <= budget * self._longest:
            return 0  # the bound could not exceed budget
        n = len(text)
        if self._droppable is not None:
            n -= sum(map(len, self._droppable.findall(text)))
        return math.ceil(n / self._longest)

    def _encode_pieces(self, text: str, parse_special: bool) -> Iterator[list[int]]:
        """Pieces cut at pre-token boundaries that no added token spans."""
        safe = lambda t, p: not _covers_cut(t, p, self._added_spanning)  # noqa: E731
        for a, b in encoding_spans(text, safe):
            yield self._encode_text(text[a:b], parse_special)

    def pre_tokenize(self, text: str) -> list[str]:
        """The pieces the pre-tokenizer cuts text into (byte-level characters), before any merge."""
        return [piece for piece, _ in self._hf.pre_tokenizer.pre_tokenize_str(text)]

    def _split_merge(self, m: str, k: int) -> tuple[str, str]:
        """'a b' -> ('a', 'b'), splitting at the first space after the first character (as llama.cpp)."""
        pos = m.find(" ", 1)
        if pos < 0:
            raise ModelError(f"{self.vocab.path}: tokenizer.ggml.merges[{k}]: {m!r} is not a 'left right' pair")
        return m[:pos], m[pos + 1:]

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        """Split on special tokens, pre-tokenize with the regexes, merge."""
        with self._lock:
            self._hf.encode_special_tokens = not parse_special
            return list(self._hf.encode(text, add_special_tokens=False).ids)

    def _piece_bytes(self, tid: int) -> bytes:
        """Normal tokens map each char back to its byte; special tokens are their UTF-8 text."""
        text = self.vocab.tokens[tid]
        if self.vocab.types[tid] in (_NORMAL, _UNDEFINED) and all(c in self._bytes_of for c in text):
            return bytes(self._bytes_of[c] for c in text)
        return text.encode("utf-8")


class _TooDeep(Exception):
    """A trie too deep to compile into one regex."""


_TRIE_END = ""  # trie key marking the end of a text ("" is never a character)
MAX_TRIE_DEPTH = 64  # nested groups in the special-token regex; deeper vocabularies take the slow path


def _trie_regex(texts: Iterable[str]) -> str:
    """A regex matching any of texts, the longest one at a position (a character trie, paths compressed)."""
    trie: dict[str, Any] = {}
    for t in texts:
        node = trie
        for ch in t:
            node = node.setdefault(ch, {})
        node[_TRIE_END] = True
    return _trie_node(trie, 0)


def _trie_node(node: dict[str, Any], depth: int) -> str:
    """The regex of one trie node: its branches, optional when a text ends here (tried longest first)."""
    if depth > MAX_TRIE_DEPTH:
        raise _TooDeep
    alts = []
    for ch in sorted(k for k in node if k != _TRIE_END):
        lit, child = ch, node[ch]
        while len(child) == 1 and _TRIE_END not in child:
            ((c2, child),) = child.items()
            lit += c2
        alts.append(re.escape(lit) + _trie_node(child, depth + 1))
    if not alts:
        return ""
    body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
    return f"(?:{body})?" if _TRIE_END in node else body


class SpecialSplitter:
    """Finds special-token texts in a string, leftmost first and longest at each position (as llama.cpp)."""

    def __init__(self, texts: dict[str, int]) -> None:
        self.ids = dict(texts)
        self.pattern: re.Pattern[str] | None = None
        self.by_first: dict[str, list[tuple[str, int]]] = {}
        self.finder: re.Pattern[str] | None = None
        if not texts:
            return
        try:  # one trie regex: a few steps per character whatever the number of texts
            self.pattern = re.compile(_trie_regex(texts))
        except (_TooDeep, RecursionError, re.error, OverflowError):
            for text, tid in sorted(texts.items(), key=lambda kv: -len(kv[0])):
                self.by_first.setdefault(text[0], []).append((text, tid))
            self.finder = re.compile("[" + "".join(re.escape(c) for c in self.by_first) + "]")

    def split(self, text: str) -> list[str | int]:
        """text -> plain fragments (str) and special token ids (int), in order."""
        return list(self.iter_split(text))

    def iter_split(self, text: str) -> Iterator[str | int]:
        """split(), lazily: a consumer that stops early does not scan the rest of text."""
        start = 0
        for i, end, tid in self._matches(text):
            if i > start:
                yield text[start:i]
            yield tid
            start = end
        if start < len(text):
            yield text[start:]

    def _matches(self, text: str) -> Iterator[tuple[int, int, int]]:
        """(start, end, token id) of each special text found, left to right, not overlapping."""
        if self.pattern is not None:
            for m in self.pattern.finditer(text):
                yield m.start(), m.end(), self.ids[m.group()]
            return
        pos = 0
        while self.finder is not None:
            m = self.finder.search(text, pos)
            if m is None:
                return
            i = m.start()
            hit = next(((s, tid) for s, tid in self.by_first[text[i]] if text.startswith(s, i)), None)
            if hit is None:
                pos = i + 1
                continue
            yield i, i + len(hit[0]), hit[1]
            pos = i + len(hit[0])


class SpmTokenizer(Tokenizer):
    """SentencePiece (`llama` model): BPE over scores, byte fallback, llama.cpp's space-prefix rule."""

    def __init__(self, vocab: Vocab) -> None:
        import sentencepiece

        super().__init__(vocab)
        for tid in vocab.ids_of_type(TokenType.BYTE):
            if _BYTE_TOKEN.fullmatch(vocab.tokens[tid]) is None:
                raise ModelError(f"{vocab.path}: tokenizer.ggml.tokens[{tid}]: byte token {vocab.tokens[tid]!r} "
                                 "is not <0xXX>")
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self._proto())
        except (RuntimeError, OSError) as e:  # e.g. duplicate pieces
            raise ModelError(f"{vocab.path}: tokenizer.ggml.tokens: SentencePiece rejects this vocabulary: {e}") from e
        self._sp = sp
        self._splitters = {flag: SpecialSplitter(vocab.special_texts(flag)) for flag in (False, True)}
        plain = (_NORMAL, _UNDEFINED, int(TokenType.USER_DEFINED))
        typed = list(zip(vocab.tokens, vocab.types.tolist()))
        self._piece_spanning = _spanning(t.replace(_SPM_SPACE, " ") for t, ty in typed  # could fall across a cut
                                         if t.find(_SPM_SPACE, 1) > 0 and ty in plain)
        self._single = {t.replace(_SPM_SPACE, " ") for t, ty in typed if len(t) == 1 and ty in plain}  # never <unk>
        # With byte fallback every character becomes pieces of at most the longest token's length;
        # without it runs of unknown characters merge into one <unk>, so no bound.
        n_bytes = int(np.sum(vocab.types == TokenType.BYTE))
        self._longest = max(len(t) for t in vocab.tokens) if n_bytes == 256 else 0

    def _min_tokens(self, text: str, budget: int) -> int:
        """len(text) / longest token when byte fallback is complete (0 otherwise)."""
        return math.ceil(len(text) / self._longest) if self._longest else 0

    def _cut_ok(self, text: str, p: int) -> bool:
        """A cut before the space at p: both sides known characters and no piece across it."""
        return " " in self._single and text[p - 1] in self._single and not _covers_cut(text, p, self._piece_spanning)

    def _encode_pieces(self, text: str, parse_special: bool) -> Iterator[list[int]]:
        """Special tokens, then each text fragment (space-prefixed as in _encode_text) in cut pieces."""
        prev_special = True
        for part in self._splitters[parse_special].iter_split(text):
            if isinstance(part, int):
                yield [part]
                prev_special = True
                continue
            if prev_special and self.vocab.add_space_prefix:
                part = " " + part
            spaced = part.replace(_SPM_SPACE, " ")  # SentencePiece reads a literal ▁ as a space too
            for a, b in encoding_spans(spaced, self._cut_ok):
                yield self._sp.encode(part[a:b])
            prev_special = False

    def _proto(self) -> bytes:
        """ModelProto for this vocabulary: exactly one UNKNOWN piece; 256 BYTE pieces enable byte fallback."""
        v = self.vocab
        types = np.where(v.types == TokenType.UNDEFINED, TokenType.NORMAL, v.types).astype(np.int64)
        unknown = np.flatnonzero(types == TokenType.UNKNOWN)
        unk = int(unknown[0]) if unknown.size else (v.special["unknown"] or 0)
        types[types == TokenType.UNKNOWN] = TokenType.CONTROL
        types[unk] = TokenType.UNKNOWN
        return encode_spm(SpmModel(
            pieces=v.tokens, scores=v.scores, types=types.tolist(), model_type=MODEL_TYPE_BPE,
            byte_fallback=bool(np.sum(types == TokenType.BYTE) == 256), unk_id=unk, bos_id=-1, eos_id=-1, pad_id=-1,
            add_dummy_prefix=False, remove_extra_whitespaces=False, escape_whitespaces=True,
            normalizer_name="identity"))

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        """Special tokens become ids; a text fragment at the start or after a special token gets the space prefix."""
        out: list[int] = []
        prev_special = True
        for part in self._splitters[parse_special].split(text):
            if isinstance(part, int):
                out.append(part)
                prev_special = True
                continue
            if prev_special and self.vocab.add_space_prefix:
                part = " " + part
            out += self._sp.encode(part)
            prev_special = False
        return out

    def _piece_bytes(self, tid: int) -> bytes:
        """<0xXX> byte tokens are one byte; other pieces are their text with ▁ as a space."""
        text = self.vocab.tokens[tid]
        if self.vocab.types[tid] == _BYTE:
            return bytes([int(text[3:5], 16)])
        return text.replace(_SPM_SPACE, " ").encode("utf-8")

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of a whole sequence; drops the space the tokenizer prefixed to the first word."""
        text = super().decode(ids, special)
        if self.vocab.add_space_prefix and text.startswith(" "):
            text = text[1:]
        return text


TOKENIZERS: dict[str, type[Tokenizer]] = {"gpt2": BpeTokenizer, "llama": SpmTokenizer}


def load_tokenizer(meta: Any, path: str = "<model>") -> Tokenizer:
    """The tokenizer described by a file's tokenizer.ggml.* metadata."""
    vocab = Vocab(meta, path)
    cls = TOKENIZERS.get(vocab.model)
    if cls is None:
        raise ModelError(f"{path}: tokenizer.ggml.model: {vocab.model!r} is not supported "
                         f"(supported: {', '.join(TOKENIZERS)})")
    return cls(vocab)
