"""qwen3 and qwen3moe files: per-head QK RMSNorm before NEOX RoPE, no q/k/v bias.

qwen3moe: router ffn_gate_inp and expert_feed_forward_length rows per expert; softmax top-k with the weights
renormalised (llama.cpp's llm_build_qwen3moe always passes norm_w, so a checkpoint with norm_topk_prob false
cannot be expressed in GGUF: the converter refuses it).
"""

from __future__ import annotations

from qf.format.tensor_roles import MOE_FFN, ModelArch, roles

ATTENTION = ("attn_norm", "wq", "wk", "wv", "wo", "attn_q_norm", "attn_k_norm", "ffn_norm")
SHARED_INPUTS = (("attn_norm", ("wq", "wk", "wv")), ("ffn_norm", ("w_gate", "w_up")))

MODELS = (
    ModelArch("qwen3", roles(ATTENTION + ("w_gate", "w_up", "w_down")), rope_neox=True, shared_inputs=SHARED_INPUTS),
    ModelArch("qwen3moe", roles(ATTENTION), rope_neox=True, dense_ffn=(), moe=roles(MOE_FFN), needs_experts=True,
              shared_inputs=(("attn_norm", ("wq", "wk", "wv")), ("ffn_norm", ("w_gate_inp", "w_gate_exps",
                                                                               "w_up_exps")))),
)
