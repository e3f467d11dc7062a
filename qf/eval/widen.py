"""Widening of a llama-family residual stream (e.g. SmolLM2's 576 to 768): the same function, 256-aligned rows.

SmolLM2's 576-wide rows are not a multiple of 256, so the 256-block types (K and IQ) fall back to 32-block ones
on every matrix that reads the residual stream, and a quality table on it says little about them. With P the first
H rows of a random orthogonal [H', H'] matrix (orthonormal rows: zero-pad, then rotate), the widened stream is
x' = x P, and ||x'|| = ||x||. RMSNorm over H' values sees mean(x'^2) = (H / H') mean(x^2), so with the epsilon
scaled by H / H' too, RMSNorm'(x') = sqrt(H' / H) RMSNorm(x) P: the readers take the norm gains and the factor
sqrt(H / H') (qf.eval.rotate.transform_residual does the folding), the writers and the embedding take P.
The head dimension and the FFN width stay (config gets head_dim explicitly); only hidden_size changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from qf.eval.rotate import check_architecture, random_orthogonal, transform_residual
from qf.format.errors import ConvertError

EPS_KEYS = ("rms_norm_eps",)


def widening_map(h: int, width: int, seed: int) -> np.ndarray:
    """[h, width] float64 with orthonormal rows: h rows of a seeded Haar-random orthogonal [width, width]."""
    if width < h:
        raise ConvertError(f"cannot widen a residual stream of {h} to {width}")
    return random_orthogonal(width, seed)[:h]


def widen_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, width: int = 768, seed: int = 0,
                     overwrite: bool = False) -> Path:
    """Write dst: src computing the same function with a residual stream `width` wide (float32, untied)."""
    cfg = json.loads((Path(src) / "config.json").read_text(encoding="utf-8"))
    check_architecture(cfg, Path(src))
    h = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or h // int(cfg["num_attention_heads"]))
    changes: dict = {"hidden_size": width, "head_dim": head_dim}
    for k in EPS_KEYS:
        if k in cfg:
            changes[k] = float(cfg[k]) * h / width
    return transform_residual(src, dst, widening_map(h, width, seed), changes, overwrite)
