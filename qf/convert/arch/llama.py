"""Llama family (Llama 2/3, SmolLM, TinyLlama, Mistral, Mixtral, Qwen2): name maps and hyperparameters as data.

Mixtral converts to the llama GGUF arch with experts, as llama.cpp does: llama.expert_count /
expert_used_count, the router as ffn_gate_inp and each layer's experts stacked into ffn_{gate,up,down}_exps
(w1 = gate, w3 = up, w2 = down); Q/K permuted as llama's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from qf.convert.archspec import KV, ArchSpec, HParam, shortest_f32
from qf.convert.json_fields import Fields
from qf.format.errors import ConvertError
from qf.format.values import GGUFValueType as V

# HF name -> GGUF name (gguf-py tensor_mapping.py); absent entries (biases, lm_head when tied) are skipped.
TENSOR_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.self_attn.o_proj.bias": "blk.{bid}.attn_output.bias",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}

REQUIRED_TENSORS = (
    "token_embd.weight", "output_norm.weight",
    "blk.{bid}.attn_norm.weight", "blk.{bid}.attn_q.weight", "blk.{bid}.attn_k.weight",
    "blk.{bid}.attn_v.weight", "blk.{bid}.attn_output.weight", "blk.{bid}.ffn_norm.weight",
    "blk.{bid}.ffn_gate.weight", "blk.{bid}.ffn_up.weight", "blk.{bid}.ffn_down.weight",
)

IGNORE = (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",)

# GGUF key suffix <- config.json key(s); ints are u32, floats f32 (as convert_hf_to_gguf writes them).
HPARAMS = (
    HParam("context_length", ("max_position_embeddings",), V.UINT32),
    HParam("embedding_length", ("hidden_size",), V.UINT32),
    HParam("feed_forward_length", ("intermediate_size",), V.UINT32),
    HParam("block_count", ("num_hidden_layers",), V.UINT32),
    HParam("attention.head_count", ("num_attention_heads",), V.UINT32),
    HParam("attention.head_count_kv", ("num_key_value_heads",), V.UINT32,
           default=lambda got: got["attention.head_count"]),
    HParam("attention.layer_norm_rms_epsilon", ("rms_norm_eps",), V.FLOAT32),
    HParam("vocab_size", ("vocab_size",), V.UINT32),
)

# Q and K rows are reordered for GGML's interleaved RoPE; value = GGUF key holding the head count.
LLAMA_PERMUTE = {
    "attn_q.weight": "attention.head_count", "attn_q.bias": "attention.head_count",
    "attn_k.weight": "attention.head_count_kv", "attn_k.bias": "attention.head_count_kv",
}

ROPE_THETA_DEFAULT = 10000.0
LLAMA3_ROPE_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")  # what the runtime implements (yarn: not yet)
ROPE_KEYS = ("rope_parameters", "rope_scaling")  # transformers 5, transformers 4


def head_dim(cfg: dict[str, Any], path: Path) -> int:
    """Per-head size: config head_dim, else hidden_size / num_attention_heads (which must divide)."""
    f = Fields(cfg, path)
    if f.has("head_dim"):
        hd = f.int("head_dim", lo=1)
        if hd % 2:
            raise f.error("head_dim", hd, "a positive even integer")
        return hd
    hidden, heads = f.int("hidden_size", lo=1), f.int("num_attention_heads", lo=1)
    if hidden % heads:
        raise ConvertError(f"{path}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return hidden // heads


def rope_params(cfg: dict[str, Any], path: Path) -> Fields:
    """RoPE settings from `rope_scaling` (transformers 4) and/or `rope_parameters` (transformers 5), merged."""
    f = Fields(cfg, path)
    parts = [f.obj_fields(key) for key in ROPE_KEYS]
    merged = {k: v for p in parts for k, v in p.obj.items()}
    prefix = next((f"{key}." for key, p in zip(ROPE_KEYS, parts) if p.obj), "rope_scaling.")
    return Fields(merged, path, prefix)


def rope_type(cfg: dict[str, Any], path: Path) -> str:
    """The RoPE scaling kind, checked against what the runtime implements."""
    rp = rope_params(cfg, path)
    kind = rp.str("rope_type", None) or rp.str("type", None) or "default"
    if kind.lower() not in SUPPORTED_ROPE_TYPES:
        raise ConvertError(f"{path}: unsupported rope scaling type {kind!r}; "
                           f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return kind.lower()


def rope_theta(cfg: dict[str, Any], path: Path) -> float:
    """rope_theta (top level, else inside the rope parameters); its range is the shared validator's to judge."""
    f = Fields(cfg, path)
    if f.has("rope_theta"):
        return f.number("rope_theta", finite=False)
    return rope_params(cfg, path).number("rope_theta", ROPE_THETA_DEFAULT, finite=False)


def _rope_kv(arch: str, cfg: dict[str, Any], path: Path) -> list[KV]:
    """rope.freq_base, rope.dimension_count and the linear scaling keys."""
    out: list[KV] = [(f"{arch}.rope.freq_base", rope_theta(cfg, path), V.FLOAT32),
                     (f"{arch}.rope.dimension_count", head_dim(cfg, path), V.UINT32)]
    if rope_type(cfg, path) == "linear":
        out += [(f"{arch}.rope.scaling.type", "linear", V.STRING),
                (f"{arch}.rope.scaling.factor", rope_params(cfg, path).number("factor", finite=False), V.FLOAT32)]
    return out


def extra_kv(arch: str):
    """KV beyond the plain hyperparameter table for one GGUF arch: RoPE and explicit head sizes."""
    def fn(cfg: dict[str, Any], path: Path) -> list[KV]:
        out = _rope_kv(arch, cfg, path)
        if Fields(cfg, path).has("head_dim"):
            hd = head_dim(cfg, path)
            out += [(f"{arch}.attention.key_length", hd, V.UINT32), (f"{arch}.attention.value_length", hd, V.UINT32)]
        return out
    return fn


def _llama3_params(cfg: dict[str, Any], path: Path) -> tuple[float, float, float, float, float]:
    """(base, factor, low_freq_factor, high_freq_factor, original context) with llama.cpp's defaults, checked:
    every one finite and > 0, high_freq_factor > low_freq_factor (the formula divides by both and their gap)."""
    rp = rope_params(cfg, path)
    d = LLAMA3_ROPE_DEFAULTS
    base = rp.number("rope_theta", ROPE_THETA_DEFAULT, lo=0, lo_open=True)
    if Fields(cfg, path).has("rope_theta"):
        base = Fields(cfg, path).number("rope_theta", lo=0, lo_open=True)
    factor = rp.number("factor", d["factor"], lo=0, lo_open=True)
    lo = rp.number("low_freq_factor", d["low_freq_factor"], lo=0, lo_open=True)
    hi = rp.number("high_freq_factor", d["high_freq_factor"], lo=lo, lo_open=True)
    old_ctx = rp.int("original_max_position_embeddings", d["original_max_position_embeddings"], lo=1)
    return base, factor, lo, hi, float(old_ctx)


def llama3_rope_factors(cfg: dict[str, Any], path: Path) -> np.ndarray:
    """rope_freqs.weight f32 [head_dim / 2]: per-frequency divisors, by convert_hf_to_gguf's formula.

    Computed in float64 and rounded once; llama.cpp's float32 torch arithmetic lands within a few ulp.
    """
    base, factor, lo, hi, old_ctx = _llama3_params(cfg, path)
    dim = head_dim(cfg, path)  # bounded: the pipeline has checked rope.dimension_count against its limit
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)  # 2 pi / freq
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)  # [head_dim / 2]


def _extra_tensors(cfg: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    """rope_freqs.weight for llama3 RoPE scaling; nothing otherwise."""
    if rope_type(cfg, path) == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(cfg, path)}
    return {}


def _export_config(arch: str, base: dict[str, Any], present: dict[str, str]):
    """config.json entries beyond the hyperparameter table; `present` sets a key when a tensor suffix exists."""
    def fn(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
        out = dict(base)
        out |= {key: any(n.endswith(suffix) for n in names) for key, suffix in present.items()}
        out["rope_theta"] = shortest_f32(meta.get(f"{arch}.rope.freq_base", ROPE_THETA_DEFAULT))
        kind = meta.get(f"{arch}.rope.scaling.type")
        if kind in ("linear", "yarn"):
            out["rope_scaling"] = {"rope_type": kind, "factor": shortest_f32(meta[f"{arch}.rope.scaling.factor"])}
            if f"{arch}.rope.scaling.original_context_length" in meta:
                out["rope_scaling"]["original_max_position_embeddings"] = int(
                    meta[f"{arch}.rope.scaling.original_context_length"])
        if f"{arch}.attention.key_length" in meta:
            out["head_dim"] = int(meta[f"{arch}.attention.key_length"])
        if "rope_freqs.weight" in names:
            raise ConvertError("rope_freqs.weight (llama3 RoPE scaling) cannot be turned back into a "
                               "config.json rope_scaling entry")
        return out
    return fn


def _spec(gguf_arch: str, hf_archs: tuple[str, ...], model_type: str, permute: dict[str, str],
          extra_tensors, export_base: dict[str, Any], present: dict[str, str]) -> ArchSpec:
    """One member of the family: the shared tables with its own name, permutation rule and export extras."""
    return ArchSpec(
        gguf_arch=gguf_arch, hf_architectures=hf_archs, hf_model_type=model_type, tensor_map=TENSOR_MAP,
        hparams=HPARAMS, required_tensors=REQUIRED_TENSORS, permute=permute, ignore=IGNORE,
        extra_kv=extra_kv(gguf_arch), extra_tensors=extra_tensors,
        export_config=_export_config(gguf_arch, export_base, present),
    )


def _no_tensors(cfg: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    """No generated tensors."""
    return {}


MIXTRAL_MAP: dict[str, str] = {
    **{k: v for k, v in TENSOR_MAP.items() if ".mlp." not in k and "_proj.bias" not in k},
    "model.layers.{bid}.block_sparse_moe.gate.weight": "blk.{bid}.ffn_gate_inp.weight",
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w1.weight": "blk.{bid}.ffn_gate_exps.weight",
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w3.weight": "blk.{bid}.ffn_up_exps.weight",
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w2.weight": "blk.{bid}.ffn_down_exps.weight",
}
MOE_TENSORS = ("blk.{bid}.ffn_gate_inp.weight", "blk.{bid}.ffn_gate_exps.weight", "blk.{bid}.ffn_up_exps.weight",
               "blk.{bid}.ffn_down_exps.weight")
MIXTRAL_REQUIRED = tuple(t for t in REQUIRED_TENSORS if ".ffn_" not in t or "ffn_norm" in t) + MOE_TENSORS
EXPERT_HPARAMS = (
    HParam("expert_count", ("num_local_experts", "num_experts"), V.UINT32),
    HParam("expert_used_count", ("num_experts_per_tok",), V.UINT32),
)


def _mixtral_export(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """Mixtral's config entries: the llama ones, and the expert counts under Mixtral's names."""
    out = _export_config("llama", {"hidden_act": "silu", "router_jitter_noise": 0.0}, {})(meta, names)
    return out | {"num_local_experts": int(meta["llama.expert_count"]),
                  "num_experts_per_tok": int(meta["llama.expert_used_count"])}


# Mistral converts to the llama GGUF arch (as llama.cpp does); Qwen2 keeps HF's rotate-half layout (NEOX RoPE)
# and always has q/k/v biases.
SPECS: tuple[ArchSpec, ...] = (
    _spec("llama", ("LlamaForCausalLM", "MistralForCausalLM"), "llama", LLAMA_PERMUTE, _extra_tensors,
          {"hidden_act": "silu", "mlp_bias": False}, {"attention_bias": "attn_q.bias"}),
    _spec("qwen2", ("Qwen2ForCausalLM",), "qwen2", {}, _no_tensors,
          {"hidden_act": "silu", "use_sliding_window": False}, {}),
    ArchSpec(gguf_arch="llama", hf_architectures=("MixtralForCausalLM",), hf_model_type="mixtral",
             tensor_map=MIXTRAL_MAP, hparams=HPARAMS + EXPERT_HPARAMS, required_tensors=MIXTRAL_REQUIRED,
             permute=LLAMA_PERMUTE, ignore=IGNORE, extra_kv=extra_kv("llama"), extra_tensors=_extra_tensors,
             export_config=_mixtral_export),
)
