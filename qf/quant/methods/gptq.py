"""GPTQ as a calibrated method: integer groups (`GPTQ-W4G64`, ...: the `int` payload, or Q4_0 / Q8_0 when that
holds it exactly), GPTQ over a ggml mix's own types (`--type Q4_K_M --method gptq`), and round-to-nearest on the
same integer grids (`RTN-W4G64`, ...: the baseline, no calibration)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qf.format.errors import QFError
from qf.format.ggml_types import GGMLType
from qf.quant.formats.intgroup import IntParams
from qf.quant.formats.transcode import encode_rows, rule_for
from qf.quant.methods.base import CalibLayer, InputGroup, LinearInfo, LinearPlan, LinearTarget, TypeSpec

DEFAULT_DAMP = 0.01  # qf.quant.gptq.DEFAULT_DAMP (the algorithm and its scipy import load on first use)
BITS = (2, 4, 8)
GROUPS = (32, 64, 128, -1)
SHRINK = 21  # GPTQ's integer groups: ranges 1, 0.99, ..., 0.80 of min/max searched (rotated SmolLM2 W4G64,
# 16 x 512: PPL 35.63 -> 33.95 on 3 chunks, 88.7% -> 92.6% of RTN's gap; about 10% more CPU time)
ACT_ORDERS = ("none", "static", "g_idx")  # act-order off; on with groups fitted before the loop; on with g_idx
WORD = 32


@dataclass(frozen=True)
class GPTQParams:
    """Integer grid (bits, group, sym) or the mix's ggml types (ggml=True); GPTQ's options; rtn: no feedback."""

    bits: int = 4
    group: int = 64
    sym: bool = True
    ggml: bool = False
    rtn: bool = False
    act_order: str = "none"
    damp: float = DEFAULT_DAMP
    keep_payload: bool = False
    shrink: int = SHRINK  # GPTQ's integer grids: range search over 1, 0.99, ... (qf.quant.grids.IntGrid); 0: min/max


def _name(prefix: str, bits: int, group: int, sym: bool) -> str:
    """GPTQ-W4G64, GPTQ-W4G64-ASYM, GPTQ-W8CH (one group per output channel)."""
    g = "CH" if group <= 0 else f"G{group}"
    return f"{prefix}-W{bits}{g}" + ("" if sym else "-ASYM")


def _specs() -> tuple[TypeSpec, ...]:
    """Every GPTQ and RTN integer --type."""
    out = []
    for prefix, is_rtn in (("GPTQ", False), ("RTN", True)):
        for bits in BITS:
            for group in GROUPS:
                for sym in (True, False):
                    what = f"{bits}-bit {'symmetric' if sym else 'asymmetric'}, " + (
                        "one scale per output row" if group <= 0 else f"groups of {group} inputs")
                    out.append(TypeSpec(_name(prefix, bits, group, sym), "gptq",
                                        GPTQParams(bits, group, sym, rtn=is_rtn), calibrated=not is_rtn,
                                        help=("round to nearest, " if is_rtn else "GPTQ, ") + what))
    return tuple(out)


def _scheme(p: GPTQParams, g_idx: bool) -> str:
    """The `int` payload scheme string."""
    return f"int;bits={p.bits};group={p.group};sym={int(p.sym)};g_idx={int(g_idx)}"


def _members(p: GPTQParams, n_in: int, n_out: int, g_idx: bool) -> tuple[tuple[str, tuple[int, ...], GGMLType], ...]:
    """(suffix, ne, storage type) of each member of the payload."""
    groups = IntParams(p.bits, p.group, p.sym, g_idx).n_groups(n_in)
    out = [("weight_packed", (n_in * p.bits // WORD, n_out), GGMLType.I32),
           ("weight_scale", (groups, n_out), GGMLType.F16)]
    if not p.sym:
        out.append(("weight_zero", (groups, n_out), GGMLType.I16))
    if g_idx:
        out.append(("weight_g_idx", (n_in,), GGMLType.I32))
    return tuple(out)


def _check_shape(spec: TypeSpec, info: LinearInfo) -> None:
    """The integer grid fits this linear's rows, else QFError saying why."""
    p: GPTQParams = spec.params
    if p.group > 0 and info.n_in % p.group:
        raise QFError(f"--type {spec.name}: {info.name} has {info.n_in} inputs, not a whole number of groups of "
                      f"{p.group} ({info.n_in} = {info.n_in / p.group:g} x {p.group}); take a group that divides "
                      f"{info.n_in} (e.g. {next((g for g in (128, 64, 32) if info.n_in % g == 0), 'CH')})")
    if info.n_in * p.bits % WORD:
        raise QFError(f"--type {spec.name}: {info.name} has {info.n_in} inputs; {p.bits}-bit codes of a row must "
                      "fill whole int32 words")


class GPTQMethod:
    """Registry entry `gptq` (qf.quant.methods.base.Method)."""

    name = "gptq"

    def type_specs(self) -> tuple[TypeSpec, ...]:
        """GPTQ-W{2,4,8}{G32,G64,G128,CH}[-ASYM] and the same names with RTN."""
        return _specs()

    def over_mix(self, mix: str) -> TypeSpec | None:
        """Any ggml mix: GPTQ with each linear's planned type as the grid (where GPTQ has one)."""
        return TypeSpec(mix, self.name, GPTQParams(ggml=True), calibrated=True,
                        help=f"GPTQ over {mix}'s ggml types", rest=mix)

    def plan(self, spec: TypeSpec, linears: list[LinearInfo]) -> LinearPlan:
        """ggml: the mix's types. Integer grids: Q4_0 / Q8_0 when every linear is symmetric 4/8-bit with groups
        of whole 32-value blocks and no g_idx (exact: fp16 scales), else the `int` payload."""
        p: GPTQParams = spec.params
        if p.ggml:
            return LinearPlan({i.name: LinearTarget(ggml=i.planned) for i in linears},
                              [f"{spec.name} --method gptq: {len(linears)} linears quantized with GPTQ error feedback "
                               "on their ggml types"])
        for info in linears:
            _check_shape(spec, info)
        g_idx = p.act_order == "g_idx"
        rules = [rule_for(_scheme(p, g_idx), i.n_in) for i in linears]
        why = next((w or f"{r.target.name} would not be exact: {r.grid}" for r, w in rules
                    if r is None or not r.exact), "")
        if p.keep_payload:
            why = "--keep-payload"
        if not why:
            target = rules[0][0].target
            return LinearPlan({i.name: LinearTarget(ggml=target) for i in linears},
                              [f"{spec.name}: {len(linears)} linears -> {target.name} (exact: {rules[0][0].grid}, "
                               "fp16 scales)"])
        targets = {i.name: LinearTarget(scheme=_scheme(p, g_idx), members=_members(p, i.n_in, i.n_out, g_idx))
                   for i in linears}
        return LinearPlan(targets, [f"{spec.name}: {len(linears)} linears kept as payload {_scheme(p, g_idx)} "
                                    f"({why or 'an asymmetric grid'})"])

    def quantize_layer(self, spec: TypeSpec, layer: CalibLayer) -> np.ndarray | None:
        """GPTQ (or RTN) of every linear, group by group as the forward reaches them (true-sequential)."""
        p: GPTQParams = spec.params
        if p.rtn:
            for role in layer.linears:
                self._int(layer, role, p, None)
            return None

        def hook(group: InputGroup) -> None:
            todo = [r for r in group.roles if r in layer.linears]
            if not todo:
                return
            from qf.quant.gptq import factor
            f = factor(group.hessian(), p.damp, act_order=p.act_order != "none" and not p.ggml, overwrite=True,
                       inputs=group.x)  # once per input; H itself becomes the factorization's scratch
            for role in todo:
                (self._ggml if p.ggml else self._int)(layer, role, p, f)

        return layer.run(hook)

    @staticmethod
    def _int(layer: CalibLayer, role: str, p: GPTQParams, h: Any) -> None:
        """One linear on an integer grid; emitted as its payload or the ggml type that holds it exactly."""
        from qf.quant.gptq import gptq, rtn
        from qf.quant.grids import IntGrid
        w = layer.weight(role)
        grid = IntGrid(w.shape[0], w.shape[1], p.bits, p.group, p.sym, shrink=0 if h is None else p.shrink)
        if h is None:
            q = rtn(w, grid)
        else:  # h: the input's qf.quant.gptq.Factor (damping and act-order fixed there)
            r = gptq(w, h, grid, static_groups=p.act_order == "static")
            q = r.q
            layer.report(role, r.relative)
        layer.set_weight(role, q)
        target = layer.targets[role]
        arrays = grid.payload(with_g_idx=p.act_order == "g_idx")
        if target.ggml is None:
            layer.emit(role, arrays)
            return
        scheme = _scheme(p, False)
        rule, why = rule_for(scheme, w.shape[1])
        if rule is None or rule.target != target.ggml:
            raise QFError(f"{layer.linears[role].name}: cannot be written as {target.ggml.name}: {why}")
        layer.emit(role, encode_rows(rule, scheme, arrays, w.shape[1]))

    @staticmethod
    def _ggml(layer: CalibLayer, role: str, p: GPTQParams, f: Any) -> None:
        """One linear on its planned ggml type: GPTQ with the type's blocks as the grid where GPTQ has one,
        else the type's own quantizer (importance = diag(H))."""
        from qf.quant.codecs import get_codec
        from qf.quant.gptq import gptq
        from qf.quant.grids import CODE_RANGE, GgmlGrid
        w = layer.weight(role)
        qtype = layer.targets[role].ggml
        codec = get_codec(qtype)
        if qtype in CODE_RANGE and w.shape[1] % codec.block_size == 0:
            grid = GgmlGrid(qtype, w.shape[0], w.shape[1])
            r = gptq(w, f, grid)
            stored = grid.tensor()
            layer.report(role, r.relative)
        else:
            stored = codec.quantize(w, f.hdiag.copy())
        layer.set_weight(role, codec.dequantize(stored).reshape(w.shape))
        layer.emit(role, stored)


METHOD = GPTQMethod()
