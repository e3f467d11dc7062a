"""FP8 e4m3 round-to-nearest with tensor, channel or block scales, as compressed-tensors / llm-compressor do it.

compressed-tensors 0.20 (quantization/utils/helpers.calculate_qparams, lifecycle/forward_helpers._quantize,
quant_args.round_to_quantized_type_args), for a symmetric float8 weight:
  amax = max(|min(w, 0)|, max(w, 0)) over the scale's unit (tensor, output row, or bh x bw block, partial blocks
  padded with zeros), scale = amax / 448 (448 = (q_max - q_min) / 2), computed in the weight's dtype; a zero
  scale becomes that dtype's eps; then code = e4m3fn(clamp(w / scale, -448, 448)), the cast rounding to nearest
  with ties to even (e4m3fn saturates at 448: no infinities; NaN stays NaN, S.1111.111).
A static input scale is amax(|x|) / 448 over the calibration rows (a per-tensor activation scale).
"""

from __future__ import annotations

import numpy as np

from qf.quant.formats.fp8 import E4M3, Fp8Params

FP8_MAX = np.float32(448.0)
F32_EPS = np.float32(np.finfo(np.float32).eps)
POSITIVE = E4M3[:0x7F].astype(np.float64)  # codes 0x00..0x7E: every finite non-negative value, increasing
NAN_CODE = 0x7F


def e4m3_codes(x: np.ndarray) -> np.ndarray:
    """f32 values -> e4m3fn bit patterns u8 (round to nearest, ties to even code; |x| > 448 saturates to 448)."""
    x = np.asarray(x, np.float32)
    a = np.minimum(np.abs(x).astype(np.float64), FP8_MAX)
    hi = np.searchsorted(POSITIVE, a, side="left").clip(0, POSITIVE.size - 1)  # first value >= a
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a - POSITIVE[lo], POSITIVE[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code = np.where(np.signbit(x), code | np.uint8(0x80), code)
    return np.where(np.isnan(x), np.where(np.signbit(x), np.uint8(0xFF), np.uint8(NAN_CODE)), code).astype(np.uint8)


def _unit_amax(w: np.ndarray, p: Fp8Params) -> np.ndarray:
    """amax over each scale unit (zero included), f32 in the scale's numpy shape."""
    n_out, n_in = w.shape
    if p.strategy == "tensor":
        return np.array([max(float(np.max(np.maximum(w, 0), initial=0.0)), float(-np.min(np.minimum(w, 0),
                                                                                       initial=0.0)))], np.float32)
    if p.strategy == "channel":
        return np.maximum(np.maximum(w, 0).max(axis=1), -np.minimum(w, 0).min(axis=1)).reshape(n_out, 1)
    bh, bw = p.block_h, p.block_w
    rb, cb = -(-n_out // bh), -(-n_in // bw)
    padded = np.zeros((rb * bh, cb * bw), np.float32)
    padded[:n_out, :n_in] = w
    blocks = np.abs(padded.reshape(rb, bh, cb, bw))
    return blocks.max(axis=(1, 3)).astype(np.float32)


def fp8_scales(w: np.ndarray, p: Fp8Params) -> np.ndarray:
    """amax / 448 per unit (a zero scale becomes f32 eps), f32: tensor (1,), channel (n_out, 1), block (rb, cb)."""
    s = (_unit_amax(np.asarray(w, np.float32), p) / FP8_MAX).astype(np.float32)
    return np.where(s == 0, F32_EPS, s).astype(np.float32)


def _expand(s: np.ndarray, p: Fp8Params, n_out: int, n_in: int) -> np.ndarray:
    """Scales broadcast to [n_out, n_in]."""
    bh, bw = p.block(n_in, n_out)
    grid = s.reshape(-(-n_out // bh), -(-n_in // bw))
    return np.repeat(np.repeat(grid, bh, axis=0)[:n_out], bw, axis=1)[:, :n_in]


def quantize_fp8(w: np.ndarray, p: Fp8Params) -> tuple[np.ndarray, np.ndarray]:
    """w f32 [n_out, n_in] -> (e4m3 codes u8 [n_out, n_in], scales f32 in their numpy shape)."""
    w = np.asarray(w, np.float32)
    s = fp8_scales(w, p)
    scaled = np.clip(w / _expand(s, p, *w.shape), -FP8_MAX, FP8_MAX)
    return e4m3_codes(scaled), s


def dequantize_fp8(codes: np.ndarray, scale: np.ndarray, p: Fp8Params) -> np.ndarray:
    """codes u8 [n_out, n_in] and scales -> f32 [n_out, n_in]."""
    return (E4M3[codes] * _expand(np.asarray(scale, np.float32), p, *codes.shape)).astype(np.float32)


def static_input_scale(max_abs: np.ndarray) -> np.ndarray:
    """A per-tensor activation scale from per-channel max |x| over the calibration rows: f32 (1,)."""
    amax = np.float32(np.max(max_abs, initial=0.0))
    return np.array([amax / FP8_MAX if amax > 0 else F32_EPS], np.float32)
