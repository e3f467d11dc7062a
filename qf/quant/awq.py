"""AWQ (activation-aware weight quantization, Lin et al. 2023), the algorithm alone: numpy, no checkpoint or runtime.

For linears sharing one input x [T, n_in] whose producer can absorb a per-channel division (a norm's weight, or
the rows of the previous linear), find s [n_in] minimizing || x W^T - (x / s) Q(W s)^T ||^2 over the group's
linears, with s = mean|x|^a / mean_w^(1-a) (`duo`, AutoAWQ's default; mean_w: |W| normalized by each quantization
group's max, averaged over output rows) or s = mean|x|^a, over a grid of a in [0, 1], s normalized by
sqrt(max s * min s); s = 1 (plain round to nearest) is always a candidate, so the search never loses to RTN on
its own objective. Then, optionally (AutoAWQ's auto_clip), each (row, group) of a linear gets the clamp
max|w| * (1 - k / 20), k < 10, minimizing the group's partial output error.

Both errors are computed from H = X^T X (any positive multiple: the seam's 2/T X^T X) over every calibration row,
never from the rows themselves: || X D^T ||^2 = tr(D H D^T) for D = Q(W s)/s - W, and a (row, group)'s partial
output error is d^T H_gg d with H_gg the group's diagonal block. AutoAWQ evaluates the same objectives on a token
sample (the attention block's output for q/k/v); here one product with H per candidate covers all of them.

The quantization grid is qf.quant.grids.IntGrid's (fp16 scales; symmetric 2^(b-1) zero, or asymmetric over
[min(w, 0), max(w, 0)]), restated vectorized in `fake_quant` and checked equal to it in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_GRID = 20  # alpha in {0, 1/20, ..., 1}
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5  # AutoAWQ's auto_clip: max|w| * (1 - k / 20), k = 0..9
F16_TINY = np.float32(2.0 ** -24)
F16_MAX = np.float32(65504.0)


@dataclass(frozen=True)
class Grid:
    """b-bit integer groups (group <= 0: one group per row), symmetric or asymmetric."""

    bits: int
    group: int
    sym: bool

    def width(self, n_in: int) -> int:
        """Inputs per group."""
        return n_in if self.group <= 0 else self.group


def _f16_scale(s: np.ndarray) -> np.ndarray:
    """Positive scales rounded to fp16 values (zero or non-finite replaced as IntGrid does), f32."""
    s16 = np.asarray(s, np.float32).astype(np.float16).astype(np.float32)
    return np.where(np.isfinite(s16) & (s16 > 0), s16, np.where(np.isfinite(s16), F16_TINY, F16_MAX))


def fake_quant(w: np.ndarray, grid: Grid) -> np.ndarray:
    """Round w f32 [rows, n_in] to nearest on the grid and back (IntGrid's parameters), f32 [rows, n_in]."""
    rows, n_in = w.shape
    g = grid.width(n_in)
    x = w.reshape(rows, n_in // g, g)
    maxq = (1 << grid.bits) - 1
    if grid.sym:
        s = _f16_scale(2.0 * np.abs(x).max(axis=2) / maxq)
        z = np.float32(1 << (grid.bits - 1))
    else:
        lo, hi = np.minimum(x.min(axis=2), 0.0), np.maximum(x.max(axis=2), 0.0)
        s = _f16_scale((hi - lo) / maxq)
        z = np.clip(np.rint(-lo / s), 0, maxq)[..., None]
    s = s[..., None]
    q = np.clip(np.rint(x / s) + z, 0, maxq)
    return (s * (q - z)).astype(np.float32).reshape(rows, n_in)


def weight_mean(ws: list[np.ndarray], grid: Grid) -> np.ndarray:
    """AutoAWQ's w_mean: |W| over each quantization group's max, averaged over every output row, f32 [n_in]."""
    w = np.concatenate(ws, axis=0)
    rows, n_in = w.shape
    g = grid.width(n_in)
    a = np.abs(w).reshape(rows, n_in // g, g)
    a = a / np.maximum(a.max(axis=2, keepdims=True), np.float32(1e-30))
    return a.reshape(rows, n_in).mean(axis=0).astype(np.float32)


def candidate_scales(x_mean: np.ndarray, w_mean: np.ndarray | None, alpha: float) -> np.ndarray:
    """s = x_mean^a (/ w_mean^(1-a) with duo), clipped at 1e-4, normalized by sqrt(max * min), f32 [n_in]."""
    x_mean = np.maximum(np.asarray(x_mean, np.float64), 1e-4)
    s = x_mean ** alpha
    if w_mean is not None:
        s = s / np.maximum(np.asarray(w_mean, np.float64), 1e-4) ** (1.0 - alpha)
    s = np.maximum(s, 1e-4)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def _error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """tr(D H D^T), D = wq - w (f32 [n_out, n_in], h [n_in, n_in])."""
    d = wq - w
    return float(np.einsum("ij,ij->", d @ h, d, dtype=np.float64))


def group_loss(h: np.ndarray, ws: list[np.ndarray], s: np.ndarray, grid: Grid) -> float:
    """|| x W^T - (x / s) Q(W s)^T ||^2 summed over the group's linears, as tr(D H D^T) with H ~ X^T X."""
    return sum(_error(w, fake_quant(w * s, grid) / s, h) for w in ws)


def relative_error(h: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
    """|| X (wq - w)^T ||^2 / || X w^T ||^2 from H (the measure GPTQ reports, so the summaries compare)."""
    return float(_error(w, wq, h) / max(_error(np.zeros_like(w), w, h), 1e-30))


@dataclass
class ScaleResult:
    """The chosen scales, the alpha that gave them (None: s = 1), and the loss of RTN vs the chosen scales."""

    scales: np.ndarray  # f32 [n_in]
    alpha: float | None
    loss_rtn: float
    loss: float


def search_scales(h: np.ndarray, x_mean: np.ndarray, ws: list[np.ndarray], grid: Grid, duo: bool = True,
                  n_grid: int = N_GRID) -> ScaleResult:
    """The best s over alpha in {0, 1/n_grid, ..., 1} (and s = 1) for linears ws [n_out_i, n_in] sharing one input
    (h: its X^T X up to a positive factor, [n_in, n_in]; x_mean: mean |x| per channel)."""
    h = np.asarray(h, np.float32)
    one = np.ones(h.shape[0], np.float32)
    best = ScaleResult(one, None, 0.0, group_loss(h, ws, one, grid))
    best.loss_rtn = best.loss
    w_mean = weight_mean(ws, grid) if duo else None
    for k in range(n_grid + 1):
        s = candidate_scales(x_mean, w_mean, k / n_grid)
        loss = group_loss(h, ws, s, grid)
        if loss < best.loss:
            best.scales, best.alpha, best.loss = s, k / n_grid, loss
    return best


def clip_weight(w: np.ndarray, h: np.ndarray, grid: Grid, n_grid: int = CLIP_GRID,
                max_shrink: float = CLIP_MAX_SHRINK) -> np.ndarray:
    """w with each (row, group) clamped to +-max|w| * (1 - k / n_grid) for the k (< max_shrink * n_grid) whose
    quantized group gives the least partial-output error d^T H_gg d; f32 [n_out, n_in]."""
    n_out, n_in = w.shape
    g = grid.width(n_in)
    n_g = n_in // g
    hb = np.asarray(h, np.float32).reshape(n_g, g, n_g, g)[np.arange(n_g), :, np.arange(n_g), :]  # hb: [G, g, g]
    wb = w.reshape(n_out, n_g, g)
    amax = np.abs(wb).max(axis=2, keepdims=True)
    best_err = np.full((n_out, n_g), np.inf)
    best = wb.copy()
    for k in range(int(max_shrink * n_grid)):
        m = amax * (1.0 - k / n_grid)
        c = np.clip(wb, -m, m)
        d = fake_quant(c.reshape(n_out, n_in), grid).reshape(c.shape) - wb  # d: [rows, G, g]
        err = np.einsum("rgk,gkl,rgl->rg", d, hb, d, optimize=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better[..., None], c, best)
    return best.reshape(n_out, n_in).astype(np.float32)
