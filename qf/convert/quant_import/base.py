"""What an importer hands the converter: per quantized linear, its payload members and where they come from."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from qf.convert.checkpoint import Checkpoint
from qf.format.errors import ConvertError
from qf.format.ggml_types import GGMLType

ROWS, SHARED = 1, 0  # MemberSource.row_block: one row per output row; shared by every row


@dataclass(frozen=True)
class MemberSource:
    """One member tensor of a payload: qf ggml shape and type, how to read it in qf's numpy layout, and how its
    first axis follows the output rows (ROWS, SHARED, or rows per block for block scales)."""

    ne: tuple[int, ...]
    type: GGMLType
    read: Callable[[], np.ndarray]
    row_block: int = ROWS


@dataclass(frozen=True)
class LinearPayload:
    """A quantized linear of a checkpoint: logical HF weight name, qf scheme, members by suffix, the HF tensors
    it consumes, and its [n_out, n_in]."""

    hf_weight: str
    scheme: str
    members: dict[str, MemberSource]
    consumed: tuple[str, ...]
    n_out: int
    n_in: int


class Importer(Protocol):
    """One `quant_method`: checks its quantization_config and finds every quantized linear of a checkpoint."""

    method: str
    source: str  # qf.payload.source of what it writes

    def check(self, qc: dict[str, Any], path: Path) -> None:
        """The quantization_config is one this importer reads; ConvertError naming the field otherwise."""

    def scan(self, ckpt: Checkpoint, qc: dict[str, Any], path: Path) -> dict[str, LinearPayload]:
        """HF logical weight name -> its payload, every member checked against the config."""


def field_error(path: Path, field: str, why: str) -> ConvertError:
    """A quantization_config field the importer cannot take."""
    return ConvertError(f"{path}: quantization_config {field!r}: {why}")


def tensor_error(ckpt: Checkpoint, name: str, why: str) -> ConvertError:
    """A checkpoint tensor that does not match its config."""
    return ConvertError(f"{ckpt.dir}: tensor {name!r}: {why}")


def want(ckpt: Checkpoint, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None, field: str
         ) -> tuple[int, ...]:
    """A member tensor present with one of dtypes (and shape when given); its shape."""
    if name not in ckpt:
        raise tensor_error(ckpt, name, f"is missing ({field} of a quantized linear)")
    e = ckpt.entry(name)
    if e.dtype not in dtypes:
        raise tensor_error(ckpt, name, f"{field} has dtype {e.dtype}, expected {'/'.join(dtypes)}")
    if shape is not None and tuple(e.shape) != tuple(shape):
        raise tensor_error(ckpt, name, f"{field} has shape {tuple(e.shape)}, expected {tuple(shape)}")
    return tuple(e.shape)


def static_input_scale(ckpt: Checkpoint, name: str, field: str) -> MemberSource:
    """A checkpoint's static per-tensor activation scale, kept as the payload's input_scale member."""
    shape = want(ckpt, name, ("F32", "F16", "BF16"), None, field)
    if int(np.prod(shape)) != 1:
        raise tensor_error(ckpt, name, f"{field} has shape {shape}; only a static per-tensor scale is kept")
    return MemberSource((1,), GGMLType.F32, lambda: ckpt.to_f32(name).reshape(1), SHARED)


SCALE_TYPES: dict[str, GGMLType] = {"F32": GGMLType.F32, "F16": GGMLType.F16, "BF16": GGMLType.BF16}


def scale_member(ckpt: Checkpoint, name: str, shape: tuple[int, ...], ne: tuple[int, ...], row_block: int
                 ) -> MemberSource:
    """A float scale kept in its stored dtype (bit for bit), reshaped to qf's ne."""
    want(ckpt, name, tuple(SCALE_TYPES), shape, "scale")
    dtype = ckpt.entry(name).dtype
    np_shape = tuple(reversed(ne))
    return MemberSource(ne, SCALE_TYPES[dtype], lambda: np.ascontiguousarray(ckpt.raw(name)).reshape(np_shape),
                        row_block)


def matches(targets: Any, module: str) -> bool:
    """compressed-tensors target matching: 'Linear' (every linear), 're:<regex>' (re.match), or a module name."""
    for t in targets or ():
        if not isinstance(t, str):
            continue
        if t == "Linear" or (t.startswith("re:") and re.match(t[3:], module)) or t == module:
            return True
    return False


def modules_with(ckpt: Checkpoint, suffix: str) -> list[str]:
    """Module names (HF prefix) of every tensor named `<module>.<suffix>`."""
    end = "." + suffix
    return [n[: -len(end)] for n in ckpt.names() if n.endswith(end)]


def as_dict(v: Any, path: Path, field: str) -> Mapping[str, Any]:
    """A JSON object field, else ConvertError."""
    if not isinstance(v, dict):
        raise field_error(path, field, f"must be an object, got {type(v).__name__}")
    return v
