"""FP8 e4m3 as a method: `FP8-TENSOR`, `FP8-CHANNEL`, `FP8-BLOCK` (128x128 scales) round to nearest as
compressed-tensors does (qf.quant.fp8_quant), written as the `fp8` payload; the `-STATIC` variants also record a
static per-tensor input scale from the calibration rows (needs --calib; kept for export, not applied by the
runtime)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qf.format.ggml_types import GGMLType
from qf.quant.formats.fp8 import FP8, Fp8Params
from qf.quant.methods.base import CalibLayer, InputGroup, LinearInfo, LinearPlan, LinearTarget, TypeSpec

BLOCK = 128  # DeepSeek-V3 / llm-compressor FP8_BLOCK: 128 x 128 weight blocks
STRATEGIES = {"TENSOR": Fp8Params("tensor"), "CHANNEL": Fp8Params("channel"),
              "BLOCK": Fp8Params("block", BLOCK, BLOCK)}
HELP = {"TENSOR": "one scale per tensor", "CHANNEL": "one scale per output row",
        "BLOCK": f"one scale per {BLOCK}x{BLOCK} block"}


@dataclass(frozen=True)
class Fp8MethodParams:
    """The weight scale layout, and whether a static input scale is calibrated."""

    fp8: Fp8Params
    static_input: bool = False


def _specs() -> tuple[TypeSpec, ...]:
    """FP8-{TENSOR,CHANNEL,BLOCK}[-STATIC]."""
    out = []
    for key, p in STRATEGIES.items():
        out.append(TypeSpec(f"FP8-{key}", "fp8", Fp8MethodParams(p), calibrated=False,
                            help=f"FP8 e4m3 weights, round to nearest, {HELP[key]}"))
        out.append(TypeSpec(f"FP8-{key}-STATIC", "fp8", Fp8MethodParams(p, True), calibrated=True,
                            help=f"FP8 e4m3 weights ({HELP[key]}) and a static input scale from --calib"))
    return tuple(out)


def _members(p: Fp8MethodParams, info: LinearInfo) -> tuple[tuple[str, tuple[int, ...], GGMLType], ...]:
    """(suffix, ne, storage type) of the fp8 payload's members."""
    out = [("weight_fp8", (info.n_in, info.n_out), GGMLType.I8),
           ("weight_scale", p.fp8.scale_ne(info.n_in, info.n_out), GGMLType.F32)]
    return tuple(out + ([("input_scale", (1,), GGMLType.F32)] if p.static_input else []))


class Fp8Method:
    """Registry entry `fp8` (qf.quant.methods.base.Method)."""

    name = "fp8"

    def type_specs(self) -> tuple[TypeSpec, ...]:
        """FP8-TENSOR, FP8-CHANNEL, FP8-BLOCK and their -STATIC variants."""
        return _specs()

    def over_mix(self, mix: str) -> TypeSpec | None:
        """FP8 has no ggml grid to work over."""
        return None

    def plan(self, spec: TypeSpec, linears: list[LinearInfo]) -> LinearPlan:
        """Every linear becomes the fp8 payload."""
        p: Fp8MethodParams = spec.params
        scheme = FP8.scheme(p.fp8)
        targets = {i.name: LinearTarget(scheme=scheme, members=_members(p, i)) for i in linears}
        static = ", static input scales from calibration" if p.static_input else ""
        return LinearPlan(targets, [f"{spec.name}: {len(linears)} linears -> payload {scheme}{static}"])

    def quantize_layer(self, spec: TypeSpec, layer: CalibLayer) -> np.ndarray | None:
        """Round every linear to FP8; with static input scales, group by group as the forward reaches them."""
        p: Fp8MethodParams = spec.params
        if not p.static_input:
            for role in layer.linears:
                self._emit(layer, role, p, None)
            return None

        def hook(group: InputGroup) -> None:
            from qf.quant.fp8_quant import static_input_scale

            todo = [r for r in group.roles if r in layer.linears]
            if todo:
                scale = static_input_scale(group.channel_stats()["max_abs"])
                for role in todo:
                    self._emit(layer, role, p, scale)

        return layer.run(hook)

    @staticmethod
    def _emit(layer: CalibLayer, role: str, p: Fp8MethodParams, input_scale: np.ndarray | None) -> None:
        """Quantize one linear, use its FP8 weights from now on, emit its members."""
        from qf.quant.fp8_quant import dequantize_fp8, quantize_fp8

        w = layer.weight(role)
        codes, scale = quantize_fp8(w, p.fp8)
        q = dequantize_fp8(codes, scale, p.fp8)
        layer.set_weight(role, q)
        layer.report(role, float(np.linalg.norm(q - w) / max(np.linalg.norm(w), 1e-30)))
        stored = {"weight_fp8": codes.view(np.int8), "weight_scale": scale}
        if input_scale is not None:
            stored["input_scale"] = input_scale
        layer.emit(role, stored)


METHOD = Fp8Method()
