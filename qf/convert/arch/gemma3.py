"""Gemma 3 text models (HF Gemma3ForCausalLM -> GGUF arch "gemma3"), as llama.cpp's convert_hf_to_gguf writes them.

- Norm weights: HF's Gemma3RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w (its `norm_shift`), so the
  runtime and llama.cpp use every norm as a plain multiplier: `value_shift` declares the +1, the pipeline
  adds it on conversion and the exporter subtracts it again.
- No Q/K permutation: Gemma keeps HF's rotate-half layout (NEOX RoPE).
- Keys: llama.cpp's set (key/value_length, sliding_window, rope.freq_base of the global layers, linear rope
  scaling, final_logit_softcapping), plus rope.freq_base_swa and attention.sliding_window_pattern only when
  they differ from what llama.cpp assumes (10000 and a period of 6).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from qf.convert.archspec import KV, ArchSpec, HParam, shortest_f32, tensor_suffix
from qf.convert.json_fields import Fields, short
from qf.format.errors import ConvertError
from qf.format.values import GGUFValueType as V

ARCH = "gemma3"

# Norms: HF name template -> GGUF name template; stored as 1 + w.
NORM_MAP: dict[str, str] = {
    "model.norm.weight": "output_norm.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    "model.layers.{bid}.pre_feedforward_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.post_feedforward_layernorm.weight": "blk.{bid}.post_ffw_norm.weight",
}
NORM_SHIFT = 1.0

# HF name -> GGUF name (gguf-py tensor_mapping.py); lm_head is dropped when tied, as the pipeline does.
TENSOR_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    **NORM_MAP,
}

REQUIRED_TENSORS = (
    "token_embd.weight",
    "blk.{bid}.attn_q.weight", "blk.{bid}.attn_k.weight", "blk.{bid}.attn_v.weight",
    "blk.{bid}.attn_output.weight", "blk.{bid}.ffn_gate.weight", "blk.{bid}.ffn_up.weight",
    "blk.{bid}.ffn_down.weight",
)


IGNORE = (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",)

# GGUF key suffix <- config.json key(s), with the defaults llama.cpp's converter uses for Gemma 3.
HPARAMS = (
    HParam("context_length", ("max_position_embeddings",), V.UINT32, default=131072),
    HParam("embedding_length", ("hidden_size",), V.UINT32),
    HParam("feed_forward_length", ("intermediate_size",), V.UINT32),
    HParam("block_count", ("num_hidden_layers",), V.UINT32),
    HParam("attention.head_count", ("num_attention_heads",), V.UINT32, default=8),
    HParam("attention.head_count_kv", ("num_key_value_heads",), V.UINT32, default=4),
    HParam("attention.layer_norm_rms_epsilon", ("rms_norm_eps",), V.FLOAT32, default=1e-6),
    HParam("attention.key_length", ("head_dim",), V.UINT32, default=256),
    HParam("attention.value_length", ("head_dim",), V.UINT32, default=256),
)

# What llama.cpp assumes for gemma3 when the file says nothing (llama-model.cpp, LLM_ARCH_GEMMA3).
SWA_PERIOD = 6
ROPE_BASE_SWA = 10000.0
ROPE_THETA_DEFAULT = 1_000_000.0
WIDE_QUERY_LAYERS = 62  # the 27B: llama.cpp scales queries by 1/sqrt(n_embd / n_head)
GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_tanh")
LAYER_TYPES = {"sliding_attention": True, "full_attention": False}


def _fail(path: Path, msg: str) -> ConvertError:
    """A ConvertError naming config.json."""
    return ConvertError(f"{path}: {msg}")


def _rope(cfg: dict[str, Any], kind: str, path: Path) -> Fields:
    """RoPE settings of one layer kind ("full_attention" | "sliding_attention") in either config format:
    transformers 5 `rope_parameters` per layer type, or 4's rope_theta / rope_local_base_freq / rope_scaling."""
    f = Fields(cfg, path)
    rp = f.obj_fields("rope_parameters")
    if rp.has(kind):
        return rp.obj_fields(kind)
    if kind == "sliding_attention":
        theta = f.number("rope_local_base_freq", ROPE_BASE_SWA, finite=False)
        return Fields({"rope_type": "default", "rope_theta": theta}, path, "rope_local_base_freq.")
    out = dict(f.obj_fields("rope_scaling").obj)
    out.setdefault("rope_type", out.get("type", "default"))
    out["rope_theta"] = f.number("rope_theta", rp.number("rope_theta", ROPE_THETA_DEFAULT, finite=False),
                                 finite=False)
    return Fields(out, path, "rope_scaling.")


def sliding_flags(cfg: dict[str, Any], path: Path) -> list[bool]:
    """Per layer: sliding window or not, from layer_types, else from the (_)sliding_window_pattern period.

    num_hidden_layers has been checked against the block_count limit before this runs (the pipeline)."""
    f = Fields(cfg, path)
    n = f.int("num_hidden_layers", lo=1)
    if f.has("layer_types"):
        types = f.list("layer_types")
        if len(types) != n or any(not isinstance(t, str) or t not in LAYER_TYPES for t in types):
            raise _fail(path, f"'layer_types' must list {n} of {sorted(LAYER_TYPES)}, got {short(types)}")
        return [LAYER_TYPES[t] for t in types]
    key = "sliding_window_pattern" if f.has("sliding_window_pattern") else "_sliding_window_pattern"
    period = f.int(key, SWA_PERIOD, lo=1)
    return [i % period < period - 1 for i in range(n)]


def _period_of(flags: list[bool]) -> int | None:
    """The period N with flags[i] == (i % N < N - 1) for every layer, or None when there is none."""
    n = len(flags)
    for p in range(1, n + 2):
        if all(f == (i % p < p - 1) for i, f in enumerate(flags)):
            return p
    return None


def _swa_kv(cfg: dict[str, Any], path: Path) -> list[KV]:
    """attention.sliding_window (+ the pattern when it is not llama.cpp's period of 6)."""
    flags = sliding_flags(cfg, path)
    if not any(flags):
        return []
    window = Fields(cfg, path).int("sliding_window", lo=1)
    out: list[KV] = [(f"{ARCH}.attention.sliding_window", window, V.UINT32)]
    period = _period_of(flags)
    if period is None:
        raise _fail(path, f"layer_types {flags} follow no 'N-1 sliding, 1 full' period, which GGUF cannot express")
    if period != SWA_PERIOD:
        out.append((f"{ARCH}.attention.sliding_window_pattern", period, V.UINT32))
    return out


def _rope_kind(rp: Fields) -> str:
    """rope_type of one layer kind's settings ("default" when absent)."""
    return rp.str("rope_type", None) or "default"


def _rope_kv(cfg: dict[str, Any], path: Path) -> list[KV]:
    """rope.freq_base (global layers), linear scaling of the global layers, rope.freq_base_swa if not 10000."""
    full, local = _rope(cfg, "full_attention", path), _rope(cfg, "sliding_attention", path)
    out: list[KV] = [(f"{ARCH}.rope.freq_base", full.number("rope_theta", ROPE_THETA_DEFAULT, finite=False),
                      V.FLOAT32)]
    kind = _rope_kind(full)
    if kind == "linear":
        out += [(f"{ARCH}.rope.scaling.type", "linear", V.STRING),
                (f"{ARCH}.rope.scaling.factor", full.number("factor", finite=False), V.FLOAT32)]
    elif kind != "default":
        raise _fail(path, f"rope scaling {kind!r} of the global layers is not supported (supported: default, linear)")
    if _rope_kind(local) != "default":
        raise _fail(path, "rope scaling of the sliding-window layers is not supported (llama.cpp applies none)")
    local_theta = local.number("rope_theta", ROPE_BASE_SWA, finite=False)
    if local_theta != ROPE_BASE_SWA:
        out.append((f"{ARCH}.rope.freq_base_swa", local_theta, V.FLOAT32))
    return out


def _check_model(cfg: dict[str, Any], path: Path) -> None:
    """What the GGUF cannot express: another activation, attention soft-capping, a free query scale."""
    f = Fields(cfg, path)
    act = f.str("hidden_activation", None) or f.str("hidden_act", None) or GELU_TANH_NAMES[0]
    if act not in GELU_TANH_NAMES:
        raise _fail(path, f"hidden_activation {act!r} is not supported (gemma3 uses {GELU_TANH_NAMES[0]})")
    if f.has("attn_logit_softcapping"):
        raise _fail(path, "attn_logit_softcapping is not supported by gemma3 GGUF files")
    heads, kv = f.int("num_attention_heads", 8, lo=1), f.int("num_key_value_heads", 4, lo=1)
    hidden, hd = f.int("hidden_size", lo=1), f.int("head_dim", 256, lo=1)
    if heads % kv or hd % 2:
        raise _fail(path, f"{kv} kv heads must divide {heads} heads, and head_dim {hd} must be even")
    want = hidden / heads if f.int("num_hidden_layers", lo=1) == WIDE_QUERY_LAYERS else hd
    qpas = f.number("query_pre_attn_scalar", want)
    if not math.isclose(qpas, float(want)):
        raise _fail(path, f"query_pre_attn_scalar {qpas} differs from the {want} llama.cpp derives for gemma3")


def extra_kv(cfg: dict[str, Any], path: Path) -> list[KV]:
    """Keys beyond the hyperparameter table: RoPE bases and scaling, sliding window, final soft-capping."""
    _check_model(cfg, path)
    out = _rope_kv(cfg, path) + _swa_kv(cfg, path)
    cap = Fields(cfg, path).number("final_logit_softcapping", None, finite=False)
    if cap:
        out.append((f"{ARCH}.final_logit_softcapping", cap, V.FLOAT32))
    return out


def export_config(meta: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """config.json entries beyond the hyperparameter table (transformers 4 style, read by 4 and 5)."""
    n_layers = int(meta[f"{ARCH}.block_count"])
    hidden, heads = int(meta[f"{ARCH}.embedding_length"]), int(meta[f"{ARCH}.attention.head_count"])
    hd = int(meta.get(f"{ARCH}.attention.key_length", 256))
    window = int(meta.get(f"{ARCH}.attention.sliding_window", 0))
    period = int(meta.get(f"{ARCH}.attention.sliding_window_pattern", SWA_PERIOD))
    if isinstance(meta.get(f"{ARCH}.attention.sliding_window_pattern"), (list, np.ndarray)):
        raise ConvertError(f"{ARCH}.attention.sliding_window_pattern as per-layer flags cannot be exported")
    flags = [window > 0 and i % period < period - 1 for i in range(n_layers)]
    cfg: dict[str, Any] = {
        "hidden_activation": GELU_TANH_NAMES[0],
        "head_dim": hd,
        "query_pre_attn_scalar": hidden // heads if n_layers == WIDE_QUERY_LAYERS else hd,
        "rope_theta": shortest_f32(meta.get(f"{ARCH}.rope.freq_base", ROPE_THETA_DEFAULT)),
        "rope_local_base_freq": shortest_f32(meta.get(f"{ARCH}.rope.freq_base_swa", ROPE_BASE_SWA)),
        "rope_scaling": None,
        "sliding_window": window or None,
        "layer_types": ["sliding_attention" if f else "full_attention" for f in flags],
        "attn_logit_softcapping": None,
        "final_logit_softcapping": (shortest_f32(meta[f"{ARCH}.final_logit_softcapping"])
                                    if f"{ARCH}.final_logit_softcapping" in meta else None),
        "attention_bias": False,
    }
    kind = meta.get(f"{ARCH}.rope.scaling.type")
    if kind == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": shortest_f32(meta[f"{ARCH}.rope.scaling.factor"])}
    elif kind not in (None, "none"):
        raise ConvertError(f"{ARCH}.rope.scaling.type {kind!r} cannot be exported (supported: linear)")
    return cfg



SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(
        gguf_arch=ARCH, hf_architectures=("Gemma3ForCausalLM",), hf_model_type="gemma3_text",
        tensor_map=TENSOR_MAP, hparams=HPARAMS, required_tensors=REQUIRED_TENSORS, permute={}, ignore=IGNORE,
        extra_kv=extra_kv, export_config=export_config,
        value_shift={tensor_suffix(t): NORM_SHIFT for t in NORM_MAP.values()},
    ),
)
