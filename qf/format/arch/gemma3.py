"""gemma3 files: sandwich norms and per-head QK norms around llama's attention, GEGLU feed-forward."""

from __future__ import annotations

from qf.format.tensor_roles import ModelArch, roles

MODELS = (
    ModelArch("gemma3", roles(("attn_norm", "wq", "wk", "wv", "wo", "attn_q_norm", "attn_k_norm", "attn_post_norm",
                               "ffn_norm", "w_gate", "w_up", "w_down", "ffn_post_norm")),
              rope_neox=True, shared_inputs=(("attn_norm", ("wq", "wk", "wv")), ("ffn_norm", ("w_gate", "w_up")))),
)
