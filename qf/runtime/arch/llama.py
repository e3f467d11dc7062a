"""Llama-family forward pass (llama, mistral, qwen2; Mixtral as llama with experts): RMSNorm, GQA attention
with RoPE (q/k/v biases when the file has them), SwiGLU or a softmax top-k mixture of SwiGLU experts.

The block is qf.runtime.arch.blocks' decoder as it is; the tensor tables are qf.format.arch.llama's.
"""

from __future__ import annotations

from qf.format.arch import model_arch
from qf.runtime.arch.blocks import Batch, DecoderForward, NonFiniteError, PlacedLayer, place_layer, rope_angles

__all__ = ["ARCHS", "FORWARD", "Batch", "LlamaForward", "NonFiniteError", "PlacedLayer", "place_layer",
           "rope_angles"]


class LlamaForward(DecoderForward):
    """The llama-family forward pass over placed weights (see DecoderForward)."""


# GGUF general.architecture -> the spec the forward gets (its ModelArch: RoPE layout, expert routing).
# llama.cpp permutes Q/K of llama/mistral at conversion (normal RoPE); qwen2 keeps HF's rotate-half layout.
ARCHS = {name: model_arch(name) for name in ("llama", "mistral", "qwen2")}
FORWARD = LlamaForward
