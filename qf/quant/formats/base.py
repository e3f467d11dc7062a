"""The weight-format registry, the `qf.payload.*` keys, and folding a file's member tensors into logical weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np

from qf.format.ggml_types import GGMLType
from qf.format.hparams import ModelCheckError
from qf.format.model_check import TensorDecl
from qf.format.values import GGUFValueType as V

PAYLOAD_TENSORS_KEY = "qf.payload.tensors"  # ARRAY of STRING: logical weight names (`<base>.weight`)
PAYLOAD_SCHEMES_KEY = "qf.payload.schemes"  # ARRAY of STRING, same length: each weight's scheme string
PAYLOAD_SOURCE_KEY = "qf.payload.source"  # STRING, optional: the checkpoint layout the payload came from
LOGICAL_SUFFIX = ".weight"
MAX_PAYLOADS = 1 << 20  # entries accepted in the key arrays


@dataclass(frozen=True)
class Member:
    """One member tensor of a payload: name suffix after `<base>.`, accepted storage types, required or not."""

    suffix: str
    types: frozenset[GGMLType]
    required: bool = True


class WeightFormat(Protocol):
    """One payload scheme: parse/print, members, checks, row slices, reference dequantization."""

    name: str  # the registry key: the scheme string up to its first ';'

    def parse(self, text: str, where: str) -> Any:
        """Parameters from a scheme string; ModelCheckError naming `where` when malformed."""

    def scheme(self, p: Any) -> str:
        """The canonical scheme string of parameters."""

    def members(self, p: Any) -> tuple[Member, ...]:
        """The member tensors these parameters need (required) or allow."""

    def check(self, p: Any, decls: Mapping[str, TensorDecl], name: str, path: str) -> tuple[int, int]:
        """Member types and shapes against the parameters; (n_in, n_out) of the logical weight."""

    def check_values(self, p: Any, arrays: Mapping[str, np.ndarray], n_in: int, name: str, path: str) -> None:
        """The member values a kernel indexes with (group indices, zero points) are in range."""

    def slice_rows(self, p: Any, arrays: Mapping[str, np.ndarray], start: int, stop: int,
                   name: str) -> dict[str, np.ndarray]:
        """Members of output rows [start, stop) (zero-copy where the layout allows)."""

    def dequantize(self, p: Any, arrays: Mapping[str, np.ndarray], n_in: int) -> np.ndarray:
        """The weight as f32 [n_out, n_in] (reference; small tensors and tests)."""


_FORMATS: dict[str, WeightFormat] = {}


def register(fmt: WeightFormat) -> WeightFormat:
    """Add a format to the registry under its name."""
    _FORMATS[fmt.name] = fmt
    return fmt


def registered_schemes() -> list[str]:
    """Names of the payload formats."""
    return sorted(_FORMATS)


def format_of(scheme: str, where: str = "<scheme>") -> tuple[WeightFormat, Any]:
    """(format, parameters) of a scheme string; ModelCheckError when no format has that name."""
    key = scheme.split(";", 1)[0]
    fmt = _FORMATS.get(key)
    if fmt is None:
        raise ModelCheckError(where, PAYLOAD_SCHEMES_KEY, f"scheme {scheme!r}: unknown format {key!r} "
                              f"(known: {', '.join(registered_schemes())})")
    return fmt, fmt.parse(scheme, where)


def member_name(logical: str, suffix: str) -> str:
    """`blk.0.attn_q.weight` + `weight_scale` -> `blk.0.attn_q.weight_scale`."""
    return logical[: -len("weight")] + suffix


def parse_fields(text: str, name: str, where: str) -> dict[str, str]:
    """`name;k=v;k=v` -> {k: v}; ModelCheckError on a wrong name, a field twice or a field without '='."""
    head, *rest = text.split(";")
    out: dict[str, str] = {}
    for part in rest:
        k, eq, v = part.partition("=")
        if head != name or not eq or not k or k in out:
            raise ModelCheckError(where, PAYLOAD_SCHEMES_KEY, f"scheme {text!r} is malformed (expected "
                                  f"'{name};key=value;...')")
        out[k] = v
    return out


def field_int(fields: dict[str, str], key: str, text: str, where: str, allowed: tuple[int, ...] | None = None,
              lo: int = 1) -> int:
    """An integer field of a scheme string, checked."""
    v = fields.get(key)
    try:
        n = int(v) if v is not None else None
    except ValueError:
        n = None
    if n is None or (allowed is not None and n not in allowed) or (allowed is None and n < lo):
        want = f"one of {allowed}" if allowed is not None else f"an integer >= {lo}"
        raise ModelCheckError(where, PAYLOAD_SCHEMES_KEY, f"scheme {text!r}: field {key!r} must be {want}, "
                              f"got {v!r}")
    return n


@dataclass(frozen=True)
class PayloadDecl:
    """A logical weight stored as a payload: its format, parameters, members and shape."""

    name: str
    scheme: str
    fmt: WeightFormat
    params: Any
    members: dict[str, str]  # suffix -> member tensor name present in the file
    n_in: int
    n_out: int


@dataclass(frozen=True)
class Payload:
    """A payload weight with its member arrays (zero-copy views of the file, typed)."""

    decl: PayloadDecl
    arrays: dict[str, np.ndarray]  # suffix -> typed array in numpy order

    def dequantize(self) -> np.ndarray:
        """f32 [n_out, n_in]."""
        return self.decl.fmt.dequantize(self.decl.params, self.arrays, self.decl.n_in)


def _string_list(meta: Any, key: str, path: str) -> list[str]:
    """A STRING array key, checked."""
    value = meta.get_array(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > MAX_PAYLOADS:
        raise ModelCheckError(path, key, f"must be an ARRAY of at most {MAX_PAYLOADS} STRING")
    return value


def payload_entries(meta: Any, path: str) -> list[tuple[str, str]]:
    """(logical name, scheme) pairs of the qf.payload.* keys; [] when the file has none."""
    has_t, has_s = PAYLOAD_TENSORS_KEY in meta, PAYLOAD_SCHEMES_KEY in meta
    if not has_t and not has_s:
        return []
    if has_t != has_s:
        missing = PAYLOAD_SCHEMES_KEY if has_t else PAYLOAD_TENSORS_KEY
        raise ModelCheckError(path, missing, "missing (the qf.payload.tensors / schemes keys come together)")
    names, schemes = _string_list(meta, PAYLOAD_TENSORS_KEY, path), _string_list(meta, PAYLOAD_SCHEMES_KEY, path)
    if len(names) != len(schemes):
        raise ModelCheckError(path, PAYLOAD_SCHEMES_KEY, f"{len(schemes)} schemes for {len(names)} tensors")
    seen: set[str] = set()
    for n in names:
        if not n.endswith(LOGICAL_SUFFIX) or n in seen:
            raise ModelCheckError(path, PAYLOAD_TENSORS_KEY, f"entry {n!r} must be a '<base>.weight' name, each once")
        seen.add(n)
    return list(zip(names, schemes))


def fold_payloads(meta: Any, tensors: Mapping[str, TensorDecl], path: str
                  ) -> tuple[dict[str, TensorDecl], dict[str, PayloadDecl]]:
    """The tensor table with each payload's members replaced by one logical TensorDecl (ne = (n_in, n_out),
    scheme set), and the payloads by logical name. ModelCheckError naming the tensor or key when a member is
    missing, of a wrong type or shape, or the logical name is also stored as a tensor."""
    path = str(path)
    table = dict(tensors)
    payloads: dict[str, PayloadDecl] = {}
    for name, scheme in payload_entries(meta, path):
        fmt, p = format_of(scheme, path)
        if name in table:
            raise ModelCheckError(path, name, f"is listed in {PAYLOAD_TENSORS_KEY} and stored as a tensor too",
                                  tensor=True)
        present: dict[str, str] = {}
        decls: dict[str, TensorDecl] = {}
        for m in fmt.members(p):
            full = member_name(name, m.suffix)
            d = table.pop(full, None)
            if d is None:
                if m.required:
                    raise ModelCheckError(path, full, f"is missing (member {m.suffix!r} of payload {name!r}, "
                                          f"scheme {scheme!r})", tensor=True)
                continue
            if d.type not in m.types:
                raise ModelCheckError(path, full, f"is stored as {GGMLType(d.type).name}; member {m.suffix!r} of "
                                      f"scheme {scheme!r} must be {'/'.join(t.name for t in m.types)}", tensor=True)
            present[m.suffix], decls[m.suffix] = full, d
        n_in, n_out = fmt.check(p, decls, name, path)
        table[name] = TensorDecl((n_in, n_out), GGMLType.F32, scheme)
        payloads[name] = PayloadDecl(name, fmt.scheme(p), fmt, p, present, n_in, n_out)
    return table, payloads


def payload_kv(payloads: list[tuple[str, str]], source: str | None = None) -> list[tuple[str, Any, V]]:
    """The qf.payload.* keys (KV convention: arrays carry their element type) for (logical name, scheme) pairs."""
    if not payloads:
        return []
    kv = [(PAYLOAD_TENSORS_KEY, [n for n, _ in payloads], V.STRING),
          (PAYLOAD_SCHEMES_KEY, [s for _, s in payloads], V.STRING)]
    return kv + ([(PAYLOAD_SOURCE_KEY, source, V.STRING)] if source else [])


def shape_error(path: str, full: str, got: tuple[int, ...], want: tuple[int, ...], why: str) -> ModelCheckError:
    """A member whose ggml shape is not what the parameters imply."""
    return ModelCheckError(path, full, f"has ne {got}, expected {want} ({why})", tensor=True)


FLOAT_SCALES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})


def scales_f32(a: np.ndarray) -> np.ndarray:
    """A scale member (float32, float16, or bf16 bits as uint16) as f32."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


STORAGE_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.F32: np.dtype("<f4"), GGMLType.F16: np.dtype("<f2"), GGMLType.BF16: np.dtype("<u2"),
    GGMLType.I8: np.dtype("i1"), GGMLType.I16: np.dtype("<i2"), GGMLType.I32: np.dtype("<i4"),
}
