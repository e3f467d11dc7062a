"""Hyperparameters of a llama-family model, read from GGUF metadata and validated.

Shared by everything that loads or produces a model file: the runtime reads a file's metadata through the
reader's `Metadata`; the converter and the requantizer pass the keys they are about to write through
`qf.format.model_check.KVMetadata` (same interface), so a file is refused by the same rules before it is
written as when it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qf.format.errors import ModelError

# Upper bounds a real model stays far below; anything above is a corrupt or hostile file.
# (llama.cpp caps layers at LLAMA_MAX_LAYERS = 512.)
LIMITS: dict[str, int] = {
    "block_count": 512,
    "embedding_length": 1 << 17,
    "feed_forward_length": 1 << 20,
    "attention.head_count": 1 << 12,
    "attention.head_count_kv": 1 << 12,
    "attention.key_length": 1 << 12,
    "attention.value_length": 1 << 12,
    "rope.dimension_count": 1 << 12,
    "context_length": 1 << 24,
    "vocab_size": 1 << 22,
    "attention.sliding_window": 1 << 24,
    "attention.sliding_window_pattern": 512,
    "expert_count": 512,  # llama.cpp's LLAMA_MAX_EXPERTS
    "expert_used_count": 512,
    "expert_feed_forward_length": 1 << 20,
    "rope.scaling.original_context_length": 1 << 24,
}
MINIMUM: dict[str, int] = {"attention.sliding_window": 0, "expert_count": 0, "expert_used_count": 0}  # keys where 0 is allowed ("none")

# rope.scaling.type values the runtime implements; llama3-style scaling comes as `rope_freqs.weight`.
ROPE_SCALING_TYPES = ("none", "linear")


class ModelCheckError(ModelError):
    """A model's metadata or tensor table breaks a rule; names the file, the key or tensor, and the rule."""

    def __init__(self, path: str, subject: str, reason: str, tensor: bool = False) -> None:
        self.path, self.subject, self.reason, self.tensor = str(path), subject, reason, tensor
        super().__init__(f"{self.path}: {f'tensor {subject!r}' if tensor else subject}: {reason}")


@dataclass(frozen=True)
class HParams:
    """Sizes and constants of one llama-family model (names follow GGUF keys)."""

    arch: str
    n_layer: int  # {arch}.block_count
    n_ctx_train: int  # {arch}.context_length
    n_embd: int  # {arch}.embedding_length
    n_ff: int  # {arch}.feed_forward_length
    n_head: int  # {arch}.attention.head_count
    n_head_kv: int  # {arch}.attention.head_count_kv
    head_dim: int  # {arch}.attention.key_length, default n_embd // n_head
    n_rot: int  # {arch}.rope.dimension_count, default head_dim
    n_vocab: int  # {arch}.vocab_size, default len(tokenizer.ggml.tokens)
    rms_eps: float  # {arch}.attention.layer_norm_rms_epsilon
    rope_base: float  # {arch}.rope.freq_base
    rope_freq_scale: float  # 1 / {arch}.rope.scaling.factor for linear scaling
    # Sliding-window attention and logit soft-capping (gemma family); the defaults mean "none".
    n_swa: int = 0  # {arch}.attention.sliding_window: keys within n_swa positions of the query; 0 = none
    swa_layers: tuple[bool, ...] | None = None  # {arch}.attention.sliding_window_pattern, per layer; None = absent
    rope_base_swa: float | None = None  # {arch}.rope.freq_base_swa (sliding-window layers); None = absent
    final_logit_softcap: float = 0.0  # {arch}.final_logit_softcapping: logits = c * tanh(logits / c); 0 = none
    # Mixture of experts; n_expert 0 = a dense model.
    n_expert: int = 0  # {arch}.expert_count
    n_expert_used: int = 0  # {arch}.expert_used_count: experts each token is routed to (top-k)
    n_ff_exp: int = 0  # {arch}.expert_feed_forward_length, default feed_forward_length
    # LongRoPE (phi3): attention factor on cos/sin, and the context the short factors serve.
    rope_attn_factor: float = 1.0  # {arch}.rope.scaling.attn_factor
    n_ctx_orig: int = 0  # {arch}.rope.scaling.original_context_length; 0 = context_length

    @property
    def n_gqa(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_head_kv

    @property
    def q_dim(self) -> int:
        """Width of the query projection."""
        return self.n_head * self.head_dim

    @property
    def n_rot_pairs(self) -> int:
        """Number of rotated (x, y) pairs per head."""
        return self.n_rot // 2

    @property
    def qkv_dim(self) -> int:
        """Rows of a fused q/k/v projection."""
        return self.q_dim + 2 * self.kv_dim

    @property
    def n_ff2(self) -> int:
        """Rows of a fused gate/up projection."""
        return 2 * self.n_ff

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections."""
        return self.n_head_kv * self.head_dim


class _Keys:
    """Typed, validated access to `{arch}.*` keys; every error names the file and the key."""

    def __init__(self, meta: Any, arch: str, path: str) -> None:
        self.meta, self.arch, self.path = meta, arch, path

    def key(self, name: str) -> str:
        """The full GGUF key of an architecture-relative name."""
        return f"{self.arch}.{name}"

    def fail(self, name: str, msg: str) -> ModelCheckError:
        """A ModelError naming the file and key."""
        return ModelCheckError(self.path, self.key(name), msg)

    def int(self, name: str, default: int | None = None, minimum: int = 1) -> int:
        """A positive (>= minimum) integer key bounded by LIMITS."""
        key = self.key(name)
        if key not in self.meta:
            if default is None:
                raise self.fail(name, "missing (required hyperparameter)")
            return default
        if isinstance(self.meta.raw(key)[1], (list, np.ndarray)):
            raise self.fail(name, "per-layer values (an array) are not supported; one value for every layer is")
        value = int(self.meta.get_int(key))
        limit = LIMITS.get(name)
        if value < minimum or (limit is not None and value > limit):
            bound = f"[{minimum}, {limit}]" if limit is not None else f">= {minimum}"
            raise self.fail(name, f"value {value} is out of range {bound}")
        return value

    def float(self, name: str, default: float | None = None, positive: bool = True) -> float:
        """A finite float key (strictly positive unless positive=False)."""
        key = self.key(name)
        if key not in self.meta:
            if default is None:
                raise self.fail(name, "missing (required hyperparameter)")
            return default
        value = float(self.meta.get_float(key))
        if not np.isfinite(value) or (positive and value <= 0):
            raise self.fail(name, f"value {value} is not a {'positive ' if positive else ''}finite number")
        return value


def check_limits(meta: Any, arch: str, path: str = "<model>") -> None:
    """Every size key present lies within LIMITS: the cheap check to run before anything is sized by one."""
    k = _Keys(meta, arch, str(path))
    for name in LIMITS:
        key = k.key(name)
        if key in meta and not isinstance(meta.raw(key)[1], (list, np.ndarray)):
            k.int(name, minimum=MINIMUM.get(name, 1))


def _vocab_size(meta: Any, keys: _Keys, hint: int | None = None) -> int:
    """n_vocab from {arch}.vocab_size, else the tokenizer's token list length, else `hint` (rows of the
    embedding, for a reader of the header alone)."""
    if keys.key("vocab_size") in meta:
        return keys.int("vocab_size")
    if hint is not None and "tokenizer.ggml.tokens" not in meta:
        return hint
    if "tokenizer.ggml.tokens" in meta:
        n = len(meta.get_array("tokenizer.ggml.tokens"))
        if not 1 <= n <= LIMITS["vocab_size"]:
            raise ModelCheckError(keys.path, "tokenizer.ggml.tokens", f"{n} tokens is out of range "
                                  f"[1, {LIMITS['vocab_size']}]")
        return n
    raise keys.fail("vocab_size", "missing, and the file has no tokenizer.ggml.tokens to infer it from")


def _rope_freq_scale(keys: _Keys, scaling_types: tuple[str, ...]) -> float:
    """1/factor for linear (or yarn) rope scaling; 1.0 when absent; unsupported types are rejected."""
    kind_key = keys.key("rope.scaling.type")
    kind = str(keys.meta.get_str(kind_key)) if kind_key in keys.meta else "none"
    if kind not in scaling_types:
        raise keys.fail("rope.scaling.type", f"{kind!r} is not supported (supported: {', '.join(scaling_types)})")
    factor = keys.float("rope.scaling.factor", 1.0) if kind != "none" else 1.0
    if kind == "none" and keys.key("rope.scale_linear") in keys.meta:  # older files
        factor = keys.float("rope.scale_linear")
    return 1.0 / factor


def _swa_layers(keys: _Keys, n_layer: int) -> tuple[bool, ...] | None:
    """Which layers use the sliding window: a period N (layer i slides when i % N < N - 1, llama.cpp's
    set_swa_pattern) or one flag per layer; None when the key is absent."""
    name = "attention.sliding_window_pattern"
    key = keys.key(name)
    if key not in keys.meta:
        return None
    value = keys.meta.raw(key)[1]
    if isinstance(value, (np.ndarray, list)):
        flags = np.asarray(value)
        if flags.ndim != 1 or flags.size != n_layer or flags.dtype.kind not in "biu":
            raise keys.fail(name, f"needs {n_layer} boolean flags (one per layer), got {flags.size} of {flags.dtype}")
        return tuple(bool(f) for f in flags)
    period = keys.int(name)
    return tuple(i % period < period - 1 for i in range(n_layer))


def _head_dim(k: _Keys, n_embd: int, n_head: int) -> int:
    """attention.key_length (== value_length), else n_embd / n_head, which must divide; even for RoPE."""
    if k.key("attention.key_length") in k.meta:
        head_dim = k.int("attention.key_length")
        v_len = k.int("attention.value_length", default=head_dim)
        if v_len != head_dim:
            raise k.fail("attention.value_length", f"{v_len} != attention.key_length {head_dim} is not supported")
    elif n_embd % n_head:
        raise k.fail("attention.head_count", f"{n_head} does not divide embedding_length {n_embd}")
    else:
        head_dim = n_embd // n_head
    if head_dim % 2:
        raise k.fail("attention.key_length", f"head size {head_dim} must be even for RoPE")
    return head_dim


def _experts(k: _Keys) -> tuple[int, int]:
    """(expert_count, expert_used_count): both 0 for a dense model, else 1 <= used <= count."""
    n_expert = k.int("expert_count", default=0, minimum=0)
    n_used = k.int("expert_used_count", default=0, minimum=0)
    if n_expert and not 1 <= n_used <= n_expert:
        raise k.fail("expert_used_count", f"{n_used} must be in [1, expert_count {n_expert}]")
    if n_used and not n_expert:
        raise k.fail("expert_used_count", f"{n_used} experts used but no expert_count")
    return n_expert, n_used


def hparams_from_metadata(meta: Any, arch: str, path: str = "<model>",
                          rope_scaling_types: tuple[str, ...] = ROPE_SCALING_TYPES,
                          n_vocab_hint: int | None = None) -> HParams:
    """Read and validate the hyperparameters of architecture `arch`; raises ModelError naming the key.

    n_vocab_hint: the vocabulary when the file names none (the planner passes the embedding's rows)."""
    k = _Keys(meta, arch, str(path))
    check_limits(meta, arch, path)
    n_embd = k.int("embedding_length")
    n_head = k.int("attention.head_count")
    n_head_kv = k.int("attention.head_count_kv", default=n_head)
    if n_head % n_head_kv:
        raise k.fail("attention.head_count_kv", f"{n_head_kv} does not divide attention.head_count {n_head}")
    head_dim = _head_dim(k, n_embd, n_head)
    n_rot = k.int("rope.dimension_count", default=head_dim)
    if n_rot > head_dim or n_rot % 2:
        raise k.fail("rope.dimension_count", f"{n_rot} must be even and <= the head size {head_dim}")
    n_layer = k.int("block_count")
    n_ff = k.int("feed_forward_length")
    n_expert, n_expert_used = _experts(k)
    return HParams(
        arch=arch,
        n_layer=n_layer,
        n_ctx_train=k.int("context_length"),
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_rot=n_rot,
        n_vocab=_vocab_size(meta, k, n_vocab_hint),
        rms_eps=k.float("attention.layer_norm_rms_epsilon", 1e-5),
        rope_base=k.float("rope.freq_base", 10000.0),
        rope_freq_scale=_rope_freq_scale(k, rope_scaling_types),
        n_swa=k.int("attention.sliding_window", default=0, minimum=0),
        swa_layers=_swa_layers(k, n_layer),
        rope_base_swa=k.float("rope.freq_base_swa") if k.key("rope.freq_base_swa") in meta else None,
        final_logit_softcap=k.float("final_logit_softcapping", 0.0),
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_exp=k.int("expert_feed_forward_length", default=n_ff) if n_expert else 0,
        rope_attn_factor=k.float("rope.scaling.attn_factor", 1.0),
        n_ctx_orig=k.int("rope.scaling.original_context_length", default=0, minimum=0),
    )
