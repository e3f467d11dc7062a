"""Which tensors a llama-family model file holds, per role and architecture (data only).

Read by qf.format.model_check (the shared validator) and qf.runtime.weights (the loader).
"""

from __future__ import annotations

# role -> (GGUF name template, expected ne as HParams attribute names (ne[0] innermost), required).
LAYER_TENSORS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "attn_norm": ("blk.{i}.attn_norm.weight", ("n_embd",), True),
    "wq": ("blk.{i}.attn_q.weight", ("n_embd", "q_dim"), True),
    "wk": ("blk.{i}.attn_k.weight", ("n_embd", "kv_dim"), True),
    "wv": ("blk.{i}.attn_v.weight", ("n_embd", "kv_dim"), True),
    "wo": ("blk.{i}.attn_output.weight", ("q_dim", "n_embd"), True),
    "bq": ("blk.{i}.attn_q.bias", ("q_dim",), False),  # qwen2
    "bk": ("blk.{i}.attn_k.bias", ("kv_dim",), False),
    "bv": ("blk.{i}.attn_v.bias", ("kv_dim",), False),
    "ffn_norm": ("blk.{i}.ffn_norm.weight", ("n_embd",), True),
    "w_gate": ("blk.{i}.ffn_gate.weight", ("n_embd", "n_ff"), True),
    "w_up": ("blk.{i}.ffn_up.weight", ("n_embd", "n_ff"), True),
    "w_down": ("blk.{i}.ffn_down.weight", ("n_ff", "n_embd"), True),
    "attn_q_norm": ("blk.{i}.attn_q_norm.weight", ("head_dim",), False),  # gemma3: per-head QK RMSNorm
    "attn_k_norm": ("blk.{i}.attn_k_norm.weight", ("head_dim",), False),
    "attn_post_norm": ("blk.{i}.post_attention_norm.weight", ("n_embd",), False),  # gemma3: sandwich norms
    "ffn_post_norm": ("blk.{i}.post_ffw_norm.weight", ("n_embd",), False),
}

GLOBAL_TENSORS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "tok_embd": ("token_embd.weight", ("n_embd", "n_vocab"), True),
    "output_norm": ("output_norm.weight", ("n_embd",), True),
    "output": ("output.weight", ("n_embd", "n_vocab"), False),  # absent: tied to token_embd
    "rope_freqs": ("rope_freqs.weight", ("n_rot_pairs",), False),  # llama3 rope scaling factors
}

GEMMA_NORMS = ("attn_q_norm", "attn_k_norm", "attn_post_norm", "ffn_post_norm")
QKV_BIASES = ("bq", "bk", "bv")

# Optional roles that an architecture requires (its forward pass reads them).
REQUIRED_BY_ARCH: dict[str, tuple[str, ...]] = {
    "gemma3": GEMMA_NORMS,
}

# Roles an architecture's forward pass never reads: a file holding them is refused (llama.cpp's
# "wrong number of tensors"), not run with weights silently ignored. Keys: every architecture known here.
EXCLUDED_BY_ARCH: dict[str, tuple[str, ...]] = {
    "llama": GEMMA_NORMS,
    "mistral": GEMMA_NORMS,
    "qwen2": GEMMA_NORMS,
    "gemma3": QKV_BIASES,
}

# Roles read as f32 vectors (norms, biases, rope factors) rather than by the matrix kernels.
VECTOR_ROLES = frozenset(r for table in (LAYER_TENSORS, GLOBAL_TENSORS) for r, (_, dims, _) in table.items()
                         if len(dims) == 1)
