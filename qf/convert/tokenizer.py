"""Hugging Face tokenizer files -> `tokenizer.ggml.*` metadata (byte-level BPE -> gpt2, SentencePiece -> llama)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qf.convert.archspec import KV
from qf.convert.hf_config import CONFIG_NAME
from qf.convert.json_fields import Fields, is_int, read_json, short
from qf.convert.tokenizer_pre import CHECK_TEXT, PRE_HASHES, check_hash, pre_from_structure
from qf.format.errors import ConvertError, FormatError
from qf.format.hparams import LIMITS
from qf.format.model_check import MAX_TEMPLATE_CHARS, TEMPLATE_KEY
from qf.format.spm_proto import read_spm
from qf.format.values import GGUFValueType as V
from qf.format.vocab import TokenType

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
ADDED_TOKENS_JSON = "added_tokens.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_MODEL, TOKENIZER_CONFIG, ADDED_TOKENS_JSON, *CHAT_TEMPLATE_FILES)
SPECIAL_TYPES = ("bos", "eos", "unk", "pad")
GGUF_SPECIAL_KEY = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
PAD_SCORE = -1000.0  # score llama.cpp's converter gives padding and added tokens
SPM_SPACE = "\u2581"
MAX_PAD_TOKENS = 1 << 16  # unused [PAD{i}] tokens added to fill the embedding rows (real models: a few hundred)
MAX_ID_DIGITS = 10  # a token id in a JSON key


def looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special: <|...|>, <｜...｜>, <unused..>, and a few known names."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _tokenizer_config(model_dir: Path) -> Fields:
    """tokenizer_config.json, or an empty one when absent."""
    path = model_dir / TOKENIZER_CONFIG
    return Fields(read_json(path, TOKENIZER_CONFIG) if path.is_file() else {}, path)


def _token_text(tcfg: Fields, key: str) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, {"content": ...} or null."""
    v = tcfg.raw(key)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict):
        return tcfg.obj_fields(key).str("content")
    raise tcfg.error(key, v, 'a string or {"content": string}')


def _read_template_file(path: Path) -> str:
    """chat_template.jinja, refused by its size before it is read when it cannot be within the limit."""
    if path.stat().st_size > 4 * MAX_TEMPLATE_CHARS:  # UTF-8: at most 4 bytes per character
        raise ConvertError(f"{path}: chat template of {path.stat().st_size} bytes exceeds the limit of "
                           f"{MAX_TEMPLATE_CHARS} characters")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read chat template: {e}") from None


def _named_templates(f: Fields, key: str) -> list[tuple[str, str]]:
    """A template field: a string, or a list of {"name", "template"} -> [(name, template)] ("default" first)."""
    v = f.raw(key)
    if v is None:
        return []
    if isinstance(v, str):
        return [("default", v)]
    if not isinstance(v, list):
        raise f.error(key, v, 'a string or a JSON array of {"name", "template"} objects')
    out = []
    for i, item in enumerate(v):
        entry = Fields(item, f.path, f"{f.prefix}{key}[{i}].")
        out.append((entry.str("name"), entry.str("template")))
    return out


def _chat_template(model_dir: Path, tcfg: Fields) -> list[KV]:
    """tokenizer.chat_template (and named variants) from tokenizer_config.json or chat_template.jinja/.json."""
    source, templates = tcfg, _named_templates(tcfg, "chat_template")
    if not tcfg.has("chat_template") and (model_dir / "chat_template.jinja").is_file():
        source, templates = None, [("default", _read_template_file(model_dir / "chat_template.jinja"))]
    elif not tcfg.has("chat_template") and (model_dir / "chat_template.json").is_file():
        path = model_dir / "chat_template.json"
        source = Fields(read_json(path, "chat_template.json"), path)
        templates = _named_templates(source, "chat_template")
    out: list[KV] = []
    for name, text in templates:
        if len(text) > MAX_TEMPLATE_CHARS:
            where = source.path if source is not None else model_dir / "chat_template.jinja"
            raise ConvertError(f"{where}: chat template {name!r} of {len(text)} characters exceeds the limit of "
                               f"{MAX_TEMPLATE_CHARS}")
        out.append((TEMPLATE_KEY + ("" if name == "default" else f".{name}"), text, V.STRING))
    return out


def _config_token_id(cfg: Fields, key: str) -> int | None:
    """config.json *_token_id: an integer, or None when absent, null or a list (several ids: none chosen)."""
    v = cfg.raw(key)
    if v is None or isinstance(v, list) and all(is_int(x) for x in v):
        return None
    return cfg.int(key)


def _special_ids(tcfg: Fields, cfg: Fields, lookup: dict[str, int], n_vocab: int,
                 fallback: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad ids: tokenizer_config token text, then config.json *_token_id, then the model's own."""
    out: dict[str, int] = {}
    for typ in SPECIAL_TYPES:
        candidates = [lookup.get(_token_text(tcfg, f"{typ}_token") or "\0"),
                      _config_token_id(cfg, f"{typ}_token_id"), fallback.get(typ)]
        tid = next((c for c in candidates if is_int(c) and 0 <= c < n_vocab), None)
        if tid is not None:
            out[typ] = tid
    return out


def _template_adds(top: Fields) -> dict[str, str]:
    """Special tokens a TemplateProcessing post-processor puts first/last: {'first': text, 'last': text}."""
    post = top.raw("post_processor")
    if not isinstance(post, dict):
        return {}
    procs = post.get("processors", [post])
    out: dict[str, str] = {}
    for p in procs if isinstance(procs, list) else []:
        single = p.get("single") if isinstance(p, dict) and p.get("type") == "TemplateProcessing" else None
        if isinstance(single, list) and len(single) > 1:
            for pos, item in (("first", single[0]), ("last", single[-1])):
                special = item.get("SpecialToken") if isinstance(item, dict) else None
                sid = special.get("id") if isinstance(special, dict) else None
                if isinstance(sid, str) and sid:
                    out[pos] = sid
    return out


def _add_flags(tcfg: Fields, top: Fields, tokens: list[str], ids: dict[str, int], bos_default: bool) -> list[KV]:
    """add_bos_token / add_eos_token: tokenizer_config, else the post-processor template, else the default."""
    adds = _template_adds(top)
    out: list[KV] = []
    for typ, pos, default in (("bos", "first", bos_default), ("eos", "last", False)):
        flag = tcfg.bool(f"add_{typ}_token", None)
        if flag is None:
            flag = (pos in adds and typ in ids and tokens[ids[typ]] == adds[pos]) or (pos not in adds and default)
        out.append((f"tokenizer.ggml.add_{typ}_token", flag, V.BOOL))
    return out


def _common_kv(model_dir: Path, tcfg: Fields, cfg: Fields, tokens: list[str], top: Fields,
               fallback_ids: dict[str, int], bos_default: bool) -> list[KV]:
    """Special ids, add_*_token flags, add_space_prefix and the chat template."""
    lookup = {t: i for i, t in enumerate(tokens)}
    ids = _special_ids(tcfg, cfg, lookup, len(tokens), fallback_ids)
    out: list[KV] = [(f"tokenizer.ggml.{GGUF_SPECIAL_KEY[t]}", i, V.UINT32) for t, i in ids.items()]
    out += _add_flags(tcfg, top, tokens, ids, bos_default)
    if tcfg.bool("add_prefix_space", None) is not None:
        out.append(("tokenizer.ggml.add_space_prefix", tcfg.bool("add_prefix_space"), V.BOOL))
    return out + _chat_template(model_dir, tcfg)


def _merge_strings(model: Fields) -> list[str]:
    """tokenizer.json merges ("a b" or ["a", "b"]) -> GGUF "a b" strings (spaces inside parts as U+0120)."""
    merges = model.list("merges", [])
    out = []
    for i, m in enumerate(merges):
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append(" ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m))
        else:
            raise model.error(f"merges[{i}]", m, 'a string "a b" or a pair of strings')
    return out


def _detect_pre(tok_json: dict[str, Any], path: Path) -> str:
    """tokenizer.ggml.pre: llama.cpp's check-text hash, else the recipe with the same pre_tokenizer structure."""
    from tokenizers import Tokenizer  # local: only conversions need it

    try:
        ids = Tokenizer.from_str(json.dumps(tok_json)).encode(CHECK_TEXT).ids
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as e:  # tokenizers raises Exception subclasses, and pyo3 panics (BaseException)
        raise ConvertError(f"{path}: tokenizers cannot load this file: {type(e).__name__}: {e}") from None
    name = PRE_HASHES.get(check_hash(ids)) or pre_from_structure(tok_json)
    if name is None:
        known = ", ".join(sorted(set(PRE_HASHES.values())))
        raise ConvertError(f"{path}: BPE pre-tokenizer not recognized (hash {check_hash(ids)}); known: {known}")
    return name


def vocab_size(max_id: int, n_defined: int, n_vocab: int | None, cfg: Fields, path: Path) -> int:
    """Tokens in the output: n_vocab (the embedding rows) when given, else config.json vocab_size or the
    tokenizer's own size. Checked before anything is sized by it: no id at or beyond it, and at most
    MAX_PAD_TOKENS unused padding tokens."""
    if n_vocab is None:
        what = "config.json vocab_size is"
        n_vocab = max(max_id + 1, cfg.int("vocab_size", 0, lo=1, hi=LIMITS["vocab_size"]))
    else:
        what = "embed_tokens has"
    if max_id >= n_vocab:
        raise ConvertError(f"{path}: tokenizer has {max_id + 1} tokens but {what} {n_vocab} rows")
    if n_vocab - n_defined > MAX_PAD_TOKENS:
        raise ConvertError(f"{path}: the tokenizer defines {n_defined} tokens; filling {n_vocab} rows would add "
                           f"{n_vocab - n_defined} unused padding tokens (limit {MAX_PAD_TOKENS})")
    return n_vocab


def _bpe_ids(model: Fields, added: list[Fields], path: Path) -> dict[int, str]:
    """id -> text of model.vocab and added_tokens; an id used by two tokens is an error."""
    vocab = model.int_map("vocab", lo=0)
    for a in added:
        vocab[a.str("content")] = a.int("id", lo=0)
    by_id: dict[int, str] = {}
    for text, i in vocab.items():
        if by_id.setdefault(i, text) != text:
            raise ConvertError(f"{path}: id {i} is used by two tokens, {by_id[i]!r} and {text!r}")
    return by_id


def _bpe_vocab(by_id: dict[int, str], added: dict[str, Fields], n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and token types for ids 0..n_vocab-1 (gaps become [PAD{i}] UNUSED, as llama.cpp does)."""
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        a = added.get(text)
        special = a is not None and (a.bool("special", False) or looks_special(text))
        types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED if a else TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def _added_entries(top: Fields) -> list[Fields]:
    """tokenizer.json added_tokens: a list of objects (each with an integer id and a string content)."""
    return [Fields(a, top.path, f"added_tokens[{i}].") for i, a in enumerate(top.list("added_tokens", []))]


def bpe_tokenizer_kv(model_dir: Path, cfg: dict[str, Any], n_vocab: int | None = None) -> list[KV]:
    """tokenizer.json (byte-level BPE) -> gpt2 tokenizer metadata with n_vocab tokens (see vocab_size)."""
    path = model_dir / TOKENIZER_JSON
    tok_json = read_json(path, TOKENIZER_JSON)
    top = Fields(tok_json, path)
    model = top.obj_fields("model")
    if model.raw("type") != "BPE" or model.raw("byte_fallback"):
        raise ConvertError(f"{path}: only byte-level BPE tokenizer.json is supported (or a tokenizer.model); "
                           f"got model type {short(model.raw('type'))}")
    entries = _added_entries(top)
    by_id = _bpe_ids(model, entries, path)
    n_vocab = vocab_size(max(by_id, default=-1), len(by_id), n_vocab, Fields(cfg, model_dir / CONFIG_NAME), path)
    merges = _merge_strings(model)
    tokens, types = _bpe_vocab(by_id, {a.str("content"): a for a in entries}, n_vocab)
    tcfg = _tokenizer_config(model_dir)
    out: list[KV] = [
        ("tokenizer.ggml.model", "gpt2", V.STRING),
        ("tokenizer.ggml.pre", _detect_pre(tok_json, path), V.STRING),
        ("tokenizer.ggml.tokens", tokens, V.STRING),
        ("tokenizer.ggml.token_type", np.asarray(types, dtype=np.int32), V.INT32),
        ("tokenizer.ggml.merges", merges, V.STRING),
    ]
    return out + _common_kv(model_dir, tcfg, Fields(cfg, model_dir / CONFIG_NAME), tokens, top, {},
                            bos_default=False)


def _decoder_id(tcfg: Fields, key: str) -> int:
    """An added_tokens_decoder key: a decimal token id."""
    if not (key.isascii() and key.isdigit() and len(key) <= MAX_ID_DIGITS):
        raise tcfg.error(f"added_tokens_decoder.{key}", key, f"keyed by a decimal token id of at most "
                         f"{MAX_ID_DIGITS} digits")
    return int(key)


def _spm_added(model_dir: Path, tcfg: Fields, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """added_tokens.json (new ids) and tokenizer_config added_tokens_decoder (retyped ids), as llama.cpp does."""
    path = model_dir / ADDED_TOKENS_JSON
    extra = Fields(read_json(path, ADDED_TOKENS_JSON), path).int_values() if path.is_file() else {}
    for text, i in sorted(extra.items(), key=lambda kv: kv[1]):
        if i < len(tokens) and tokens[i] == text:
            continue
        if i != len(tokens):
            raise ConvertError(f"{path}: added token {text!r} id {i} does not follow the vocabulary of {len(tokens)}")
        tokens.append(text)
        scores.append(PAD_SCORE)
        types.append(TokenType.USER_DEFINED)
    decoder = tcfg.obj_fields("added_tokens_decoder")
    for key in decoder.obj:
        i, a = _decoder_id(tcfg, key), decoder.obj_fields(key)
        text = a.str("content")
        if not 0 <= i < len(tokens):
            continue
        special = a.bool("special", False) or looks_special(text)
        tokens[i] = text if special else text.replace(SPM_SPACE, " ")
        types[i] = TokenType.CONTROL if special else TokenType.USER_DEFINED
        scores[i] = PAD_SCORE


def spm_tokenizer_kv(model_dir: Path, cfg: dict[str, Any], n_vocab: int | None = None) -> list[KV]:
    """tokenizer.model (SentencePiece) -> llama tokenizer metadata with scores and token types (n_vocab tokens)."""
    path = model_dir / TOKENIZER_MODEL
    try:
        m = read_spm(path)
    except FormatError as e:
        raise ConvertError(str(e)) from None
    tokens, scores, types = list(m.pieces), list(m.scores), list(m.types)
    tcfg = _tokenizer_config(model_dir)
    _spm_added(model_dir, tcfg, tokens, scores, types)
    cfg_fields = Fields(cfg, model_dir / CONFIG_NAME)
    for i in range(len(tokens), vocab_size(len(tokens) - 1, len(tokens), n_vocab, cfg_fields, path)):
        tokens.append(f"[PAD{i}]")
        scores.append(PAD_SCORE)
        types.append(TokenType.UNUSED)
    own = {t: i for t, i in (("bos", m.bos_id), ("eos", m.eos_id), ("unk", m.unk_id), ("pad", m.pad_id)) if i >= 0}
    out: list[KV] = [
        ("tokenizer.ggml.model", "llama", V.STRING),
        ("tokenizer.ggml.pre", "default", V.STRING),
        ("tokenizer.ggml.tokens", tokens, V.STRING),
        ("tokenizer.ggml.scores", np.asarray(scores, dtype=np.float32), V.FLOAT32),
        ("tokenizer.ggml.token_type", np.asarray(types, dtype=np.int32), V.INT32),
    ]
    if tcfg.bool("add_prefix_space", None) is None:
        out.append(("tokenizer.ggml.add_space_prefix", m.add_dummy_prefix, V.BOOL))
    out.append(("tokenizer.ggml.remove_extra_whitespaces", m.remove_extra_whitespaces, V.BOOL))
    return out + _common_kv(model_dir, tcfg, cfg_fields, tokens, Fields({}, path), own, bos_default=True)


def tokenizer_kv(model_dir: str | Path, cfg: dict[str, Any], n_vocab: int | None = None) -> list[KV]:
    """Tokenizer metadata for a checkpoint: tokenizer.model first (as llama.cpp), else tokenizer.json.

    n_vocab: the embedding rows the tokens must fill (the pipeline passes them, so no size comes from
    config.json unchecked); None: config.json vocab_size or the tokenizer's own size."""
    model_dir = Path(model_dir)
    if (model_dir / TOKENIZER_MODEL).is_file():
        return spm_tokenizer_kv(model_dir, cfg, n_vocab)
    if (model_dir / TOKENIZER_JSON).is_file():
        return bpe_tokenizer_kv(model_dir, cfg, n_vocab)
    raise ConvertError(f"{model_dir}: no tokenizer: need {TOKENIZER_JSON} (byte-level BPE) or {TOKENIZER_MODEL}")
