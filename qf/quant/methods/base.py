"""The calibrated-method seam: what a quantization method (GPTQ, AWQ, FP8, RTN baselines) declares, and the
per-layer view of the calibration data it works on (implemented by qf.calib, which sits above convert and
runtime; a method only sees these protocols). docs/calibration.md describes the contract.

Flow per conversion: `plan` decides, before anything is written, what every linear of the blocks becomes
(one ggml tensor of a type, or a payload scheme of qf.quant.formats). Then, layer by layer in file order,
`quantize_layer` gets a CalibLayer: it may run the layer's forward over the calibration rows (`run`), with a
hook called at each group of linears sharing an input (the inputs X, their Hessian), change the weights the
forward uses (`set_weight`; for a norm also what is written), and must `emit` the stored form of every linear
it was given. What its last `run` returned (the layer output with the weights set) feeds the next layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from qf.format.ggml_types import GGMLType

# Linear roles of a decoder block (qf.format.tensor_roles) grouped by the input they share, in forward order.
# Roles absent from a layer are skipped. Fused (phi3) and expert layers are not calibrated.
INPUT_GROUPS: tuple[tuple[str, ...], ...] = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))
LINEAR_ROLES: tuple[str, ...] = tuple(r for g in INPUT_GROUPS for r in g)


@dataclass(frozen=True)
class TypeSpec:
    """One `--type` name a method answers to: its parameters and whether it needs --calib."""

    name: str  # e.g. GPTQ-W4G64
    method: str  # registry key of the method (qf.quant.methods.METHODS)
    params: Any  # the method's own parameters
    calibrated: bool
    help: str = ""  # one line for `qconvert --help`
    rest: str = "F16"  # --type mix of every tensor the method does not quantize (embeddings, head, norms)


@dataclass(frozen=True)
class LinearInfo:
    """One linear of a block as planned: GGUF name, role, layer, shape, and the ggml type the mix chose."""

    name: str
    role: str
    layer: int
    n_in: int
    n_out: int
    planned: GGMLType


@dataclass(frozen=True)
class LinearTarget:
    """What a linear becomes in the file: one ggml tensor of `ggml`, or a payload with `scheme`; `members`
    gives each payload member's (ne, ggml storage type) by suffix."""

    ggml: GGMLType | None = None
    scheme: str | None = None
    members: tuple[tuple[str, tuple[int, ...], GGMLType], ...] = ()


@dataclass(frozen=True)
class LinearPlan:
    """The targets of every calibrated linear by GGUF name, and summary lines saying why."""

    targets: dict[str, LinearTarget]
    notes: list[str]


class InputGroup(Protocol):
    """Linears of one layer sharing one input, at the point the forward reaches them."""

    roles: tuple[str, ...]  # present roles of the group, in INPUT_GROUPS order
    x: np.ndarray  # f32 [T, n_in]: the calibration rows' input (upstream weights as set so far)

    def hessian(self) -> np.ndarray:
        """H = 2/T X^T X, f64 [n_in, n_in]: a new array per call, owned by the caller (factorized in place)."""

    def channel_stats(self) -> dict[str, np.ndarray]:
        """Per input channel f32 [n_in]: 'mean_abs', 'mean_sq', 'max_abs' (AWQ's statistics)."""


Hook = Callable[[InputGroup], None]


class CalibLayer(Protocol):
    """One decoder block during calibration (qf.calib.layer.Layer implements it)."""

    index: int
    linears: dict[str, LinearInfo]  # role -> the linear as planned (calibrated linears only)
    targets: dict[str, LinearTarget]  # role -> what it must be emitted as
    n_rows: int  # calibration rows T

    def weight(self, role: str) -> np.ndarray:
        """The weight the forward uses now: f32 [n_out, n_in] for a linear, [n] for a norm."""

    def roles(self) -> tuple[str, ...]:
        """Every role this layer has (linears, norms, biases)."""

    def set_weight(self, role: str, w: np.ndarray) -> None:
        """Use w from now on in this layer's forward; a changed norm or bias is also what the file stores."""

    def run(self, hook: Hook | None = None, inputs: np.ndarray | None = None) -> np.ndarray:
        """The block over the calibration rows (or `inputs` f32 [T, n_embd]) with the current weights; hook is
        called once per input group before its linears run (it may set their weights). Output f32 [T, n_embd]."""

    def emit(self, role: str, stored: np.ndarray | dict[str, np.ndarray]) -> None:
        """The stored form of a linear: u8 rows [n_out, row bytes] for a ggml target, member arrays (numpy
        layout) by suffix for a payload target."""

    def report(self, role: str, relative_error: float) -> None:
        """The method's error measure for a linear (shown in the per-layer summary)."""


class Method(Protocol):
    """A calibrated (or baseline) quantization method, registered in qf.quant.methods.METHOD_MODULES."""

    name: str  # registry key, also what `qconvert --method` takes for mixes (when over_mix is given)

    def type_specs(self) -> tuple[TypeSpec, ...]:
        """The --type names it answers to."""

    def over_mix(self, mix: str) -> TypeSpec | None:
        """`--type MIX --method NAME`: this method with the mix's per-tensor ggml types (None: not supported)."""

    def plan(self, spec: TypeSpec, linears: list[LinearInfo]) -> LinearPlan:
        """What every linear becomes; QFError saying why when the architecture cannot take the type."""

    def quantize_layer(self, spec: TypeSpec, layer: CalibLayer) -> np.ndarray:
        """Quantize and emit every linear of the layer; the layer's output to feed the next layer."""
