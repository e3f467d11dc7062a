"""Residual-stream rotation of a llama-family checkpoint: the same function, with weights on no quantization grid.

An orthogonal Q applied to the residual stream leaves a pre-norm transformer's logits unchanged once each
RMSNorm weight is folded into the linear layers that read it, because RMSNorm(x Q) = RMSNorm(x) Q (QuaRot,
Ashkboos et al. 2024, section 4). With x' = x Q (row vectors, HF weights W[out, in], y = x W^T):

    embed'          = embed Q                         [V, H]
    reader W'       = W diag(norm) Q                  q/k/v, gate/up  [out, H]   (the norm weight becomes 1)
    writer W'       = Q^T W                           o_proj, down_proj [H, in]
    lm_head'        = lm_head diag(final_norm) Q      [V, H]   (untied: embed' has no final norm folded in)

Why: the only SmolLM2 weights offline were dequantized from Q4_1, so every block sits on a 4-bit grid that
re-quantization hits exactly (Q4_1 reproduces it, Q5_1's grid beats against it). A KL divergence table on
that reference measures aliasing with the grid, not the quantizers. The rotated checkpoint computes the same
logits (tests/test_rotate.py) with weights on no grid, so it makes a fair reference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from qf.convert.checkpoint import Checkpoint
from qf.convert.folder_io import atomic_folder, write_json
from qf.convert.safetensors_io import SafetensorsWriter
from qf.format.errors import ConvertError

# Pre-norm architectures whose norms are plain RMSNorm right before the readers (Gemma's post-norms are not).
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
COPIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
          "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt")
WEIGHTS_NAME = "model.safetensors"


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """Haar-random orthogonal [n, n] float64 matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    g = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


def check_architecture(cfg: dict, model_dir: Path) -> None:
    """Refuse architectures the rotation does not preserve."""
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ConvertError(f"{model_dir}: cannot rotate {arch}; supported: {', '.join(SUPPORTED)}")


def _layer_norm(layer: str, proj: str) -> str | None:
    """Name of the norm weight folded into a reader projection, or None for writers and others."""
    for norm, readers in READERS.items():
        if proj in readers:
            return f"model.layers.{layer}.{norm}.weight"
    return None


def _lm_head(ck: Checkpoint, head: str, p: np.ndarray, final: np.ndarray, scale: float) -> np.ndarray:
    """lm_head' = scale * lm_head diag(final_norm) P, from lm_head or (tied) the original embedding; [V, H']."""
    return scale * ((ck.to_f32(head).astype(np.float64) * final[None, :]) @ p)


def _transformed(ck: Checkpoint, name: str, p: np.ndarray, final: np.ndarray, scale: float) -> np.ndarray:
    """The value of one tensor of the original checkpoint with the residual stream mapped by p: [H, H'] (orthonormal
    rows) and the readers scaled by `scale` (sqrt(H / H'), 1 for a rotation), float64."""
    if name == "model.embed_tokens.weight":
        return ck.to_f32(name).astype(np.float64) @ p
    if name == "model.norm.weight":
        return np.ones(p.shape[1])
    m = LAYER.match(name)
    if m is None:
        raise ConvertError(f"{ck.dir}: cannot transform unknown tensor {name!r}")
    layer, part, kind = m.groups()
    w = ck.to_f32(name).astype(np.float64)
    if part in READERS:  # [H] norm weight, folded into its readers
        return np.ones(p.shape[1])
    if kind == "bias":  # a reader's bias lives in its output space (unchanged); a writer's joins the residual
        return p.T @ w if part in WRITERS else w  # b' = b P as a row vector
    norm = _layer_norm(layer, part)
    if norm is not None:
        return scale * ((w * ck.to_f32(norm).astype(np.float64)[None, :]) @ p)
    if part in WRITERS:
        return p.T @ w
    raise ConvertError(f"{ck.dir}: cannot transform unknown tensor {name!r}")


def transform_residual(src: str | os.PathLike, dst: str | os.PathLike, p: np.ndarray, config: dict,
                       overwrite: bool = False) -> Path:
    """Write dst: src with its residual stream x mapped to x P (p: [H, H'] with orthonormal rows), norm weights
    folded into their readers (scaled by sqrt(H / H'), the ratio of the two RMS), float32, untied; `config`
    entries replace src's config.json ones."""
    src = Path(src)
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    check_architecture(cfg, src)
    h = int(cfg["hidden_size"])
    if p.shape[0] != h or p.shape[1] < h:
        raise ConvertError(f"{src}: residual map of shape {p.shape} for hidden size {h}")
    scale = float(np.sqrt(h / p.shape[1]))
    ck = Checkpoint(src)
    try:
        names = [n for n in ck.names() if n != "lm_head.weight"]
        final = ck.to_f32("model.norm.weight").astype(np.float64)  # [H]
        head = "lm_head.weight" if "lm_head.weight" in ck else "model.embed_tokens.weight"
        entries = [(n, "F32", _shape(ck, n, p.shape[1])) for n in names]
        entries.append(("lm_head.weight", "F32", (int(ck.entry(head).shape[0]), p.shape[1])))
        with atomic_folder(dst, overwrite) as tmp:
            with SafetensorsWriter(tmp / WEIGHTS_NAME, entries, metadata={"format": "pt"}) as w:
                for n in names:
                    w.write(n, _transformed(ck, n, p, final, scale).astype(np.float32))
                    ck.release(n)
                w.write("lm_head.weight", _lm_head(ck, head, p, final, scale).astype(np.float32))
            write_json(tmp / "config.json", {**cfg, "tie_word_embeddings": False, "torch_dtype": "float32", **config})
            for f in COPIED:
                if (src / f).is_file():
                    shutil.copy(src / f, tmp / f)
    finally:
        ck.close()
    return Path(dst)


def _shape(ck: Checkpoint, name: str, width: int) -> tuple[int, ...]:
    """Shape of a tensor once the residual stream is `width` wide (its residual axis resized)."""
    shape = tuple(int(d) for d in ck.entry(name).shape)
    if name == "model.embed_tokens.weight":
        return (shape[0], width)
    m = LAYER.match(name)
    part, kind = (m.group(2), m.group(3)) if m else ("", "")
    if name == "model.norm.weight" or part in READERS:
        return (width,)
    if part in WRITERS:
        return (width,) if kind == "bias" else (width, shape[1])
    if kind == "weight" and _layer_norm(m.group(1), part) is not None:
        return (shape[0], width)
    return shape


def rotate_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, seed: int = 0,
                      overwrite: bool = False) -> Path:
    """Write dst: src with its residual stream rotated by a seeded random orthogonal matrix (float32, untied)."""
    cfg = json.loads((Path(src) / "config.json").read_text(encoding="utf-8"))
    check_architecture(cfg, Path(src))
    q = random_orthogonal(int(cfg["hidden_size"]), seed)  # [H, H]
    return transform_residual(src, dst, q, {}, overwrite)
