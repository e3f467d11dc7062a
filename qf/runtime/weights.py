"""Tensor lookup: every role of the file's architecture (qf.format.arch tables), validated by the shared
qf.format.model_check before any tensor is handed out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from qf.format.ggml_types import GGMLType
from qf.format.hparams import ModelCheckError
from qf.format.model_check import TensorDecl, check_metadata, check_tensors, layer_table, squeeze_ne
from qf.format.tensor_roles import GLOBAL_ROLES, LAYER_ROLES, Role
from qf.quant.codecs import registered_types
from qf.quant.formats import PayloadDecl, fold_payloads
from qf.quant.formats.base import STORAGE_DTYPES
from qf.runtime.hparams import HParams

__all__ = ["GLOBAL_ROLES", "LAYER_ROLES", "LayerTensors", "ModelTensors", "PayloadRef", "TensorRef", "WeightRef",
           "load_tensors", "row_slices"]


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


@dataclass(frozen=True)
class PayloadRef:
    """One payload weight (qf.quant.formats): its format and member arrays, zero-copy typed views of the file."""

    name: str
    decl: PayloadDecl
    arrays: dict[str, np.ndarray]  # member suffix -> typed array in numpy order
    n_out: int

    @property
    def scheme(self) -> str:
        """The canonical scheme string; backends pick their kernel by scheme.split(';')[0]."""
        return self.decl.scheme

    @property
    def ne(self) -> tuple[int, int]:
        """(n_in, n_out), ggml order."""
        return (self.decl.n_in, self.n_out)

    @property
    def n_in(self) -> int:
        """Row length (inputs of the linear layer)."""
        return self.decl.n_in

    def dequantize(self) -> np.ndarray:
        """f32 [n_out, n_in] through the format's reference decoder."""
        return self.decl.fmt.dequantize(self.decl.params, self.arrays, self.decl.n_in)


WeightRef = TensorRef | PayloadRef  # what Backend.matrix places


def row_slices(t: WeightRef, sizes: tuple[int, ...], label: str = "part") -> list[WeightRef]:
    """Consecutive row blocks of a matrix (or of the matrices stacked in a 3-D tensor) as zero-copy 2-D
    refs: phi3's fused q/k/v and gate/up, or one expert of ffn_*_exps (payloads slice every member)."""
    out, start = [], 0
    for k, n in enumerate(sizes):
        name = f"{t.name}[{label} {k}]"
        if isinstance(t, PayloadRef):
            d = t.decl
            out.append(PayloadRef(name, d, d.fmt.slice_rows(d.params, t.arrays, start, start + n, t.name), n))
        else:
            out.append(TensorRef(name, t.type, (t.ne[0], n), t.data[start:start + n]))
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


def _member(f: Any, name: str) -> np.ndarray:
    """A payload member as a typed array in numpy order (zero-copy)."""
    ti = f.tensors[name]
    dtype = STORAGE_DTYPES[GGMLType(int(ti.type))]
    return f.raw(name).view(dtype).reshape(tuple(reversed([int(x) for x in ti.ne])))


def _payload(f: Any, d: PayloadDecl, path: str) -> PayloadRef:
    """A payload weight with its members mapped, the values its kernels index with checked."""
    arrays = {suffix: _member(f, full) for suffix, full in d.members.items()}
    d.fmt.check_values(d.params, arrays, d.n_in, d.name, path)
    return PayloadRef(d.name, d, arrays, d.n_out)


def _lookup(f: Any, name: str, dims: tuple[str, ...], payloads: Mapping[str, PayloadDecl] | None = None,
            path: str = "<model>") -> WeightRef | None:
    """A tensor of the (already validated) file as stored, or None when the file has none of that name."""
    if payloads and name in payloads:
        return _payload(f, payloads[name], path)
    info = f.tensors.get(name)
    if info is None:
        return None
    return TensorRef(name=name, type=GGMLType(int(info.type)), ne=squeeze_ne(info.ne, len(dims)), data=f.raw(name))


def _group(f: Any, table: Mapping[str, Role], payloads: Mapping[str, PayloadDecl], path: str,
           **fmt: int) -> dict[str, WeightRef | None]:
    """Look up every role of a table, filling `{i}` in the names."""
    return {role: _lookup(f, r.template.format(**fmt), r.dims, payloads, path) for role, r in table.items()}


def load_tensors(f: Any, hp: HParams, path: str = "<model>") -> ModelTensors:
    """Validate the file's tensor table (qf.format.model_check, the rules the converter applies too), then
    collect every tensor of the model; ModelError naming the tensor or key."""
    table = {n: TensorDecl(tuple(int(x) for x in ti.ne), GGMLType(int(ti.type))) for n, ti in f.tensors.items()}
    check_metadata(f.meta, hp, path)
    table, payloads = fold_payloads(f.meta, table, path)
    check_tensors(hp, table, path, registered_types(), f.dequantize)
    if payloads.get("token_embd.weight") is not None:
        raise ModelCheckError(path, "token_embd.weight", "is a payload; the embedding must be a ggml type",
                              tensor=True)
    globals_, layer = layer_table(hp, path)
    g = _group(f, {**globals_, **{r: GLOBAL_ROLES[r] for r in ("output", "rope_freqs")}}, payloads, path)
    layers = [LayerTensors(**_group(f, layer, payloads, path, i=i)) for i in range(hp.n_layer)]
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

