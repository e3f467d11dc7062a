"""Shared blocks of every forward pass: the batch, RoPE tables, weight placement, the decoder block (pre-norm
attention with optional biases, QK norms and post norms; dense gated FFN or mixture of experts) and the
layer loop over placed backends. An architecture module picks its options and overrides the hooks.

Every op goes through the backend that owns the layer (the expert matrices may sit on another backend:
`--cpu-moe`); only the hidden state moves between backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from qf.format.errors import ContextOverflowError, ModelError
from qf.format.tensor_roles import EXPERT_ROLES, LAYER_ROLES
from qf.runtime.backend import Backend, linears, vector_f32
from qf.runtime.hparams import HParams
from qf.runtime.kv_cache import DEFAULT_KV_TYPE, KVCache, KVSpec
from qf.runtime.weights import LayerTensors, ModelTensors, TensorRef, row_slices


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


def rope_angles(hp: HParams, n_ctx: int, freq_factors: np.ndarray | None,
                attn_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of theta[p, i] = p * scale * base^(-2i/n_rot) / factor[i], times attn_factor (LongRoPE's
    mscale, as llama.cpp's rope applies it): each f32 [n_ctx, n_rot / 2]."""
    i = np.arange(hp.n_rot_pairs, dtype=np.float64)
    inv_freq = hp.rope_freq_scale * hp.rope_base ** (-2.0 * i / hp.n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    theta = np.arange(n_ctx, dtype=np.float64)[:, None] * inv_freq[None, :]
    return (np.cos(theta) * attn_factor).astype(np.float32), (np.sin(theta) * attn_factor).astype(np.float32)


# ---------------------------------------------------------------------------------------------- placement

# Fused matrices split into zero-copy row blocks at placement: fused role -> (role of each block, its rows).
FUSED: dict[str, tuple[tuple[str, ...], Callable[[HParams], tuple[int, ...]]]] = {
    "wqkv": (("wq", "wk", "wv"), lambda hp: (hp.q_dim, hp.kv_dim, hp.kv_dim)),
}
# Roles whose matrix holds gate and up rows (phi3's ffn_up of 2 x n_ff rows, gate first), per architecture.
FUSED_GATE_UP: dict[str, tuple[tuple[str, ...], Callable[[HParams], tuple[int, ...]]]] = {
    "w_up": (("w_gate", "w_up"), lambda hp: (hp.n_ff, hp.n_ff)),
}


@dataclass
class Experts:
    """One layer's experts on their backend: per expert (gate, up, down) matrices, and the backend."""

    be: Backend
    gate: list[Any]
    up: list[Any]
    down: list[Any]


class PlacedLayer:
    """One block's weights in its backend's own form: an attribute per role of the vocabulary (None when
    absent; fused matrices appear under the roles of their parts), `experts` for a mixture of experts."""

    def __init__(self, be: Backend, weights: dict[str, Any], experts: Experts | None) -> None:
        self.be, self.experts = be, experts
        self.rope: tuple[Any, Any] | None = None  # (cos, sin) on be, set by the forward
        self.window = 0  # sliding-window keys, 0 = all
        for role in LAYER_ROLES:
            setattr(self, role, weights.get(role))


def split_fused(t: LayerTensors, hp: HParams, fused: dict) -> dict[str, TensorRef]:
    """The layer's tensors by role with each fused matrix replaced by its row blocks."""
    out = t.roles()
    for role, (parts, sizes) in fused.items():
        if role in out:
            whole = out.pop(role)
            out.update(zip(parts, row_slices(whole, sizes(hp), role)))
    return out


def place_experts(be: Backend, t: dict[str, TensorRef], hp: HParams) -> Experts:
    """Each expert's three matrices as their own backend matrices (row blocks of the 3-D tensors)."""
    per = {r: row_slices(t[r], (t[r].n_out // hp.n_expert,) * hp.n_expert, "expert") for r in EXPERT_ROLES}
    return Experts(be, *[[be.matrix(m) for m in per[r]] for r in EXPERT_ROLES])


def place_layer(be: Backend, t: LayerTensors, hp: HParams, fused: dict | None = None,
                experts_be: Backend | None = None) -> PlacedLayer:
    """Hand a block's tensors to its backend(s): f32 vectors for norms and biases, matrices for linears, the
    experts to experts_be (default: the layer's backend)."""
    tensors = split_fused(t, hp, fused or {})
    experts = None
    if all(r in tensors for r in EXPERT_ROLES):
        experts = place_experts(experts_be or be, {r: tensors.pop(r) for r in EXPERT_ROLES}, hp)
    weights = {r: be.vector(x) if len(x.ne) == 1 else be.matrix(x) for r, x in tensors.items()}
    return PlacedLayer(be, weights, experts)


# ---------------------------------------------------------------------------------------------- routing

def route(logits: np.ndarray, k: int, renormalise: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax top-k routing of router logits [M, n_expert] -> (experts [M, k] int64, weights [M, k] f32):
    softmax in f32 over all experts, the k largest (lowest index first on ties), renormalised to sum 1 when
    the architecture does so. Each row on its own."""
    z = logits.astype(np.float32)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    sel = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, sel, axis=1)
    if renormalise:
        w = w / w.sum(axis=1, keepdims=True)
    return sel.astype(np.int64), w.astype(np.float32)


def moe_ffn(ex: Experts, h: Any, sel: np.ndarray, w: np.ndarray, exact_rows: bool, n_embd: int) -> Any:
    """sum over each row's selected experts of weight * down(silu(gate(h)) * up(h)), on the experts' backend;
    only the selected experts' rows are read, each expert once per batch, experts summed in index order."""
    be = ex.be
    out = be.from_host(np.zeros((sel.shape[0], n_embd), np.float32))  # out: [M, n_embd]
    for e in np.unique(sel):
        rows, slot = np.nonzero(sel == e)
        idx = rows.tolist()
        xe = h[idx]
        y = be.linear(ex.down[e], be.swiglu(be.linear(ex.gate[e], xe, None, exact_rows),
                                            be.linear(ex.up[e], xe, None, exact_rows)), None, exact_rows)
        out[idx] += y * be.from_host(w[rows, slot][:, None])
    return out


# ---------------------------------------------------------------------------------------------- the forward

ACTIVATIONS: dict[str, Callable[[Backend, Any, Any], Any]] = {
    "swiglu": lambda be, g, u: be.swiglu(g, u),
    "geglu": lambda be, g, u: be.geglu(g, u),
}


class DecoderForward:
    """A pre-norm decoder over placed weights: embedding, n_layer blocks, output norm and head.

    `placement[i]` is the backend of layer i, `experts_be[i]` of its experts (default: the layer's); the
    embedding lookup runs on `embed_be` and the output head (output_norm + output) on `head_be` (defaults: the
    first and the last layer's backends). Subclasses set class options and override the hooks.
    """

    activation = "swiglu"
    fused: dict = FUSED  # fused matrices split at placement

    def __init__(self, hp: HParams, spec: Any, tensors: ModelTensors, placement: Sequence[Backend], n_ctx: int,
                 embed_be: Backend | None = None, head_be: Backend | None = None,
                 experts_be: Sequence[Backend] | None = None) -> None:
        self._place_ends(hp, spec, tensors, placement, n_ctx, embed_be, head_be)
        xbe = list(experts_be) if experts_be is not None else list(placement)
        if len(xbe) != hp.n_layer:
            raise ModelError(f"expert placement names {len(xbe)} backends for {hp.n_layer} layers")
        self.experts_placement = xbe
        self.layers = [place_layer(be, t, hp, self.fused, x) for be, t, x in zip(placement, tensors.layers, xbe)]
        tables = self._rope_tables(tensors)
        copies: dict[tuple[int, Any], tuple[Any, Any]] = {}  # one copy per (backend, table)
        for i, L in enumerate(self.layers):
            key = self._layer_rope(i)
            if (id(L.be), key) not in copies:
                copies[(id(L.be), key)] = (L.be.from_host(tables[key][0]), L.be.from_host(tables[key][1]))
            L.rope, L.window = copies[(id(L.be), key)], self._layer_window(i)

    # -- hooks ----------------------------------------------------------------------------------------------
    @property
    def rope_neox(self) -> bool:
        """NEOX (rotate-half) pairs or GGML's interleaved ones."""
        return bool(self.spec.rope_neox)

    @property
    def q_scale(self) -> float | None:
        """The attention score factor (None: 1/sqrt(head_dim))."""
        return None

    def _rope_tables(self, tensors: ModelTensors) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
        """Host RoPE tables by key; one table (key None) from the file's base, scaling and rope_freqs."""
        factors = None if tensors.rope_freqs is None else vector_f32(tensors.rope_freqs)
        return {None: rope_angles(self.hp, self.n_ctx, factors)}

    def _layer_rope(self, i: int) -> Any:
        """Which table layer i rotates with."""
        return None

    def _layer_window(self, i: int) -> int:
        """Sliding-window keys of layer i (0: all)."""
        return 0

    def _after_embed(self, be: Backend, x: Any) -> None:
        """Hook on the embedded tokens x [M, n_embd] (in place); none by default."""

    def _finish_logits(self, logits: np.ndarray) -> np.ndarray:
        """Hook on the host logits [M or 1, n_vocab]; returned as they are by default."""
        return logits

    # -- placement ------------------------------------------------------------------------------------------
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

    # -- running --------------------------------------------------------------------------------------------
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

    # -- the block ------------------------------------------------------------------------------------------
    def _heads(self, be: Backend, y: Any, norm: Any, n: int, heads: int) -> Any:
        """A projection [M, heads * D] as [M, heads, D], each head RMS-normed when the layer has that norm."""
        hd = self.hp.head_dim
        if norm is None:
            return y.reshape(n, heads, hd)
        return be.rms_norm(y.reshape(n * heads, hd), norm, self.hp.rms_eps).reshape(n, heads, hd)

    def _post(self, be: Backend, y: Any, norm: Any) -> Any:
        """A sub-block's output, RMS-normed when the layer has a post norm (gemma's sandwich)."""
        return y if norm is None else be.rms_norm(y, norm, self.hp.rms_eps)

    def _attention(self, L: PlacedLayer, h: Any, batch: Batch, kv: Any) -> Any:
        """Self-attention of the normed rows h [M, n_embd] -> [M, H * D] (before the output projection)."""
        be, hp, ex = L.be, self.hp, batch.exact_rows
        n = h.shape[0]
        cos, sin = L.rope  # [n_ctx, n_rot / 2]
        yq, yk, yv = linears(be, (L.wq, L.wk, L.wv), h, (L.bq, L.bk, L.bv), ex)
        q = self._heads(be, yq, L.attn_q_norm, n, hp.n_head)  # q: [M, H, D]
        k = self._heads(be, yk, L.attn_k_norm, n, hp.n_head_kv)  # k: [M, Hkv, D]
        v = yv.reshape(n, hp.n_head_kv, hp.head_dim)  # v: [M, Hkv, D]
        be.rope(q, cos, sin, batch.pos, self.rope_neox)
        be.rope(k, cos, sin, batch.pos, self.rope_neox)
        kv.store(k, v, batch.slots, batch.pos)
        return kv.attend(q, batch.slots, batch.pos, scale=self.q_scale, window=L.window)

    def _ffn(self, L: PlacedLayer, h: Any, exact_rows: bool) -> Any:
        """The feed-forward of the normed rows h [M, n_embd]: gated dense, or the mixture of experts."""
        be = L.be
        if L.experts is not None:
            return self._moe(L, h, exact_rows)
        g = ACTIVATIONS[self.activation](be, *linears(be, (L.w_gate, L.w_up), h, (None, None), exact_rows))  # [M, n_ff]
        return be.linear(L.w_down, g, None, exact_rows)

    def _moe(self, L: PlacedLayer, h: Any, exact_rows: bool) -> Any:
        """Route each row on the host, run the selected experts on their backend, return on the layer's."""
        be, xb = L.be, L.experts.be
        logits = be.to_host(be.linear(L.w_gate_inp, h, None, exact_rows))  # [M, n_expert]
        sel, w = route(logits, self.hp.n_expert_used, self.spec.expert_weights_norm)
        hx = h if xb is be else xb.from_host(be.to_host(h))
        y = moe_ffn(L.experts, hx, sel, w, exact_rows, self.hp.n_embd)
        return y if xb is be else be.from_host(xb.to_host(y))

    def _block(self, L: PlacedLayer, x: Any, batch: Batch, kv: Any) -> Any:
        """One transformer block on x [M, n_embd], in place on the residual stream."""
        be, eps = L.be, self.hp.rms_eps
        a = self._attention(L, be.rms_norm(x, L.attn_norm, eps), batch, kv)  # a: [M, H * D]
        be.add_(x, self._post(be, be.linear(L.wo, a, None, batch.exact_rows), L.attn_post_norm))
        f = self._ffn(L, be.rms_norm(x, L.ffn_norm, eps), batch.exact_rows)
        be.add_(x, self._post(be, f, L.ffn_post_norm))
        return x

