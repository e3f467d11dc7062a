"""AWQ as a calibrated method: `AWQ-W4G64` (asymmetric, as AWQ is), `AWQ-W4G64-SYM`, ... (qf.quant.awq).

Per block: one f32 run collects each input group's H = 2/T X^T X and mean |x| per channel; then, for
each scale group of SCALE_GROUPS (data: the producer that absorbs 1/s and the linears reading its output), the
scale search, the fold (producer / s, linears * s), the optional clip search, and round to nearest on the same
integer grid as GPTQ/RTN (qf.quant.methods.gptq emits it: the `int` payload, or Q4_0/Q8_0 where exact). The block
is then run with the quantized weights and folded norms; that output feeds the next block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qf.format.errors import QFError
from qf.quant.methods.base import INPUT_GROUPS, CalibLayer, InputGroup, LinearInfo, LinearPlan, TypeSpec
from qf.quant.methods.gptq import GPTQMethod, GPTQParams

BITS = (4, 8)
GROUPS = (32, 64, 128)
CLIP_SKIP = ("wq", "wk")  # AutoAWQ does not clip q/k (RoPE spreads their error)


@dataclass(frozen=True)
class ScaleGroup:
    """Linears reading one input whose producer absorbs 1/s: a norm's weight, or a linear's rows (and bias)."""

    prev: str
    linears: tuple[str, ...]
    prev_bias: str | None = None


# The groups of a decoder block (qf.format.tensor_roles), in forward order; mlx-lm's quant/awq.py and AutoAWQ use
# the same four. A group whose producer or linears a layer lacks, or whose shapes do not chain (v -> o under
# grouped-query attention: v has fewer rows than o has inputs), is skipped and said so.
SCALE_GROUPS: tuple[ScaleGroup, ...] = (
    ScaleGroup("attn_norm", ("wq", "wk", "wv")),
    ScaleGroup("wv", ("wo",), "bv"),
    ScaleGroup("ffn_norm", ("w_gate", "w_up")),
    ScaleGroup("w_up", ("w_down",), "b_up"),
)


@dataclass(frozen=True)
class AwqParams:
    """Integer grid, AutoAWQ's options (duo scaling, clip search), alpha grid size, --keep-payload."""

    bits: int = 4
    group: int = 64
    sym: bool = False
    duo: bool = True
    clip: bool = True
    n_grid: int = 20
    keep_payload: bool = False

    def rounding(self) -> GPTQParams:
        """The round-to-nearest parameters on the same grid (plan and emission are GPTQ/RTN's)."""
        return GPTQParams(self.bits, self.group, self.sym, rtn=True, keep_payload=self.keep_payload)


def _specs() -> tuple[TypeSpec, ...]:
    """AWQ-W{4,8}G{32,64,128} (asymmetric) and -SYM."""
    out = []
    for bits in BITS:
        for group in GROUPS:
            for sym in (False, True):
                out.append(TypeSpec(f"AWQ-W{bits}G{group}" + ("-SYM" if sym else ""), "awq",
                                    AwqParams(bits, group, sym), calibrated=True,
                                    help=f"AWQ, {bits}-bit {'symmetric' if sym else 'asymmetric'}, groups of {group}"))
    return tuple(out)


def _group_of(role: str) -> int:
    """Index of the INPUT_GROUPS entry holding role."""
    return next(i for i, g in enumerate(INPUT_GROUPS) if role in g)


class _Collector:
    """Hook of the f32 run: per input group, H = 2/T X^T X (f32) and mean |x| per channel."""

    def __init__(self) -> None:
        self.h: dict[int, np.ndarray] = {}
        self.mean: dict[int, np.ndarray] = {}

    def __call__(self, group: InputGroup) -> None:
        g = _group_of(group.roles[0]) if group.roles else None
        if g is not None:
            self.h[g] = group.hessian().astype(np.float32)  # h: [n_in, n_in]
            self.mean[g] = group.channel_stats()["mean_abs"]


def _applies(sg: ScaleGroup, layer: CalibLayer) -> str:
    """Why a scale group does not apply to this layer ('' when it does)."""
    roles = set(layer.roles())
    missing = [r for r in (sg.prev, *sg.linears) if r not in roles]
    if missing:
        return f"no {', '.join(missing)}"
    if any(r not in layer.linears for r in sg.linears):
        return "its linears are not calibrated"
    n_in = layer.weight(sg.linears[0]).shape[1]
    produced = layer.weight(sg.prev).shape[0]
    if produced != n_in:
        return f"{sg.prev} gives {produced} channels, {sg.linears[0]} reads {n_in} (grouped-query attention)"
    return ""


class AwqMethod:
    """Registry entry `awq` (qf.quant.methods.base.Method)."""

    name = "awq"

    def type_specs(self) -> tuple[TypeSpec, ...]:
        """AWQ-W{4,8}G{32,64,128}[-SYM]."""
        return _specs()

    def over_mix(self, mix: str) -> TypeSpec | None:
        """Not over ggml mixes."""
        return None

    def plan(self, spec: TypeSpec, linears: list[LinearInfo]) -> LinearPlan:
        """As RTN on the same grid: Q4_0/Q8_0 where that is exact for every linear (symmetric), else the payload."""
        p: AwqParams = spec.params
        return GPTQMethod().plan(replace(spec, params=p.rounding()), linears)

    def quantize_layer(self, spec: TypeSpec, layer: CalibLayer) -> np.ndarray:
        """Collect, search and fold scales, clip, round; the block's output with its quantized weights."""
        from qf.quant.awq import Grid, clip_weight, relative_error, search_scales

        p: AwqParams = spec.params
        if layer.n_rows == 0:
            raise QFError(f"--type {spec.name} calibrates: give --calib FILE")
        col = _Collector()
        layer.run(col)
        grid = Grid(p.bits, p.group, p.sym)
        hs: dict[str, np.ndarray] = {}  # role -> H of its input as the scaled weights see it (x / s)
        for sg in SCALE_GROUPS:
            g = _group_of(sg.linears[0])
            if _applies(sg, layer) or g not in col.h:
                continue
            res = search_scales(col.h[g], col.mean[g], [layer.weight(r) for r in sg.linears], grid, p.duo,
                                p.n_grid)
            self._fold(layer, sg, res.scales)
            for r in sg.linears:
                hs[r] = col.h[g] / np.outer(res.scales, res.scales)
        for role in layer.linears:
            h = hs.get(role, col.h.get(_group_of(role)))
            w = layer.weight(role).copy()
            if p.clip and role not in CLIP_SKIP and h is not None:
                layer.set_weight(role, clip_weight(w, h, grid))
            GPTQMethod._int(layer, role, p.rounding(), None)  # RTN on the grid, set and emitted
            if h is not None:
                layer.report(role, relative_error(h, w, layer.weight(role)))
        return layer.run()

    @staticmethod
    def _fold(layer: CalibLayer, sg: ScaleGroup, s: np.ndarray) -> None:
        """Producer / s, readers * s: the same f32 function."""
        for r in sg.linears:
            layer.set_weight(r, layer.weight(r) * s)
        prev = layer.weight(sg.prev)
        layer.set_weight(sg.prev, prev / (s if prev.ndim == 1 else s[:, None]))
        if sg.prev_bias and sg.prev_bias in layer.roles():
            layer.set_weight(sg.prev_bias, layer.weight(sg.prev_bias) / s)


METHOD = AwqMethod()
