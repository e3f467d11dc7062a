"""`tokenizer.ggml.*` metadata -> HF tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qf.convert.tokenizer import GGUF_SPECIAL_KEY, SPECIAL_TYPES
from qf.convert.tokenizer_pre import recipe
from qf.format.errors import ConvertError
from qf.format.spm_proto import SpmModel, encode_spm
from qf.format.vocab import TokenType


def _tokens(meta: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """Tokens and their types (NORMAL when the file has no token_type array)."""
    if "tokenizer.ggml.tokens" not in meta:
        raise ConvertError("tokenizer.ggml.tokens: missing (the file has no vocabulary to export)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(len(tokens))), dtype=np.int64)
    if len(types) != len(tokens):
        raise ConvertError(f"{len(types)} token types for {len(tokens)} tokens")
    return tokens, types


def special_ids(meta: dict[str, Any], n_tokens: int) -> dict[str, int]:
    """bos/eos/unk/pad ids present in the metadata and inside the vocabulary."""
    out = {}
    for typ in SPECIAL_TYPES:
        v = meta.get(f"tokenizer.ggml.{GGUF_SPECIAL_KEY[typ]}")
        if v is not None and 0 <= int(v) < n_tokens:
            out[typ] = int(v)
    return out


def _added_tokens(tokens: list[str], types: np.ndarray) -> list[dict[str, Any]]:
    """CONTROL and USER_DEFINED tokens as tokenizer.json added_tokens (matched before the model runs)."""
    idx = np.flatnonzero((types == TokenType.CONTROL) | (types == TokenType.USER_DEFINED))
    return [{"id": int(i), "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": bool(types[i] == TokenType.CONTROL)} for i in idx]


def _post_processor(tokens: list[str], ids: dict[str, int], add_bos: bool, add_eos: bool) -> dict[str, Any]:
    """TemplateProcessing adding BOS/EOS when the metadata asks for them, else plain ByteLevel."""
    first = [ids["bos"]] if add_bos and "bos" in ids else []
    last = [ids["eos"]] if add_eos and "eos" in ids else []
    if not first and not last:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}

    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        sp = lambda i: {"SpecialToken": {"id": tokens[i], "type_id": type_id}}  # noqa: E731
        return [sp(i) for i in first] + [{"Sequence": {"id": name, "type_id": type_id}}] + [sp(i) for i in last]

    specials = {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in first + last}
    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": specials}


def bpe_tokenizer_json(meta: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json for a gpt2 (byte-level BPE) model, pre-tokenizer rebuilt from tokenizer.ggml.pre."""
    tokens, types = _tokens(meta)
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    try:
        r = recipe(pre)
    except KeyError as e:
        raise ConvertError(str(e.args[0])) from None
    # byte-level parts never hold a literal space (it is U+0120), so "a b" splits unambiguously
    merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])]
    ids = special_ids(meta, len(tokens))
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types),
        "normalizer": r["normalizer"],
        "pre_tokenizer": r["pre_tokenizer"],
        "post_processor": _post_processor(tokens, ids, bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                                          bool(meta.get("tokenizer.ggml.add_eos_token", False))),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": r["ignore_merges"], "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": merges},
    }


def spm_model(meta: dict[str, Any]) -> SpmModel:
    """SentencePiece model (BPE) for a llama-tokenizer file: pieces, scores, types and normalizer flags."""
    tokens, types = _tokens(meta)
    scores = np.asarray(meta.get("tokenizer.ggml.scores", np.zeros(len(tokens))), dtype=np.float32)
    if len(scores) != len(tokens):
        raise ConvertError(f"tokenizer.ggml.scores: {len(scores)} scores for {len(tokens)} tokens")
    ids = special_ids(meta, len(tokens))
    return SpmModel(
        pieces=tokens, scores=[float(s) for s in scores], types=[int(t) for t in types],
        byte_fallback=bool(np.any(types == TokenType.BYTE)),
        unk_id=ids.get("unk", -1), bos_id=ids.get("bos", -1), eos_id=ids.get("eos", -1), pad_id=ids.get("pad", -1),
        add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
        remove_extra_whitespaces=bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)),
    )


def tokenizer_config(meta: dict[str, Any], model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: special tokens, add_*_token, chat template, added tokens."""
    tokens, types = _tokens(meta)
    ids = special_ids(meta, len(tokens))
    is_bpe = meta["tokenizer.ggml.model"] == "gpt2"
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast" if is_bpe else "LlamaTokenizer",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", not is_bpe)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                 for a in _added_tokens(tokens, types)},
    }
    for typ in SPECIAL_TYPES:
        cfg[f"{typ}_token"] = tokens[ids[typ]] if typ in ids else None
    if "tokenizer.ggml.add_space_prefix" in meta:
        cfg["add_prefix_space"] = bool(meta["tokenizer.ggml.add_space_prefix"])
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = str(meta["tokenizer.chat_template"])
    return cfg


def write_tokenizer_files(meta: dict[str, Any], out_dir: Path, model_max_length: int) -> list[str]:
    """Write the tokenizer files for the metadata's tokenizer model; returns the file names written."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        files = {"tokenizer.json": json.dumps(bpe_tokenizer_json(meta), ensure_ascii=False).encode("utf-8")}
    elif model == "llama":
        files = {"tokenizer.model": encode_spm(spm_model(meta))}
    else:
        raise ConvertError(f"cannot export tokenizer model {model!r}; supported: gpt2, llama")
    files["tokenizer_config.json"] = json.dumps(tokenizer_config(meta, model_max_length), indent=2,
                                                ensure_ascii=False).encode("utf-8")
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    return list(files)
