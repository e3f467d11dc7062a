"""Qwen3 and Qwen3-MoE forward passes (GGUF "qwen3", "qwen3moe"), as llama.cpp's llm_build_qwen3 / qwen3moe:
the shared decoder block with per-head RMSNorm of Q and K before NEOX RoPE and no q/k/v bias (both follow
from the file's tensor table); qwen3moe routes each token to expert_used_count of expert_count SwiGLU experts
(softmax, top-k, weights renormalised)."""

from __future__ import annotations

from qf.format.arch import model_arch
from qf.runtime.arch.blocks import DecoderForward


class Qwen3Forward(DecoderForward):
    """Qwen3 dense and MoE (see DecoderForward; the QK norms and experts are in the placed layers)."""


ARCHS = {name: model_arch(name) for name in ("qwen3", "qwen3moe")}
FORWARD = Qwen3Forward
