"""llama (Llama 2/3, SmolLM, Mistral, Mixtral), mistral and qwen2 files, as llama.cpp writes them.

Mixtral is `llama` with experts (llama.expert_count): router ffn_gate_inp and ffn_{gate,up,down}_exps of
feed_forward_length rows per expert; softmax top-k, weights renormalised (llama.cpp's build_moe_ffn, norm_w).
"""

from __future__ import annotations

from qf.format.tensor_roles import MOE_FFN, ModelArch, roles

ATTENTION = ("attn_norm", "wq", "wk", "wv", "wo")
FFN = ("ffn_norm", "w_gate", "w_up", "w_down")
SHARED_INPUTS = (("attn_norm", ("wq", "wk", "wv")), ("ffn_norm", ("w_gate", "w_up")))
MOE = roles(MOE_FFN)

MODELS = (
    ModelArch("llama", roles(ATTENTION + FFN, ("bq", "bk", "bv")), moe=MOE, shared_inputs=SHARED_INPUTS),
    ModelArch("mistral", roles(ATTENTION + FFN, ("bq", "bk", "bv")), moe=MOE, shared_inputs=SHARED_INPUTS),
    ModelArch("qwen2", roles(ATTENTION + FFN, ("bq", "bk", "bv")), rope_neox=True, shared_inputs=SHARED_INPUTS),
)
