"""Phi-3 forward pass (GGUF "phi3"), as llama.cpp's llm_build_phi3: the shared decoder block over q/k/v and
gate/up split from the file's fused attn_qkv and ffn_up (zero-copy row blocks), NEOX RoPE, SwiGLU.

LongRoPE ("su"/"longrope"): per-frequency divisors rope_factors_long when the context exceeds
rope.scaling.original_context_length, else rope_factors_short (llama.cpp's choice by n_ctx per sequence),
and cos/sin scaled by rope.scaling.attn_factor. The file's sliding window is ignored, as llama.cpp does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qf.format.arch import model_arch
from qf.runtime.arch.blocks import FUSED, FUSED_GATE_UP, DecoderForward, rope_angles
from qf.runtime.backend import vector_f32
from qf.runtime.weights import ModelTensors


def rope_factor_role(n_ctx: int, n_ctx_orig: int) -> str:
    """Which LongRoPE factors a context of n_ctx uses (llama.cpp's get_rope_factors)."""
    return "rope_factors_long" if n_ctx_orig and n_ctx > n_ctx_orig else "rope_factors_short"


class Phi3Forward(DecoderForward):
    """Phi-3 over placed weights (see DecoderForward)."""

    fused = {**FUSED, **FUSED_GATE_UP}

    def _rope_tables(self, tensors: ModelTensors) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
        """One table: the file's base, the LongRoPE factors for this context (when present), attn_factor."""
        hp = self.hp
        t = tensors.extra.get(rope_factor_role(self.n_ctx, hp.n_ctx_orig or hp.n_ctx_train))
        factors = None if t is None else vector_f32(t)
        return {None: rope_angles(hp, self.n_ctx, factors, hp.rope_attn_factor)}


ARCHS = {"phi3": model_arch("phi3")}
FORWARD = Phi3Forward
