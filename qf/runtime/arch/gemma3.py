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
from typing import Any

import numpy as np

from qf.runtime.arch.blocks import DecoderForward, rope_angles
from qf.runtime.backend import Backend, vector_f32
from qf.runtime.hparams import HParams
from qf.runtime.weights import ModelTensors


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


class Gemma3Forward(DecoderForward):
    """The Gemma 3 forward pass: the shared decoder block with GEGLU, its four extra norms (present in the
    file's tables), per-layer RoPE tables and windows, scaled embeddings and soft-capped logits."""

    activation = "geglu"

    def __init__(self, hp: HParams, spec: Gemma3Spec, *args: Any, **kwargs: Any) -> None:
        self.sliding = sliding_layers(hp, spec)
        self.embd_scale = math.sqrt(hp.n_embd)
        self._q_scale = query_scale(hp, spec)
        super().__init__(hp, spec, *args, **kwargs)

    @property
    def q_scale(self) -> float:
        """query_pre_attn_scalar ** -0.5."""
        return self._q_scale

    def _rope_tables(self, tensors: ModelTensors) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
        """Global layers: the file's base and scaling; sliding layers: their own base, unscaled."""
        hp = self.hp
        factors = None if tensors.rope_freqs is None else vector_f32(tensors.rope_freqs)
        local_base = hp.rope_base_swa if hp.rope_base_swa is not None else self.spec.rope_base_swa
        return {False: rope_angles(hp, self.n_ctx, factors),
                True: rope_angles(replace(hp, rope_base=local_base, rope_freq_scale=1.0), self.n_ctx, None)}

    def _layer_rope(self, i: int) -> bool:
        """Sliding layers rotate with the local table."""
        return self.sliding[i]

    def _layer_window(self, i: int) -> int:
        """attention.sliding_window keys on sliding layers."""
        return self.hp.n_swa if self.sliding[i] else 0

    def _after_embed(self, be: Backend, x: Any) -> None:
        """Gemma scales the embeddings by sqrt(n_embd)."""
        be.scale_(x, self.embd_scale)

    def _finish_logits(self, logits: np.ndarray) -> np.ndarray:
        """Final logit soft-capping, when the file sets it: cap * tanh(logits / cap)."""
        cap = self.hp.final_logit_softcap
        if cap > 0:
            logits = (np.tanh(logits / np.float32(cap)) * np.float32(cap)).astype(np.float32)
        return logits


FORWARD = Gemma3Forward
