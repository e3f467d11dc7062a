"""Integer-group payloads rewritten as ggml block types when ggml has the same grid.

Q4_0 stores per 32 values d (f16) and 4-bit q: x = d * (q - 8); a symmetric 4-bit payload (zero 8) whose group
is a multiple of 32 (or one group per row of a multiple of 32) is the same weight exactly when every scale is a
finite fp16 value. Q8_0 (d f16, int8 q: x = d * q) is a symmetric 8-bit payload (q = code - 128) the same way.
Q4_1 (x = d * q + m, d and m f16) holds an asymmetric 4-bit payload only approximately: m = -scale * zero is
rounded to fp16, so it is a lossy rule. Rules are data (`RULES`); the first applicable one wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from qf.format.ggml_types import GGMLType
from qf.quant.formats.base import format_of, scales_f32
from qf.quant.formats.intgroup import IntParams, unpack_codes

QK = 32  # values per legacy ggml block
ROWS_PER_CHUNK_VALUES = 1 << 22  # codes unpacked at a time while encoding
Encoder = Callable[[IntParams, Mapping[str, np.ndarray], int], np.ndarray]  # (params, members, n_in) -> u8 rows


def _f16(x: np.ndarray) -> np.ndarray:
    """f16 bytes of values, [..., 2] uint8."""
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape, 2)


def _block_scales(p: IntParams, scale: np.ndarray, n_in: int) -> np.ndarray:
    """The scale of every 32-value block of each row, f32 [rows, n_in / 32]."""
    block_group = p.group_of(n_in, None)[::QK]
    return scales_f32(scale)[:, block_group]


def _codes(p: IntParams, packed: np.ndarray, n_in: int) -> np.ndarray:
    """Codes as uint8 [rows, n_in / 32, 32]."""
    return unpack_codes(packed, p.bits)[:, :n_in].reshape(packed.shape[0], n_in // QK, QK)


def _q4_0(p: IntParams, a: Mapping[str, np.ndarray], n_in: int) -> np.ndarray:
    """Q4_0 blocks: d = scale (fp16-exact), qs[j] = code[j] | code[j + 16] << 4."""
    c = _codes(p, a["weight_packed"], n_in)
    out = np.empty((c.shape[0], c.shape[1], 18), np.uint8)
    out[..., :2] = _f16(_block_scales(p, a["weight_scale"], n_in))
    out[..., 2:] = c[..., :16] | (c[..., 16:] << 4)
    return out.reshape(c.shape[0], -1)


def _q8_0(p: IntParams, a: Mapping[str, np.ndarray], n_in: int) -> np.ndarray:
    """Q8_0 blocks: d = scale (fp16-exact), q = code - 128 as int8."""
    c = _codes(p, a["weight_packed"], n_in)
    out = np.empty((c.shape[0], c.shape[1], 34), np.uint8)
    out[..., :2] = _f16(_block_scales(p, a["weight_scale"], n_in))
    out[..., 2:] = (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return out.reshape(c.shape[0], -1)


def _q4_1_dm(p: IntParams, a: Mapping[str, np.ndarray], n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block d = scale and m = -scale * zero, both rounded to fp16 (as f32)."""
    s = _block_scales(p, a["weight_scale"], n_in).astype(np.float64)
    z = a["weight_zero"][:, p.group_of(n_in, None)[::QK]].astype(np.float64)
    return s.astype(np.float16).astype(np.float32), (-s * z).astype(np.float16).astype(np.float32)


def _q4_1(p: IntParams, a: Mapping[str, np.ndarray], n_in: int) -> np.ndarray:
    """Q4_1 blocks: d, m (fp16), qs[j] = code[j] | code[j + 16] << 4."""
    c = _codes(p, a["weight_packed"], n_in)
    d, m = _q4_1_dm(p, a, n_in)
    out = np.empty((c.shape[0], c.shape[1], 20), np.uint8)
    out[..., :2], out[..., 2:4] = _f16(d), _f16(m)
    out[..., 4:] = c[..., :16] | (c[..., 16:] << 4)
    return out.reshape(c.shape[0], -1)


@dataclass(frozen=True)
class Rule:
    """A payload grid that a ggml block type holds: which payloads, the target, exact or lossy, the encoder."""

    target: GGMLType
    bits: int
    sym: bool
    exact: bool
    encode: Encoder
    grid: str  # the grid in words, for the conversion summary


RULES: tuple[Rule, ...] = (
    Rule(GGMLType.Q4_0, 4, True, True, _q4_0, "symmetric 4-bit, x = d * (q - 8)"),
    Rule(GGMLType.Q8_0, 8, True, True, _q8_0, "symmetric 8-bit, x = d * q"),
    Rule(GGMLType.Q4_1, 4, False, False, _q4_1, "asymmetric 4-bit, x = d * q + m with m rounded to fp16"),
)


def rule_for(scheme: str, n_in: int) -> tuple[Rule | None, str]:
    """The rule a payload can take (None and the reason when none applies)."""
    fmt, p = format_of(scheme)
    if fmt.name != "int":
        return None, f"ggml has no {fmt.name} grid"
    if p.g_idx:
        return None, "act-order (g_idx) groups are not contiguous 32-value blocks"
    if n_in % QK or (p.group > 0 and p.group % QK):
        return None, f"group {p.group} over {n_in} inputs is not made of 32-value blocks"
    rule = next((r for r in RULES if r.bits == p.bits and r.sym == p.sym), None)
    if rule is None:
        return None, f"ggml has no block type with a {'symmetric' if p.sym else 'asymmetric'} {p.bits}-bit grid"
    return rule, ""


def inexact_scales(scale: np.ndarray) -> int:
    """How many scales are not finite fp16 values (0: every one is exact in fp16)."""
    s = scales_f32(scale)
    h = s.astype(np.float16)
    return int(np.count_nonzero(~np.isfinite(h) | (h.astype(np.float32) != s)))


def worst_q4_1_error(scheme: str, arrays: Mapping[str, np.ndarray], n_in: int) -> tuple[float, float]:
    """Q4_1's worst |error| over the 4-bit grid: (absolute, in quantization steps), from scales and zeros."""
    _, p = format_of(scheme)
    s = _block_scales(p, arrays["weight_scale"], n_in).astype(np.float64)
    d, m = (v.astype(np.float64) for v in _q4_1_dm(p, arrays, n_in))
    z = arrays["weight_zero"][:, p.group_of(n_in, None)[::QK]].astype(np.float64)
    err = np.maximum(np.abs(m + s * z), np.abs((d - s) * 15 + m + s * z))  # linear in q: worst at q = 0 or 15
    steps = err / np.where(s == 0, 1.0, np.abs(s))
    return (float(err.max()), float(steps.max())) if err.size else (0.0, 0.0)


def encode_rows(rule: Rule, scheme: str, arrays: Mapping[str, np.ndarray], n_in: int) -> np.ndarray:
    """The weight as rows of the rule's ggml type, u8 [n_out, row bytes], a chunk of rows at a time."""
    _, p = format_of(scheme)
    n_out = arrays["weight_packed"].shape[0]
    step = max(1, ROWS_PER_CHUNK_VALUES // max(1, n_in))
    parts = [rule.encode(p, {k: v[r:r + step] for k, v in arrays.items()}, n_in) for r in range(0, n_out, step)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]
