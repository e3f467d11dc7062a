"""One decoder block during calibration: its weights in f32, the runtime's block code run over every calibration
row at once, linears computed from the current weights, and the method's hook called at each input group."""

from __future__ import annotations

from typing import Any

import numpy as np

from qf.format.errors import QFError
from qf.quant.gptq import hessian
from qf.quant.methods.base import INPUT_GROUPS, Hook, LinearInfo, LinearTarget
from qf.runtime.arch.blocks import Batch, PlacedLayer
from qf.runtime.backend import CpuKV
from qf.runtime.kv_cache import KVSpec

ROWS_PER_STAT = 8192  # rows per pass when reducing channel statistics
GROUP_OF = {r: i for i, g in enumerate(INPUT_GROUPS) for r in g}


class _Linear:
    """A placed linear: only its role; the capture backend looks its current weight up."""

    def __init__(self, role: str) -> None:
        self.role = role


class Group:
    """qf.quant.methods.base.InputGroup: the linears sharing one input x [T, n_in]."""

    def __init__(self, roles: tuple[str, ...], x: np.ndarray) -> None:
        self.roles, self.x = roles, x

    def hessian(self) -> np.ndarray:
        """2/T X^T X, f64 [n_in, n_in], a new array at each call: the caller owns it (GPTQ factorizes it in place,
        so that a cached copy would double the largest array of the layer)."""
        return hessian(self.x)

    def channel_stats(self) -> dict[str, np.ndarray]:
        """mean |x|, mean x^2 and max |x| per input channel, f32 [n_in] each."""
        n = self.x.shape[1]
        s1, s2, mx = np.zeros(n, np.float64), np.zeros(n, np.float64), np.zeros(n, np.float32)
        for a in range(0, self.x.shape[0], ROWS_PER_STAT):
            ax = np.abs(self.x[a:a + ROWS_PER_STAT])
            s1 += ax.sum(axis=0, dtype=np.float64)
            s2 += np.square(ax, dtype=np.float64).sum(axis=0)
            mx = np.maximum(mx, ax.max(axis=0))
        t = max(1, self.x.shape[0])
        return {"mean_abs": (s1 / t).astype(np.float32), "mean_sq": (s2 / t).astype(np.float32), "max_abs": mx}


class _CaptureBackend:
    """The CPU backend, except that linears are f32 products with the layer's current weights, and the first
    linear of each input group calls the hook (which may replace the group's weights) before it runs."""

    def __init__(self, cpu: Any, layer: "Layer", hook: Hook | None) -> None:
        self._cpu, self._layer, self._hook = cpu, layer, hook
        self._seen: dict[int, np.ndarray] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cpu, name)

    def linears(self, ws: Any, x: np.ndarray, biases: Any, exact_rows: bool = False) -> list[np.ndarray]:
        """Several linears of the same rows (q/k/v, gate/up), one `linear` each."""
        return [self.linear(w, x, b, exact_rows) for w, b in zip(ws, biases)]

    def linear(self, w: Any, x: np.ndarray, bias: np.ndarray | None = None, exact_rows: bool = False) -> np.ndarray:
        """x [T, n_in] @ W^T (+ bias) with the role's current weight."""
        role = w.role
        g = GROUP_OF[role]
        if g not in self._seen:
            self._seen[g] = x
            if self._hook is not None:
                self._hook(Group(tuple(r for r in INPUT_GROUPS[g] if r in self._layer.weights), x))
        elif self._seen[g] is not x:
            raise QFError(f"calibration: {role} of layer {self._layer.index} does not share the input of its group "
                          f"{INPUT_GROUPS[g]}; this architecture's block is not supported")
        y = x @ self._layer.weights[role].T  # y: [T, n_out]
        if bias is not None:
            y += bias
        return y


class Layer:
    """qf.quant.methods.base.CalibLayer over one block: weights by role (f32), the forward object whose block
    code runs it, the calibration batch and the layer's input rows."""

    def __init__(self, index: int, weights: dict[str, np.ndarray], linears: dict[str, LinearInfo],
                 targets: dict[str, LinearTarget], forward: Any, cpu: Any, batch: Batch | None,
                 x_in: np.ndarray | None, n_seq: int, seqlen: int) -> None:
        self.index, self.weights, self.linears, self.targets = index, weights, linears, targets
        self._forward, self._cpu, self._batch, self._x = forward, cpu, batch, x_in
        self._n_seq, self._seqlen = n_seq, seqlen
        self.n_rows = 0 if x_in is None else int(x_in.shape[0])
        self.stored: dict[str, Any] = {}  # role -> emitted form
        self.changed: set[str] = set()  # non-linear roles whose weights were set (written from here)
        self.errors: dict[str, float] = {}

    def weight(self, role: str) -> np.ndarray:
        """The current weight of a role (f32)."""
        return self.weights[role]

    def roles(self) -> tuple[str, ...]:
        """Every role of this layer."""
        return tuple(self.weights)

    def set_weight(self, role: str, w: np.ndarray) -> None:
        """Replace a role's weight (same shape)."""
        old = self.weights[role]
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.shape != old.shape:
            raise QFError(f"layer {self.index} {role}: new weight {w.shape} != {old.shape}")
        self.weights[role] = w
        if role not in self.linears:
            self.changed.add(role)

    def run(self, hook: Hook | None = None, inputs: np.ndarray | None = None) -> np.ndarray:
        """The block over the calibration rows with the current weights (f32 KV cache of this layer only)."""
        if self._batch is None:
            raise QFError("this conversion has no calibration rows (the method needs --calib)")
        x = np.array(self._x if inputs is None else inputs, dtype=np.float32)  # x: [T, n_embd], updated in place
        be = _CaptureBackend(self._cpu, self, hook)
        placed = {r: (_Linear(r) if w.ndim == 2 else w) for r, w in self.weights.items()}
        L = PlacedLayer(be, placed, None)
        base = self._forward.layers[self.index]
        L.rope, L.window = base.rope, base.window
        hp = self._forward.hp
        kv = CpuKV(KVSpec(self._n_seq, self._seqlen, hp.n_head_kv, hp.head_dim, hp.head_dim, "f32", "f32"))
        return self._forward._block(L, x, self._batch, kv)

    def emit(self, role: str, stored: Any) -> None:
        """Record a linear's stored form."""
        if role not in self.linears:
            raise QFError(f"layer {self.index}: {role} is not a calibrated linear")
        self.stored[role] = stored

    def report(self, role: str, relative_error: float) -> None:
        """Record a linear's relative output error."""
        self.errors[role] = float(relative_error)
