"""The one validator of a llama-family model: metadata + tensor table -> HParams, or ModelError naming the key
or tensor.

Called where a model file is loaded (qf.runtime.hparams / qf.runtime.weights) and where one is produced
(qf.convert.pipeline, qf.quant.requantize) before the output file is opened, so a tool never writes a file the
runtime refuses. Producers describe the file they are about to write with `KVMetadata` (the reader's
`Metadata` interface over (key, value, type) triples) and a {name: TensorDecl} table.

A file holding tensors the model does not read (unknown names, layers beyond block_count, roles of another
architecture) is refused, as llama.cpp refuses it ("wrong number of tensors").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping

import numpy as np

from qf.format.errors import FormatError
from qf.format.ggml_types import GGMLType
from qf.format.hparams import ROPE_SCALING_TYPES, HParams, ModelCheckError, hparams_from_metadata
from qf.format.arch import known_archs, model_arch
from qf.format.reader import _MISSING, TypedGetters  # one sentinel: the getters pass it to _get
from qf.format.tensor_roles import GLOBAL_ROLES, LAYER_ROLES, ROPE_FACTOR_ROLES, ModelArch, Role
from qf.format.values import FLOAT_TYPES, INTEGER_TYPES, SCALAR, GGUFValueType

MAX_TEMPLATE_CHARS = 1 << 20  # longest tokenizer.chat_template* accepted (a template is code; 1 Mi chars)
TEMPLATE_KEY = "tokenizer.chat_template"
TOKENS_KEY = "tokenizer.ggml.tokens"
ROPE_FREQS = "rope_freqs.weight"
MAX_LISTED = 10  # names quoted in one message
KNOWN_ARCHS = known_archs()

Values = Callable[[str], np.ndarray]  # tensor name -> its values as f32 (small vectors only)


@dataclass(frozen=True)
class TensorDecl:
    """One tensor of a file's table: ggml shape (ne[0] innermost) and storage type; a payload weight (several
    member tensors, qf.quant.formats) is one logical entry with its scheme string set."""

    ne: tuple[int, ...]
    type: GGMLType
    scheme: str | None = None


@dataclass(frozen=True)
class Expected:
    """A tensor a model reads: its shape from the hyperparameters and whether it must be present."""

    ne: tuple[int, ...]
    dims: tuple[str, ...]  # HParams attribute names behind ne
    required: bool


# ---------------------------------------------------------------------------------------------- metadata view

def _listed(names: Iterable[str]) -> str:
    """A short list of names for a message."""
    names = list(names)
    more = f" ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _stored_scalar(value: Any, vtype: GGUFValueType, key: str, path: str) -> Any:
    """A scalar as a file of this value type would hold it (float32 rounding, integer range), else FormatError."""
    if vtype == GGUFValueType.STRING:
        ok = isinstance(value, str)
    elif vtype == GGUFValueType.BOOL:
        ok = isinstance(value, (bool, np.bool_))
    elif vtype in INTEGER_TYPES:
        info = np.iinfo(SCALAR[vtype][1])
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and info.min <= value <= info.max
        value = int(value) if ok else value
    elif vtype in FLOAT_TYPES:
        ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
        if ok:
            with np.errstate(over="ignore"):
                value = float(np.float32(value)) if vtype == GGUFValueType.FLOAT32 else float(value)
    else:
        ok = False
    if not ok:
        raise FormatError(f"value {value!r} cannot be stored as {vtype.name}", path=path, field=key)
    return value


def _stored_array(value: Any, elem: GGUFValueType, key: str, path: str) -> Any:
    """An array as a file would hold it: list[str] for strings, a numpy array of the element dtype otherwise."""
    if elem == GGUFValueType.STRING:
        if not all(isinstance(v, str) for v in value):
            raise FormatError("expected an array of strings", path=path, field=key)
        return list(value)
    if elem not in SCALAR:
        return list(value)
    try:
        arr = np.asarray(value)
        out = arr.astype(SCALAR[elem][1], copy=False)
    except (OverflowError, ValueError, TypeError) as e:
        raise FormatError(f"array cannot be stored as {elem.name}: {e}", path=path, field=key) from None
    if elem in INTEGER_TYPES and arr.size and not np.array_equal(out, arr):
        raise FormatError(f"array values do not fit {elem.name}", path=path, field=key)
    return out




class KVMetadata(TypedGetters):
    """The reader's Metadata interface over (key, value, value type) triples about to be written.

    KV convention (qf.convert.archspec.KV): for a list or array, the value type is its element type.
    """

    def __init__(self, kv: Iterable[tuple[str, Any, GGUFValueType]], path: str = "<model>") -> None:
        self._path = str(path)
        self._e: dict[str, tuple[GGUFValueType, GGUFValueType | None, Any]] = {}
        for key, value, vtype in kv:
            vtype = GGUFValueType(vtype)
            if isinstance(value, (list, tuple, np.ndarray)):
                self._e[key] = (GGUFValueType.ARRAY, vtype, _stored_array(value, vtype, key, self._path))
            else:
                self._e[key] = (vtype, None, _stored_scalar(value, vtype, key, self._path))

    def __contains__(self, key: object) -> bool:
        return key in self._e

    def __iter__(self) -> Iterator[str]:
        return iter(self._e)

    def __len__(self) -> int:
        return len(self._e)

    def keys(self) -> list[str]:
        """Keys in insertion order."""
        return list(self._e)

    def raw(self, key: str) -> tuple[GGUFValueType, Any]:
        """(value type, value); arrays come back as (ARRAY, value)."""
        vtype, _, value = self._entry(key)
        return vtype, value

    def elem_type(self, key: str) -> GGUFValueType | None:
        """Element type of an array value (None for scalars)."""
        return self._entry(key)[1]

    def _entry(self, key: str) -> tuple[GGUFValueType, GGUFValueType | None, Any]:
        """The stored entry of key, or FormatError naming it."""
        if key not in self._e:
            raise FormatError(f"missing key {key!r}", path=self._path, field=key)
        return self._e[key]

    def _get(self, key: str, accepted: Collection[GGUFValueType], what: str, default: Any) -> Any:
        """The value of key if its type is accepted; default if absent (when given)."""
        if key not in self._e and default is not _MISSING:
            return default
        vtype, elem, value = self._entry(key)
        if vtype not in accepted:
            found = vtype.name if elem is None else f"ARRAY of {elem.name}"
            raise FormatError(f"expected {what}, found {found}", path=self._path, field=key)
        return value

    def get_array(self, key: str, default: Any = _MISSING, **_: Any) -> Any:
        """An ARRAY value."""
        return self._get(key, (GGUFValueType.ARRAY,), "ARRAY", default)



# ---------------------------------------------------------------------------------------------- tensors

def _dims(hp: HParams, dims: tuple[str, ...]) -> tuple[int, ...]:
    """ne of a role from HParams attribute names."""
    return tuple(int(getattr(hp, d)) for d in dims)


def arch_of(hp: HParams, path: str) -> ModelArch:
    """The ModelArch of the hyperparameters' architecture (which the reader has already accepted)."""
    model = model_arch(hp.arch)
    if model is None:
        raise ModelCheckError(path, "general.architecture", f"{hp.arch!r} is not supported (supported: "
                              f"{', '.join(KNOWN_ARCHS)})")
    return model


def layer_table(hp: HParams, path: str = "<model>") -> tuple[Mapping[str, Role], Mapping[str, Role]]:
    """(global roles, roles of one block) the model reads; ModelCheckError when its expert form is unknown."""
    model = arch_of(hp, path)
    layer = model.layer_roles(hp.n_expert)
    if layer is None:
        key, why = ((f"{hp.arch}.expert_count", f"{hp.n_expert} experts: {hp.arch} has no mixture-of-experts form")
                    if hp.n_expert else (f"{hp.arch}.expert_count", f"missing: {hp.arch} is a mixture of experts"))
        raise ModelCheckError(path, key, why)
    return model.globals, layer


def expected_tensors(hp: HParams, path: str = "<model>") -> dict[str, Expected]:
    """Every tensor a model with these hyperparameters reads, by name, in file order."""
    globals_, layer = layer_table(hp, path)
    out: dict[str, Expected] = {}
    groups = [(globals_, {})] + [(layer, {"i": i}) for i in range(hp.n_layer)]
    for table, fmt in groups:
        for role in table.values():
            out[role.template.format(**fmt)] = Expected(_dims(hp, role.dims), role.dims, role.required)
    return out


def squeeze_ne(ne: tuple[int, ...], n_dims: int) -> tuple[int, ...]:
    """ne without trailing 1s beyond n_dims (a [n, 1] vector is still a vector, as in llama.cpp)."""
    ne = tuple(int(n) for n in ne)
    while len(ne) > n_dims and ne[-1] == 1:
        ne = ne[:-1]
    return ne


def _check_names(hp: HParams, tensors: Mapping[str, TensorDecl], expected: dict[str, Expected], path: str) -> None:
    """No tensor the model does not read; every required one present."""
    unknown = [n for n in tensors if n not in expected]
    if unknown:
        used = len(tensors) - len(unknown)
        raise ModelCheckError(path, unknown[0], (
            f"wrong number of tensors; expected {len(tensors)}, got {used} (llama.cpp's check): a {hp.arch} model "
            f"of {hp.n_layer} layers does not read {_listed(unknown)}"), tensor=True)
    missing = [n for n, e in expected.items() if e.required and n not in tensors]
    if missing:
        raise ModelCheckError(path, missing[0], f"is missing (the metadata promises {hp.n_layer} layers of "
                              f"{hp.arch}; missing: {_listed(missing)})", tensor=True)


def check_rope_freqs(values: np.ndarray, path: str, name: str = ROPE_FREQS) -> None:
    """rope_freqs holds per-frequency divisors: every one finite and > 0."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(x) | (x <= 0))
    if bad.size:
        raise ModelCheckError(path, name, f"{bad.size} of {x.size} rope frequency factors are zero, negative or "
                              f"not finite (first: [{bad[0]}] = {x[bad[0]]})", tensor=True)


def check_tensors(hp: HParams, tensors: Mapping[str, TensorDecl], path: str,
                  decodable: Collection[GGMLType] | None = None, values: Values | None = None) -> None:
    """The tensor table against the hyperparameters: names, presence, shapes, storage types, rope factors."""
    path = str(path)
    expected = expected_tensors(hp, path)
    _check_names(hp, tensors, expected, path)
    for name, t in tensors.items():
        e = expected[name]
        ne = squeeze_ne(t.ne, len(e.ne))
        if ne != e.ne:
            raise ModelCheckError(path, name, f"has shape {ne}, expected {e.ne} ({', '.join(e.dims)})", tensor=True)
        if t.scheme is not None and len(e.ne) != 2:
            raise ModelCheckError(path, name, f"is a payload ({t.scheme}); only 2-D matrices may be", tensor=True)
        if decodable is not None and t.scheme is None and t.type not in decodable:
            raise ModelCheckError(path, name, f"is stored as {GGMLType(t.type).name}, a type with no codec here "
                                  f"(supported: {', '.join(GGMLType(x).name for x in decodable)})", tensor=True)
    if values is not None:
        for name in (GLOBAL_ROLES[r].template for r in ROPE_FACTOR_ROLES):
            if name in tensors:
                check_rope_freqs(values(name), path, name)


# ---------------------------------------------------------------------------------------------- the rest

def check_metadata(meta: Any, hp: HParams, path: str) -> None:
    """Keys beyond the hyperparameters: chat templates within MAX_TEMPLATE_CHARS, one token per vocab row."""
    path = str(path)
    for key in meta.keys():
        if key == TEMPLATE_KEY or key.startswith(TEMPLATE_KEY + "."):
            n = len(meta.get_str(key))
            if n > MAX_TEMPLATE_CHARS:
                raise ModelCheckError(path, key, f"{n} characters is too long (limit {MAX_TEMPLATE_CHARS})")
    if TOKENS_KEY in meta:
        n = len(meta.get_array(TOKENS_KEY))
        if n != hp.n_vocab:
            raise ModelCheckError(path, TOKENS_KEY, f"{n} tokens but the model has {hp.n_vocab} "
                                  f"({hp.arch}.vocab_size / token_embd rows)")


def _vocabulary_suffixes() -> set[str]:
    """Tensor names (blk.N. stripped) any supported architecture reads."""
    return {r.template.replace("blk.{i}.", "") for r in (*LAYER_ROLES.values(), *GLOBAL_ROLES.values())}


def _unread_suffixes(names: Iterable[str]) -> list[str]:
    """Distinct tensor names of a file (blk.N. stripped) that no supported architecture reads."""
    known = _vocabulary_suffixes()
    out = {n.split(".", 2)[2] if n.startswith("blk.") and n.count(".") >= 2 else n for n in names}
    return sorted(out - known)


def unsupported_architecture(arch: str, path: str, tensor_names: Iterable[str] = ()) -> ModelCheckError:
    """The refusal of an architecture: what is supported, and how this file differs (tensors no supported
    architecture reads)."""
    unread = _unread_suffixes(tensor_names)
    how = f"; its file holds tensors no supported architecture reads: {_listed(unread)}" if unread else (
        "; its tensors have names the supported architectures use, but its forward pass (norms, attention, "
        "activations) is not implemented here")
    return ModelCheckError(str(path), "general.architecture",
                           f"{arch!r} is not supported (supported: {', '.join(KNOWN_ARCHS)}){how}")


def architecture(meta: Any, path: str, tensor_names: Iterable[str] = ()) -> str:
    """general.architecture, which must be one this validator knows."""
    if "general.architecture" not in meta:
        raise ModelCheckError(str(path), "general.architecture", "missing")
    arch = str(meta.get_str("general.architecture"))
    if arch not in KNOWN_ARCHS:
        raise unsupported_architecture(arch, path, tensor_names)
    return arch


def validate_model(meta: Any, tensors: Mapping[str, TensorDecl], path: str,
                   decodable: Collection[GGMLType] | None = None, values: Values | None = None,
                   rope_scaling_types: tuple[str, ...] = ROPE_SCALING_TYPES) -> HParams:
    """Everything the runtime checks when it loads a file: hyperparameters, metadata, tensor table."""
    path = str(path)
    hp = hparams_from_metadata(meta, architecture(meta, path, tensors), path, rope_scaling_types)
    check_metadata(meta, hp, path)
    check_tensors(hp, tensors, path, decodable, values)
    return hp
