"""phi3 files (Phi-3, Phi-3.5 mini, Phi-4 mini) as llama.cpp writes them: q, k, v in one attn_qkv matrix,
gate and up in one ffn_up of 2 x feed_forward_length rows (gate first), NEOX RoPE; LongRoPE ("su") as
rope_factors_long / rope_factors_short tensors and rope.scaling.attn_factor."""

from __future__ import annotations

from qf.format.tensor_roles import STD_GLOBALS, ModelArch, roles

MODELS = (
    ModelArch("phi3", roles(("attn_norm", "wqkv", "wo", "ffn_norm", "w_up", "w_down"), w_up=("n_embd", "n_ff2")),
              globals={**STD_GLOBALS, **roles((), ("rope_factors_long", "rope_factors_short"))},
              dense_ffn=("w_up", "w_down"), rope_neox=True,
              shared_inputs=(("attn_norm", ("wqkv",)), ("ffn_norm", ("w_up",)))),
)
