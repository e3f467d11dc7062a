"""Tensor lookup for llama-family models: names per role (qf.format.tensor_roles), validated by the shared
qf.format.model_check before any tensor is handed out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qf.format.ggml_types import GGMLType
from qf.format.model_check import TensorDecl, check_metadata, check_tensors, squeeze_ne
from qf.format.tensor_roles import GLOBAL_TENSORS, LAYER_TENSORS, REQUIRED_BY_ARCH
from qf.quant.codecs import registered_types
from qf.runtime.hparams import HParams

__all__ = ["GLOBAL_TENSORS", "LAYER_TENSORS", "REQUIRED_BY_ARCH", "LayerTensors", "ModelTensors", "TensorRef",
           "load_tensors"]


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
class LayerTensors:
    """The tensors of one transformer block (biases are None when the model has none)."""

    attn_norm: TensorRef  # [n_embd]
    wq: TensorRef  # [q_dim, n_embd]
    wk: TensorRef  # [kv_dim, n_embd]
    wv: TensorRef  # [kv_dim, n_embd]
    wo: TensorRef  # [n_embd, q_dim]
    bq: TensorRef | None  # [q_dim]
    bk: TensorRef | None  # [kv_dim]
    bv: TensorRef | None  # [kv_dim]
    ffn_norm: TensorRef  # [n_embd]
    w_gate: TensorRef  # [n_ff, n_embd]
    w_up: TensorRef  # [n_ff, n_embd]
    w_down: TensorRef  # [n_embd, n_ff]
    attn_q_norm: TensorRef | None = None  # [head_dim]
    attn_k_norm: TensorRef | None = None  # [head_dim]
    attn_post_norm: TensorRef | None = None  # [n_embd]
    ffn_post_norm: TensorRef | None = None  # [n_embd]


@dataclass(frozen=True)
class ModelTensors:
    """All tensors a llama-family forward pass reads."""

    tok_embd: TensorRef  # [n_vocab, n_embd]
    output_norm: TensorRef  # [n_embd]
    output: TensorRef  # [n_vocab, n_embd]; token_embd itself when tied
    rope_freqs: TensorRef | None  # [n_rot / 2]
    layers: list[LayerTensors]


def _lookup(f: Any, name: str, dims: tuple[str, ...]) -> TensorRef | None:
    """A tensor of the (already validated) file as stored, or None when the file has none of that name."""
    info = f.tensors.get(name)
    if info is None:
        return None
    return TensorRef(name=name, type=GGMLType(int(info.type)), ne=squeeze_ne(info.ne, len(dims)), data=f.raw(name))


def _group(f: Any, table: dict, **fmt: int) -> dict[str, TensorRef | None]:
    """Look up every role of a table, filling `{i}` in the names."""
    return {role: _lookup(f, tmpl.format(**fmt), dims) for role, (tmpl, dims, _) in table.items()}


def load_tensors(f: Any, hp: HParams, path: str = "<model>") -> ModelTensors:
    """Validate the file's tensor table (qf.format.model_check, the rules the converter applies too), then
    collect every tensor of the model; ModelError naming the tensor or key."""
    table = {n: TensorDecl(tuple(int(x) for x in ti.ne), GGMLType(int(ti.type))) for n, ti in f.tensors.items()}
    check_metadata(f.meta, hp, path)
    check_tensors(hp, table, path, registered_types(), f.dequantize)
    g = _group(f, GLOBAL_TENSORS)
    layers = [LayerTensors(**_group(f, LAYER_TENSORS, i=i)) for i in range(hp.n_layer)]
    return ModelTensors(
        tok_embd=g["tok_embd"],
        output_norm=g["output_norm"],
        output=g["output"] or g["tok_embd"],
        rope_freqs=g["rope_freqs"],
        layers=layers,
    )
