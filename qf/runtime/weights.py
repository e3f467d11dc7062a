"""Tensor lookup: every role of the file's architecture (qf.format.arch tables), validated by the shared
qf.format.model_check before any tensor is handed out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from qf.format.ggml_types import GGMLType
from qf.format.model_check import TensorDecl, check_metadata, check_tensors, layer_table, squeeze_ne
from qf.format.tensor_roles import GLOBAL_ROLES, LAYER_ROLES, Role
from qf.quant.codecs import registered_types
from qf.runtime.hparams import HParams

__all__ = ["GLOBAL_ROLES", "LAYER_ROLES", "LayerTensors", "ModelTensors", "TensorRef", "load_tensors",
           "row_slices"]


@dataclass(frozen=True)
class TensorRef:
    """One tensor as stored: its packed bytes stay in the mapped file."""

    name: str
    type: GGMLType
    ne: tuple[int, ...]  # ggml order, ne[0] innermost
    data: np.ndarray  # u8 [n_rows, row_bytes], zero-copy view of the file

    @property
    def n_in(self) -> int:
        """Row length (inputs of a linear layer)."""
        return self.ne[0]

    @property
    def n_out(self) -> int:
        """Number of rows (outputs of a linear layer)."""
        return self.data.shape[0]


def row_slices(t: TensorRef, sizes: tuple[int, ...], label: str = "part") -> list[TensorRef]:
    """Consecutive row blocks of a matrix (or of the matrices stacked in a 3-D tensor) as zero-copy 2-D
    TensorRefs: phi3's fused q/k/v and gate/up, or one expert of ffn_*_exps."""
    out, start = [], 0
    for k, n in enumerate(sizes):
        out.append(TensorRef(f"{t.name}[{label} {k}]", t.type, (t.ne[0], n), t.data[start:start + n]))
        start += n
    return out


class LayerTensors:
    """The tensors of one block by role (qf.format.tensor_roles.LAYER_ROLES): every role of the vocabulary is
    an attribute, None when the file's architecture has no such tensor."""

    def __init__(self, **tensors: TensorRef | None) -> None:
        unknown = set(tensors) - set(LAYER_ROLES)
        if unknown:
            raise TypeError(f"unknown layer roles: {sorted(unknown)}")
        for role in LAYER_ROLES:
            setattr(self, role, tensors.get(role))

    def roles(self) -> dict[str, TensorRef]:
        """The roles present."""
        return {r: getattr(self, r) for r in LAYER_ROLES if getattr(self, r) is not None}


@dataclass(frozen=True)
class ModelTensors:
    """All tensors a forward pass reads."""

    tok_embd: TensorRef  # [n_vocab, n_embd]
    output_norm: TensorRef  # [n_embd]
    output: TensorRef  # [n_vocab, n_embd]; token_embd itself when tied
    rope_freqs: TensorRef | None  # [n_rot / 2]
    layers: list[LayerTensors]
    extra: Mapping[str, TensorRef] = field(default_factory=dict)  # other global roles present (rope factors)


def _lookup(f: Any, name: str, dims: tuple[str, ...]) -> TensorRef | None:
    """A tensor of the (already validated) file as stored, or None when the file has none of that name."""
    info = f.tensors.get(name)
    if info is None:
        return None
    return TensorRef(name=name, type=GGMLType(int(info.type)), ne=squeeze_ne(info.ne, len(dims)), data=f.raw(name))


def _group(f: Any, table: Mapping[str, Role], **fmt: int) -> dict[str, TensorRef | None]:
    """Look up every role of a table, filling `{i}` in the names."""
    return {role: _lookup(f, r.template.format(**fmt), r.dims) for role, r in table.items()}


def load_tensors(f: Any, hp: HParams, path: str = "<model>") -> ModelTensors:
    """Validate the file's tensor table (qf.format.model_check, the rules the converter applies too), then
    collect every tensor of the model; ModelError naming the tensor or key."""
    table = {n: TensorDecl(tuple(int(x) for x in ti.ne), GGMLType(int(ti.type))) for n, ti in f.tensors.items()}
    check_metadata(f.meta, hp, path)
    check_tensors(hp, table, path, registered_types(), f.dequantize)
    globals_, layer = layer_table(hp, path)
    g = _group(f, {**globals_, **{r: GLOBAL_ROLES[r] for r in ("output", "rope_freqs")}})
    layers = [LayerTensors(**_group(f, layer, i=i)) for i in range(hp.n_layer)]
    extra = {r: t for r, t in g.items() if t is not None and r not in ("tok_embd", "output_norm", "output",
                                                                          "rope_freqs")}
    return ModelTensors(
        tok_embd=g["tok_embd"],
        output_norm=g["output_norm"],
        output=g["output"] or g["tok_embd"],
        rope_freqs=g["rope_freqs"],
        layers=layers,
        extra=extra,
    )

