"""Gemma 3 forward pass (GGUF arch "gemma3", HF Gemma3ForCausalLM), as llama.cpp's llm_build_gemma3.

What differs from the llama family:
- the token embeddings are scaled by sqrt(n_embd);
- sandwich norms: attn_norm -> attention -> post_attention_norm -> residual, then ffn_norm -> FFN ->
  post_ffw_norm -> residual. HF's RMSNorm multiplies by (1 + w); llama.cpp's converter stores 1 + w in the
  GGUF, so every norm weight of the file is used as a plain multiplier;
- per-head RMSNorm of Q and K (attn_q_norm, attn_k_norm over head_dim) before NEOX RoPE;
- GEGLU feed-forward: gelu_tanh(gate) * up;
- queries scaled by 1/sqrt(head_dim) (1/sqrt(n_embd / n_head) for the 62-layer 27B, as llama.cpp decides);
- sliding-window layers (llama.cpp set_swa_pattern(6): layer i slides when i % 6 < 5, unless the file gives
  attention.sliding_window_pattern) see only the last `attention.sliding_window` positions and rotate with
  base rope.freq_base_swa (default 10000, no scaling); the global layers use rope.freq_base and the file's
  rope scaling;
- tied output head; final logit soft-capping when the file has final_logit_softcapping.
The KV cache keeps all n_ctx positions for sliding-window layers too; the window is applied as a mask
(simple, costs memory but not time: attention reads only the window's keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from qf.format.errors import ModelError
from qf.runtime.arch.llama import Batch, LlamaForward, rope_angles
from qf.runtime.backend import Backend, vector_f32
from qf.runtime.hparams import HParams
from qf.runtime.weights import LayerTensors, ModelTensors


@dataclass(frozen=True)
class Gemma3Spec:
    """Constants llama.cpp hard-codes for the architecture (the file may override the first two)."""

    swa_period: int  # layer i uses the sliding window when i % period < period - 1
    rope_base_swa: float  # RoPE base of sliding-window layers
    wide_query_layers: int  # a model of this many layers (27B) scales queries by 1/sqrt(n_embd / n_head)
    rope_neox: bool = True


ARCHS: dict[str, Gemma3Spec] = {
    "gemma3": Gemma3Spec(swa_period=6, rope_base_swa=10000.0, wide_query_layers=62),
}


def sliding_layers(hp: HParams, spec: Gemma3Spec) -> tuple[bool, ...]:
    """Per layer: does it use the sliding window? (none when the file has no attention.sliding_window)."""
    if hp.n_swa <= 0:
        return (False,) * hp.n_layer
    if hp.swa_layers is not None:
        return hp.swa_layers
    p = spec.swa_period
    return tuple(i % p < p - 1 for i in range(hp.n_layer))


def query_scale(hp: HParams, spec: Gemma3Spec) -> float:
    """The attention score factor (query_pre_attn_scalar ** -0.5)."""
    if hp.n_layer == spec.wide_query_layers:
        return 1.0 / math.sqrt(hp.n_embd / hp.n_head)
    return 1.0 / math.sqrt(hp.head_dim)


@dataclass
class PlacedGemmaLayer:
    """One block's weights in its backend's own form, and how the block attends."""

    be: Backend
    sliding: bool
    attn_norm: Any
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    q_norm: Any
    k_norm: Any
    attn_post_norm: Any
    ffn_norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any
    ffn_post_norm: Any


def place_gemma_layer(be: Backend, t: LayerTensors, sliding: bool, where: str) -> PlacedGemmaLayer:
    """Hand a block's tensors to its backend: matrices for linears, f32 vectors for the six norms."""
    for role in ("attn_q_norm", "attn_k_norm", "attn_post_norm", "ffn_post_norm"):
        if getattr(t, role) is None:
            raise ModelError(f"{where}: gemma3 layer tensor {role} is missing (next to {t.wq.name})")
    return PlacedGemmaLayer(
        be=be, sliding=sliding,
        attn_norm=be.vector(t.attn_norm), q_norm=be.vector(t.attn_q_norm), k_norm=be.vector(t.attn_k_norm),
        attn_post_norm=be.vector(t.attn_post_norm), ffn_norm=be.vector(t.ffn_norm),
        ffn_post_norm=be.vector(t.ffn_post_norm),
        wq=be.matrix(t.wq), wk=be.matrix(t.wk), wv=be.matrix(t.wv), wo=be.matrix(t.wo),
        w_gate=be.matrix(t.w_gate), w_up=be.matrix(t.w_up), w_down=be.matrix(t.w_down),
    )


class Gemma3Forward(LlamaForward):
    """The Gemma 3 forward pass over placed weights.

    Shares LlamaForward's KV cache and input checks (`new_cache`, `_check`); builds its own layers and RoPE
    tables, and overrides the per-block and embedding/logit hooks of `forward`.
    """

    def __init__(self, hp: HParams, spec: Gemma3Spec, tensors: ModelTensors, placement: Sequence[Backend],
                 n_ctx: int, embed_be: Backend | None = None, head_be: Backend | None = None) -> None:
        self._place_ends(hp, spec, tensors, placement, n_ctx, embed_be, head_be)
        self.embd_scale = math.sqrt(hp.n_embd)
        self.q_scale = query_scale(hp, spec)
        sliding = sliding_layers(hp, spec)
        self.layers = [place_gemma_layer(be, t, s, f"blk.{i}") for i, (be, t, s)
                       in enumerate(zip(placement, tensors.layers, sliding))]
        factors = None if tensors.rope_freqs is None else vector_f32(tensors.rope_freqs)
        # global layers: the file's base and scaling; sliding layers: their own base, unscaled
        local_base = hp.rope_base_swa if hp.rope_base_swa is not None else spec.rope_base_swa
        tables = {False: rope_angles(hp, self.n_ctx, factors),
                  True: rope_angles(replace(hp, rope_base=local_base, rope_freq_scale=1.0), self.n_ctx, None)}
        # one copy of each angle table per distinct backend: (id(backend), sliding) -> (cos, sin)
        self._rope_tables = {(id(be), s): (be.from_host(tables[s][0]), be.from_host(tables[s][1]))
                             for be, s in zip(self.placement, sliding)}

    def _after_embed(self, be: Backend, x: Any) -> None:
        """Gemma scales the embeddings by sqrt(n_embd)."""
        be.scale_(x, self.embd_scale)

    def _finish_logits(self, logits: np.ndarray) -> np.ndarray:
        """Final logit soft-capping, when the file sets it: cap * tanh(logits / cap)."""
        cap = self.hp.final_logit_softcap
        if cap > 0:
            logits = (np.tanh(logits / np.float32(cap)) * np.float32(cap)).astype(np.float32)
        return logits

    def _block(self, L: PlacedGemmaLayer, x: Any, batch: Batch, kv: Any) -> Any:
        """One Gemma 3 block on x [M, n_embd], in place on the residual stream."""
        be, hp, ex = L.be, self.hp, batch.exact_rows
        n, hd, eps = x.shape[0], hp.head_dim, hp.rms_eps
        cos, sin = self._rope_tables[(id(be), L.sliding)]  # [n_ctx, head_dim / 2]
        h = be.rms_norm(x, L.attn_norm, eps)
        q = be.linear(L.wq, h, None, ex).reshape(n * hp.n_head, hd)  # q: [M * H, D]
        k = be.linear(L.wk, h, None, ex).reshape(n * hp.n_head_kv, hd)  # k: [M * Hkv, D]
        v = be.linear(L.wv, h, None, ex).reshape(n, hp.n_head_kv, hd)  # v: [M, Hkv, D]
        q = be.rms_norm(q, L.q_norm, eps).reshape(n, hp.n_head, hd)  # per-head QK norm
        k = be.rms_norm(k, L.k_norm, eps).reshape(n, hp.n_head_kv, hd)
        be.rope(q, cos, sin, batch.pos, self.spec.rope_neox)
        be.rope(k, cos, sin, batch.pos, self.spec.rope_neox)
        kv.store(k, v, batch.slots, batch.pos)
        a = kv.attend(q, batch.slots, batch.pos, scale=self.q_scale, window=hp.n_swa if L.sliding else 0)
        be.add_(x, be.rms_norm(be.linear(L.wo, a, None, ex), L.attn_post_norm, eps))  # a: [M, H * D]
        h = be.rms_norm(x, L.ffn_norm, eps)
        g = be.geglu(be.linear(L.w_gate, h, None, ex), be.linear(L.w_up, h, None, ex))  # g: [M, n_ff]
        be.add_(x, be.rms_norm(be.linear(L.w_down, g, None, ex), L.ffn_post_norm, eps))
        return x
