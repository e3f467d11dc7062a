"""Llama-family forward pass (llama, mistral, qwen2): RMSNorm, GQA attention with RoPE, SwiGLU.

Every op goes through the backend that owns the layer; only the hidden state moves between backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from qf.format.errors import ContextOverflowError, ModelError
from qf.runtime.backend import Backend, vector_f32
from qf.runtime.hparams import HParams
from qf.runtime.kv_cache import DEFAULT_KV_TYPE, KVCache, KVSpec
from qf.runtime.weights import LayerTensors, ModelTensors


class NonFiniteError(ModelError):
    """A forward pass produced inf / NaN; names the first unit (token_embd, blk.N, output) whose output is not
    finite (weights with inf/NaN values or scales, or an overflow in f16)."""


@dataclass(frozen=True)
class Batch:
    """Rows of one forward pass: token ids [M] at positions pos [M] of KV slots slots [M] (int64 each).

    exact_rows: each row is computed bit for bit as it would be alone (decode steps of several sequences).
    """

    ids: np.ndarray
    pos: np.ndarray
    slots: np.ndarray
    exact_rows: bool = False

    @classmethod
    def sequence(cls, ids: Sequence[int] | np.ndarray, pos0: int, slot: int = 0) -> "Batch":
        """Consecutive tokens of one sequence from position pos0 in one slot."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        n = ids.size
        return cls(ids, np.arange(pos0, pos0 + n, dtype=np.int64), np.full(n, slot, dtype=np.int64))

    @property
    def size(self) -> int:
        """Number of rows M."""
        return int(self.ids.size)


@dataclass(frozen=True)
class ArchSpec:
    """What differs between llama-family architectures."""

    rope_neox: bool  # rotate (i, i + n_rot/2) pairs instead of (2i, 2i+1); see llama.cpp llama_model_rope_type


# GGUF general.architecture -> spec. llama.cpp permutes Q/K of llama/mistral at conversion (normal RoPE);
# qwen2 keeps HF's rotate-half layout (NEOX RoPE) and adds q/k/v biases (optional tensors).
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(rope_neox=False),
    "mistral": ArchSpec(rope_neox=False),
    "qwen2": ArchSpec(rope_neox=True),
}


def rope_angles(hp: HParams, n_ctx: int, freq_factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of theta[p, i] = p * scale * base^(-2i/n_rot) / factor[i]: each f32 [n_ctx, n_rot / 2]."""
    i = np.arange(hp.n_rot_pairs, dtype=np.float64)
    inv_freq = hp.rope_freq_scale * hp.rope_base ** (-2.0 * i / hp.n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    theta = np.arange(n_ctx, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


@dataclass
class PlacedLayer:
    """One block's weights in its backend's own form."""

    be: Backend
    attn_norm: Any
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    bq: Any
    bk: Any
    bv: Any
    ffn_norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any


def place_layer(be: Backend, t: LayerTensors) -> PlacedLayer:
    """Hand a block's tensors to its backend: matrices for linears, f32 vectors for norms and biases."""
    vec = lambda r: None if r is None else be.vector(r)  # noqa: E731
    return PlacedLayer(
        be=be,
        attn_norm=vec(t.attn_norm), ffn_norm=vec(t.ffn_norm),
        wq=be.matrix(t.wq), wk=be.matrix(t.wk), wv=be.matrix(t.wv), wo=be.matrix(t.wo),
        bq=vec(t.bq), bk=vec(t.bk), bv=vec(t.bv),
        w_gate=be.matrix(t.w_gate), w_up=be.matrix(t.w_up), w_down=be.matrix(t.w_down),
    )


class LlamaForward:
    """The forward pass over placed weights.

    `placement[i]` is the backend of layer i; the embedding lookup runs on `embed_be` and the output head
    (output_norm + output) on `head_be` (defaults: the first and the last layer's backends).
    """

    def __init__(self, hp: HParams, spec: ArchSpec, tensors: ModelTensors, placement: Sequence[Backend],
                 n_ctx: int, embed_be: Backend | None = None, head_be: Backend | None = None) -> None:
        self._place_ends(hp, spec, tensors, placement, n_ctx, embed_be, head_be)
        self.layers = [place_layer(be, t) for be, t in zip(placement, tensors.layers)]
        factors = None if tensors.rope_freqs is None else vector_f32(tensors.rope_freqs)
        cos, sin = rope_angles(hp, self.n_ctx, factors)
        # one copy of the angle tables per distinct backend
        self._rope = {id(be): (be.from_host(cos), be.from_host(sin)) for be in self.placement}

    def _place_ends(self, hp: HParams, spec: Any, tensors: ModelTensors, placement: Sequence[Backend], n_ctx: int,
                    embed_be: Backend | None, head_be: Backend | None) -> None:
        """Check the placement and put the embedding and the output head on their backends."""
        if len(placement) != hp.n_layer:
            raise ModelError(f"placement names {len(placement)} backends for {hp.n_layer} layers")
        self.hp, self.spec, self.n_ctx = hp, spec, int(n_ctx)
        self.placement = list(placement)
        self.embed_be = embed_be or placement[0]
        self.head_be = head_be or placement[-1]
        self.tok_embd = self.embed_be.matrix(tensors.tok_embd)
        self.output_norm = self.head_be.vector(tensors.output_norm)
        self.output = self.head_be.matrix(tensors.output)

    def kv_spec(self, n_slots: int = 1, type_k: str = DEFAULT_KV_TYPE, type_v: str = DEFAULT_KV_TYPE) -> KVSpec:
        """The KV cache this model needs for n_slots sequences of n_ctx positions."""
        hp = self.hp
        return KVSpec(n_slots, self.n_ctx, hp.n_head_kv, hp.head_dim, hp.head_dim, type_k, type_v)

    def new_cache(self, n_slots: int = 1, type_k: str = DEFAULT_KV_TYPE, type_v: str = DEFAULT_KV_TYPE) -> KVCache:
        """An empty KV cache, each layer's part allocated by that layer's backend."""
        return KVCache(self.kv_spec(n_slots, type_k, type_v), self.placement)

    def forward(self, ids: np.ndarray, pos0: int, cache: KVCache, all_logits: bool = False, slot: int = 0) -> np.ndarray:
        """Run tokens ids [M] of one sequence at positions pos0.. of a slot; logits f32 [M or 1 (last), n_vocab]."""
        batch = Batch.sequence(ids, pos0, slot)
        rows = None if all_logits else np.asarray([batch.size - 1])
        return self.forward_batch(batch, cache, rows)

    def forward_batch(self, batch: Batch, cache: KVCache, logit_rows: np.ndarray | None = None) -> np.ndarray:
        """Run a batch of rows (any mix of slots and positions; a row sees its slot's positions <= its own,
        its own batch rows included); logits f32 [len(logit_rows) (all rows when None), n_vocab]."""
        self._check(batch, cache)
        x, be = self._embed(batch)
        for i, layer in enumerate(self.layers):
            x, be = self._cross(x, be, layer.be)
            x = self._block(layer, x, batch, cache.layers[i])
        x, be = self._cross(x, be, self.head_be)
        if logit_rows is not None:
            x = x[logit_rows]
        return self._logits(x, batch)

    def locate_nonfinite(self, batch: Batch, cache: KVCache) -> str:
        """Re-run a batch (rewriting the same KV entries) checking every unit's output; the first unit whose
        output holds inf / NaN ("token_embd", "blk.N", "output"), or "" when all are finite."""
        finite = lambda x, b: bool(np.isfinite(b.to_host(x)).all())  # noqa: E731
        x, be = self._embed(batch)
        if not finite(x, be):
            return "token_embd"
        for i, layer in enumerate(self.layers):
            x, be = self._cross(x, be, layer.be)
            x = self._block(layer, x, batch, cache.layers[i])
            if not finite(x, be):
                return f"blk.{i}"
        x, be = self._cross(x, be, self.head_be)
        return "" if np.isfinite(self._logits(x, batch)).all() else "output"

    def _embed(self, batch: Batch) -> tuple[Any, Backend]:
        """Embedded rows x [M, n_embd] on the embedding's backend."""
        be = self.embed_be
        x = be.embed(self.tok_embd, batch.ids)  # x: [M, n_embd]
        self._after_embed(be, x)
        return x, be

    @staticmethod
    def _cross(x: Any, src: Backend, dst: Backend) -> tuple[Any, Backend]:
        """The hidden state on dst (moved only when it changes device)."""
        return (x, src) if dst is src else (dst.from_host(src.to_host(x)), dst)

    def _logits(self, x: Any, batch: Batch) -> np.ndarray:
        """Output norm and head on the head's backend -> host logits f32 [rows, n_vocab]."""
        be = self.head_be
        h = be.rms_norm(x, self.output_norm, self.hp.rms_eps)
        return self._finish_logits(be.to_host(be.linear(self.output, h, exact_rows=batch.exact_rows)))

    def _after_embed(self, be: Backend, x: Any) -> None:
        """Hook on the embedded tokens x [M, n_embd] (in place); llama has none."""

    def _finish_logits(self, logits: np.ndarray) -> np.ndarray:
        """Hook on the host logits [M or 1, n_vocab]; llama returns them as they are."""
        return logits

    def _check(self, batch: Batch, cache: KVCache) -> None:
        """Token ids in range, positions inside the context, slots inside the cache."""
        ids, pos, slots = batch.ids, batch.pos, batch.slots
        if ids.size == 0:
            raise ModelError("no tokens to evaluate")
        if not ids.shape == pos.shape == slots.shape:
            raise ModelError(f"batch rows disagree: ids {ids.shape}, positions {pos.shape}, slots {slots.shape}")
        if ids.min() < 0 or ids.max() >= self.hp.n_vocab:
            bad = int(ids[(ids < 0) | (ids >= self.hp.n_vocab)][0])
            raise ModelError(f"token id {bad} is out of range [0, {self.hp.n_vocab})")
        if pos.min() < 0 or pos.max() >= min(self.n_ctx, cache.n_ctx):
            raise ContextOverflowError(f"positions {int(pos.min())}..{int(pos.max())} exceed the context of "
                                       f"{min(self.n_ctx, cache.n_ctx)}")
        if slots.min() < 0 or slots.max() >= cache.n_slots:
            raise ModelError(f"KV slot {int(slots.max())} is out of range [0, {cache.n_slots})")

    def _block(self, L: PlacedLayer, x: Any, batch: Batch, kv: Any) -> Any:
        """One transformer block on x [M, n_embd], in place on the residual stream."""
        be, hp, ex = L.be, self.hp, batch.exact_rows
        n = x.shape[0]
        cos, sin = self._rope[id(be)]  # [n_ctx, n_rot / 2]
        h = be.rms_norm(x, L.attn_norm, hp.rms_eps)
        q = be.linear(L.wq, h, L.bq, ex).reshape(n, hp.n_head, hp.head_dim)  # q: [M, H, D]
        k = be.linear(L.wk, h, L.bk, ex).reshape(n, hp.n_head_kv, hp.head_dim)  # k: [M, Hkv, D]
        v = be.linear(L.wv, h, L.bv, ex).reshape(n, hp.n_head_kv, hp.head_dim)  # v: [M, Hkv, D]
        be.rope(q, cos, sin, batch.pos, self.spec.rope_neox)
        be.rope(k, cos, sin, batch.pos, self.spec.rope_neox)
        kv.store(k, v, batch.slots, batch.pos)
        a = kv.attend(q, batch.slots, batch.pos)  # a: [M, H * D]
        be.add_(x, be.linear(L.wo, a, None, ex))
        h = be.rms_norm(x, L.ffn_norm, hp.rms_eps)
        g = be.swiglu(be.linear(L.w_gate, h, None, ex), be.linear(L.w_up, h, None, ex))  # g: [M, n_ff]
        be.add_(x, be.linear(L.w_down, g, None, ex))
        return x
