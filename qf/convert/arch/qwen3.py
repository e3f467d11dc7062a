"""Qwen3 (HF Qwen3ForCausalLM -> GGUF "qwen3") and Qwen3-MoE (Qwen3MoeForCausalLM -> "qwen3moe"), as llama.cpp's
convert_hf_to_gguf writes them.

- No Q/K permutation (NEOX RoPE), no q/k/v biases; per-head q_norm / k_norm as attn_q_norm / attn_k_norm
  (plain RMSNorm weights: no shift).
- qwen3moe: the router mlp.gate as ffn_gate_inp, each layer's experts stacked into ffn_{gate,up,down}_exps;
  expert_count, expert_used_count, expert_feed_forward_length (moe_intermediate_size). llama.cpp always
  renormalises the top-k weights and has every layer sparse, so a checkpoint with norm_topk_prob false,
  mlp_only_layers or decoder_sparse_step != 1 is refused (the GGUF could not say it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qf.convert.arch.llama import HPARAMS, IGNORE, ROPE_THETA_DEFAULT, TENSOR_MAP, extra_kv
from qf.convert.archspec import KV, ArchSpec, HParam, shortest_f32
from qf.convert.json_fields import Fields
from qf.format.errors import ConvertError
from qf.format.values import GGUFValueType as V

ATTENTION_MAP = {k: v for k, v in TENSOR_MAP.items() if "_proj.bias" not in k and ".mlp." not in k} | {
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
}
DENSE_MAP = ATTENTION_MAP | {k: v for k, v in TENSOR_MAP.items() if ".mlp." in k}
MOE_MAP = ATTENTION_MAP | {
    "model.layers.{bid}.mlp.gate.weight": "blk.{bid}.ffn_gate_inp.weight",
    "model.layers.{bid}.mlp.experts.{xid}.gate_proj.weight": "blk.{bid}.ffn_gate_exps.weight",
    "model.layers.{bid}.mlp.experts.{xid}.up_proj.weight": "blk.{bid}.ffn_up_exps.weight",
    "model.layers.{bid}.mlp.experts.{xid}.down_proj.weight": "blk.{bid}.ffn_down_exps.weight",
}
ATTENTION_TENSORS = (
    "token_embd.weight", "output_norm.weight",
    "blk.{bid}.attn_norm.weight", "blk.{bid}.attn_q.weight", "blk.{bid}.attn_k.weight", "blk.{bid}.attn_v.weight",
    "blk.{bid}.attn_output.weight", "blk.{bid}.attn_q_norm.weight", "blk.{bid}.attn_k_norm.weight",
    "blk.{bid}.ffn_norm.weight",
)
DENSE_TENSORS = ATTENTION_TENSORS + ("blk.{bid}.ffn_gate.weight", "blk.{bid}.ffn_up.weight", "blk.{bid}.ffn_down.weight")
MOE_TENSORS = ATTENTION_TENSORS + ("blk.{bid}.ffn_gate_inp.weight", "blk.{bid}.ffn_gate_exps.weight",
                                   "blk.{bid}.ffn_up_exps.weight", "blk.{bid}.ffn_down_exps.weight")
MOE_HPARAMS = HPARAMS + (
    HParam("expert_count", ("num_experts", "num_local_experts"), V.UINT32),
    HParam("expert_used_count", ("num_experts_per_tok",), V.UINT32),
    HParam("expert_feed_forward_length", ("moe_intermediate_size",), V.UINT32),
)


def _check_moe(cfg: dict[str, Any], path: Path) -> None:
    """What qwen3moe GGUF files cannot express: unnormalised top-k weights, dense layers among the sparse."""
    f = Fields(cfg, path)
    if not f.bool("norm_topk_prob", False):
        raise ConvertError(f"{path}: norm_topk_prob false is not supported: qwen3moe GGUF files always renormalise "
                           "the top-k expert weights (llama.cpp)")
    if f.int("decoder_sparse_step", 1, lo=1) != 1 or f.list("mlp_only_layers", []):
        raise ConvertError(f"{path}: decoder_sparse_step != 1 or mlp_only_layers (dense layers among the experts) "
                           "is not supported by qwen3moe GGUF files")


def _check_attention(cfg: dict[str, Any], path: Path) -> None:
    """Qwen3 attention has no q/k/v bias and no sliding window in GGUF."""
    f = Fields(cfg, path)
    if f.bool("attention_bias", False):
        raise ConvertError(f"{path}: attention_bias true is not supported: qwen3 GGUF files have no q/k/v biases")
    if f.bool("use_sliding_window", False):
        raise ConvertError(f"{path}: use_sliding_window true is not supported: qwen3 GGUF files have no window")


def _extra_kv(arch: str, moe: bool):
    """RoPE and head-size keys (as llama's), after the checks the GGUF needs."""
    base = extra_kv(arch)

    def fn(cfg: dict[str, Any], path: Path) -> list[KV]:
        _check_attention(cfg, path)
        if moe:
            _check_moe(cfg, path)
        return base(cfg, path)
    return fn


def _export(arch: str, moe: bool):
    """config.json entries beyond the hyperparameter table."""
    def fn(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
                               "rope_theta": shortest_f32(meta.get(f"{arch}.rope.freq_base", ROPE_THETA_DEFAULT))}
        if f"{arch}.attention.key_length" in meta:
            out["head_dim"] = int(meta[f"{arch}.attention.key_length"])
        if f"{arch}.rope.scaling.type" in meta:
            raise ConvertError(f"{arch}.rope.scaling.type cannot be exported for {arch}")
        if moe:
            out |= {"num_experts": int(meta[f"{arch}.expert_count"]), "norm_topk_prob": True,
                    "decoder_sparse_step": 1, "mlp_only_layers": []}
        return out
    return fn


SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(gguf_arch="qwen3", hf_architectures=("Qwen3ForCausalLM",), hf_model_type="qwen3",
             tensor_map=DENSE_MAP, hparams=HPARAMS, required_tensors=DENSE_TENSORS, ignore=IGNORE,
             extra_kv=_extra_kv("qwen3", False), export_config=_export("qwen3", False)),
    ArchSpec(gguf_arch="qwen3moe", hf_architectures=("Qwen3MoeForCausalLM",), hf_model_type="qwen3_moe",
             tensor_map=MOE_MAP, hparams=MOE_HPARAMS, required_tensors=MOE_TENSORS, ignore=IGNORE,
             extra_kv=_extra_kv("qwen3moe", True), export_config=_export("qwen3moe", True)),
)
