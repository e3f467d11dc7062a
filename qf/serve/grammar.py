"""Structured output: JSON (any object, or one matching a JSON Schema) as a logits mask, through llguidance.

llguidance (PyPI, a Rust extension with no torch dependency) compiles the schema to a grammar and computes,
per step, the set of tokens that keep the output inside it (an Earley parser over the token trie: tens to a
few hundred microseconds per token on SmolLM2's 49k vocabulary; `benchmarks/bench_serve.py` measures it).
The mask runs in the scheduler thread (qf.runtime.generate.LogitsConstraint), per request, so constrained
and free requests share one batch.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from qf.format.errors import QFError
from qf.runtime.tokenizer import Tokenizer

MAX_SCHEMA_BYTES = 256 << 10  # a response_format schema larger than this is refused


class GrammarError(QFError):
    """A response_format cannot be compiled (invalid schema, unsupported feature, llguidance missing)."""


class _TokenizerAdapter:
    """What llguidance.TokenizerWrapper reads from a tokenizer: token bytes, special ids, an encoder."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        self.tokens = [tok.token_bytes(i, special=True) for i in range(tok.n_vocab)]
        self.special_token_ids = sorted(set(tok.vocab.special_texts(True).values()) | set(tok.eog_ids))

    def __call__(self, text: str | bytes) -> list[int]:
        """Token ids of text (bytes are decoded as UTF-8 first)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special=False, parse_special=False)


class GrammarFactory:
    """llguidance's view of one model's vocabulary (built once per model), and constraints from it."""

    def __init__(self, tok: Tokenizer) -> None:
        try:
            import llguidance
        except ImportError as e:
            raise GrammarError("structured output needs llguidance: pip install 'qf[server]'") from e
        self._ll = llguidance
        self.n_vocab = tok.n_vocab
        self.lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerAdapter(tok)))

    def json(self, schema: dict[str, Any] | None) -> "JsonConstraint":
        """A constraint for a JSON value matching schema (None: any JSON object)."""
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, dict):
            raise GrammarError("json_schema.schema must be a JSON object")
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_BYTES:
            raise GrammarError(f"the JSON schema is {len(text)} bytes; the limit is {MAX_SCHEMA_BYTES}")
        try:
            grammar = self._ll.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
            msg = self._ll.LLMatcher.validate_grammar(grammar, self.lltok)
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
        if msg and not msg.startswith("WARNING"):
            raise GrammarError(f"unsupported JSON schema: {msg}")
        return JsonConstraint(self._ll.LLMatcher(self.lltok, grammar, log_level=0), self.n_vocab)


class JsonConstraint:
    """Masks logits to the tokens the grammar allows next; advanced by each sampled token."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.bitmask = np.full((n_vocab + 31) // 32, -1, dtype=np.int32)  # 1 bit per token

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits [n_vocab] with disallowed tokens at -inf."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        err = self.matcher.get_error()
        if err:
            raise GrammarError(f"structured output failed: {err}")
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[:self.n_vocab].astype(bool)
        logits[~allowed] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        """Advance the grammar by the sampled token."""
        self.matcher.consume_token(int(token))
