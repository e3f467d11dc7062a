"""Phi-3 (HF Phi3ForCausalLM -> GGUF "phi3"), as llama.cpp's convert_hf_to_gguf (Phi3MiniModel) writes it.

- qkv_proj and gate_up_proj stay fused: attn_qkv and ffn_up (gate rows first); no Q/K permutation (NEOX).
- rope.dimension_count = int(partial_rotary_factor * hidden_size) // heads; rope.scaling.original_context_length
  from original_max_position_embeddings; attention.sliding_window (0 when none; llama.cpp ignores it).
- LongRoPE (rope_scaling type "longrope" or "su"): long_factor / short_factor as the F32 tensors
  rope_factors_long / rope_factors_short, and rope.scaling.attn_factor =
  sqrt(1 + ln(scale) / ln(original context)) with scale = max_position_embeddings / original (1 when <= 1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from qf.convert.arch.llama import IGNORE, ROPE_THETA_DEFAULT, rope_params, rope_theta
from qf.convert.archspec import KV, ArchSpec, HParam, shortest_f32
from qf.convert.json_fields import Fields
from qf.format.errors import ConvertError
from qf.format.values import GGUFValueType as V

ARCH = "phi3"
TENSOR_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.qkv_proj.weight": "blk.{bid}.attn_qkv.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}
REQUIRED_TENSORS = ("token_embd.weight", "output_norm.weight", "blk.{bid}.attn_norm.weight",
                    "blk.{bid}.attn_qkv.weight", "blk.{bid}.attn_output.weight", "blk.{bid}.ffn_norm.weight",
                    "blk.{bid}.ffn_up.weight", "blk.{bid}.ffn_down.weight")
HPARAMS = (
    HParam("context_length", ("max_position_embeddings", "n_positions"), V.UINT32),
    HParam("rope.scaling.original_context_length", ("original_max_position_embeddings",), V.UINT32,
           default=lambda got: got["context_length"]),
    HParam("embedding_length", ("hidden_size",), V.UINT32),
    HParam("feed_forward_length", ("intermediate_size",), V.UINT32),
    HParam("block_count", ("num_hidden_layers",), V.UINT32),
    HParam("attention.head_count", ("num_attention_heads",), V.UINT32),
    HParam("attention.head_count_kv", ("num_key_value_heads",), V.UINT32,
           default=lambda got: got["attention.head_count"]),
    HParam("attention.layer_norm_rms_epsilon", ("rms_norm_eps",), V.FLOAT32),
    HParam("vocab_size", ("vocab_size",), V.UINT32),
)
LONGROPE_TYPES = ("longrope", "su")
FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}


def rope_dims(cfg: dict[str, Any], path: Path) -> int:
    """Rotated dimensions per head: int(partial_rotary_factor * hidden_size) // num_attention_heads."""
    f = Fields(cfg, path)
    rot = f.number("partial_rotary_factor", 1.0, lo=0, lo_open=True)
    return int(rot * f.int("hidden_size", lo=1)) // f.int("num_attention_heads", lo=1)


def _longrope(cfg: dict[str, Any], path: Path) -> Fields | None:
    """The rope settings when they are LongRoPE, None when there is no scaling; other kinds are refused."""
    rp = rope_params(cfg, path)
    kind = (rp.str("rope_type", None) or rp.str("type", None) or "default").lower()
    if kind == "default":
        return None
    if kind not in LONGROPE_TYPES:
        raise ConvertError(f"{path}: rope scaling {kind!r} is not supported for phi3 (supported: default, "
                           f"{', '.join(LONGROPE_TYPES)})")
    return rp


def attn_factor(cfg: dict[str, Any], path: Path) -> float:
    """LongRoPE's attention factor, as llama.cpp computes it."""
    f = Fields(cfg, path)
    ctx = f.int("max_position_embeddings", lo=1)
    orig = f.int("original_max_position_embeddings", ctx, lo=1)
    scale = ctx / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def extra_kv(cfg: dict[str, Any], path: Path) -> list[KV]:
    """RoPE base, dimensions, LongRoPE attention factor, sliding window."""
    out: list[KV] = [(f"{ARCH}.rope.dimension_count", rope_dims(cfg, path), V.UINT32),
                     (f"{ARCH}.rope.freq_base", rope_theta(cfg, path), V.FLOAT32),
                     (f"{ARCH}.attention.sliding_window", Fields(cfg, path).int("sliding_window", 0, lo=0), V.UINT32)]
    if _longrope(cfg, path) is not None:
        out.append((f"{ARCH}.rope.scaling.attn_factor", attn_factor(cfg, path), V.FLOAT32))
    return out


def extra_tensors(cfg: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    """rope_factors_long / rope_factors_short (f32 [rope dims / 2]) for LongRoPE."""
    rp = _longrope(cfg, path)
    if rp is None:
        return {}
    half = rope_dims(cfg, path) // 2
    out = {}
    for key, name in FACTORS.items():
        values = rp.list(key)
        if len(values) != half or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConvertError(f"{path}: rope_scaling.{key} must hold {half} numbers (rope dims / 2), got "
                               f"{len(values)}")
        out[name] = np.asarray(values, dtype=np.float32)
    return out


def export_config(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """config.json entries beyond the hyperparameter table."""
    hidden, heads = int(meta[f"{ARCH}.embedding_length"]), int(meta[f"{ARCH}.attention.head_count"])
    dims = int(meta.get(f"{ARCH}.rope.dimension_count", hidden // heads))
    return {"hidden_act": "silu", "rope_theta": shortest_f32(meta.get(f"{ARCH}.rope.freq_base", ROPE_THETA_DEFAULT)),
            "partial_rotary_factor": dims * heads / hidden, "sliding_window": int(meta.get(
                f"{ARCH}.attention.sliding_window", 0)) or None, "rope_scaling": None,
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}  # HF's Phi3 default (32000) may not fit


def export_generated(meta: dict[str, Any], values: dict[str, np.ndarray]) -> dict[str, Any]:
    """LongRoPE factors back into rope_scaling."""
    if not values:
        return {}
    factors = {key: [shortest_f32(v) for v in values[name].reshape(-1)] for key, name in FACTORS.items()}
    return {"rope_scaling": {"rope_type": "longrope", **factors}}


SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(gguf_arch=ARCH, hf_architectures=("Phi3ForCausalLM",), hf_model_type="phi3", tensor_map=TENSOR_MAP,
             hparams=HPARAMS, required_tensors=REQUIRED_TENSORS, ignore=IGNORE, extra_kv=extra_kv,
             extra_tensors=extra_tensors, export_config=export_config, generated=tuple(FACTORS.values()),
             export_generated=export_generated),
)
