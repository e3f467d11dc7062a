"""Requantize a GGUF/.qf file to another type or mix (llama-quantize), streaming tensor by tensor.

Every tensor gets its type from qf.quant.mixes (the same rules as qconvert, with llama.cpp's counters
taken in file order); float sources (F32/F16/BF16) are widened to f32 and quantized a chunk of rows at
a time, tensors whose type does not change are copied byte for byte, and already-quantized sources are
refused unless `allow_requantize` (then dequantized first, with a RequantizeWarning: quality is lost
twice). All metadata is kept except `general.file_type` (set to the new mix) and the old checksums (the
writer records fresh ones). The per-tensor write loop is qf.convert.pipeline.write_tensors. Before the output
is opened, the planned file goes through the runtime's validator (qf.format.model_check) and the output path
may not be the input.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qf.format.checksum import RESERVED_KEYS
from qf.format.errors import ConvertError
from qf.format.ggml_types import GGMLType, row_bytes
from qf.format.hparams import hparams_from_metadata
from qf.format.model_check import KNOWN_ARCHS, KVMetadata, TensorDecl, validate_model
from qf.format.output_guard import refuse_input_as_output
from qf.format.reader import GGUFFile, Metadata, open_gguf
from qf.format.values import ALIGNMENT_KEY
from qf.format.values import GGUFValueType as V
from qf.quant.codecs import get_codec, registered_types
from qf.quant.imatrix import KV_KEYS, ImportanceMatrix
from qf.quant.mixes import (Overrides, TensorCtx, check_importance, choose_type, file_type, get_mix, layer_of,
                            with_counters)
from qf.quant.tensor_plan import (
    CHUNK_ELEMENTS, KV, QUANTIZATION_VERSION, ConvertSummary, PlannedTensor, Progress, summarize, write_tensors,
)

FILE_TYPE_KEY = "general.file_type"
QUANT_VERSION_KEY = "general.quantization_version"
NOT_STORED = frozenset({GGMLType.Q8_K})  # codecs that exist for activations, not as a weight's storage type
FLOAT_SOURCES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})  # requantized without --allow-requantize


class RequantizeWarning(UserWarning):
    """Tensors were dequantized from a quantized type and quantized again."""


def storage_types() -> list[GGMLType]:
    """ggml types a tensor may be written as here (a codec exists and it is a weight format)."""
    return [t for t in registered_types() if t not in NOT_STORED]


def parse_storage_type(name: str, what: str = "type") -> GGMLType:
    """A ggml type name (case-insensitive) that can be written, or an error listing those that can."""
    t = GGMLType.__members__.get(name.strip().upper())
    if t is None or t not in storage_types():
        valid = ", ".join(x.name for x in storage_types())
        raise ConvertError(f"unknown {what} {name!r}; choose one of: {valid}")
    return t


def parse_tensor_type(spec: str) -> tuple[str, GGMLType]:
    """`PATTERN=TYPE` (llama-quantize's --tensor-type): a Python regex searched in tensor names, and a type."""
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern:
        raise ConvertError(f"tensor type {spec!r}: expected PATTERN=TYPE, e.g. attn_v=Q8_0")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConvertError(f"tensor type {spec!r}: bad pattern: {e}") from None
    try:
        return pattern, parse_storage_type(type_name)
    except ConvertError as e:
        raise ConvertError(f"tensor type {spec!r}: {e}") from None


# ---------------------------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class ModelFacts:
    """What the mix rules need to know about the model, read from its metadata."""

    arch: str
    n_layers: int
    n_gqa: int
    n_expert: int
    tied: bool
    is_70b: bool


def _first_int(meta: Metadata, key: str, default: int) -> int:
    """An integer key, or the first element of a per-layer array (llama.cpp's n_head(0))."""
    if key not in meta:
        return default
    vtype, value = meta.raw(key)
    if vtype is V.ARRAY:
        return int(value[0]) if len(value) else default
    return meta.get_int(key)


def model_facts(f: GGUFFile) -> ModelFacts:
    """Architecture, layers, GQA ratio, experts and tied embeddings of an open file: through the shared
    validated reader (qf.format.hparams) for the architectures the runtime knows, else read leniently as
    llama-quantize does (first element of per-layer arrays, defaults for missing keys)."""
    arch = f.meta.get_str("general.architecture", "llama")
    tied = "output.weight" not in f.tensors
    if arch in KNOWN_ARCHS:
        hp = hparams_from_metadata(f.meta, arch, str(f.path))
        return ModelFacts(arch=arch, n_layers=hp.n_layer, n_gqa=hp.n_gqa, n_expert=hp.n_expert, tied=tied,
                          is_70b=arch == "llama" and hp.n_layer == 80 and hp.n_head != hp.n_head_kv)
    n_layers = max(1, _first_int(f.meta, f"{arch}.block_count", 1))
    n_head = _first_int(f.meta, f"{arch}.attention.head_count", 1)
    n_head_kv = _first_int(f.meta, f"{arch}.attention.head_count_kv", n_head) or n_head
    return ModelFacts(arch=arch, n_layers=n_layers, n_gqa=max(1, n_head // max(1, n_head_kv)),
                      n_expert=_first_int(f.meta, f"{arch}.expert_count", 0), tied=tied, is_70b=False)


@dataclass
class RequantPlan:
    """Keys and tensors of the output, decided before a byte is written."""

    mix_name: str
    kv: list[KV]
    tensors: list[PlannedTensor]  # source = the input tensor's name
    requantized: list[str] = field(default_factory=list)  # quantized sources that get another type

    @property
    def total_bytes(self) -> int:
        """Tensor bytes the file will hold."""
        return sum(t.nbytes for t in self.tensors)


def _copy_kv(meta: Metadata, qtype: str, quantized: bool) -> list[KV]:
    """Every key in file order, with general.file_type replaced; the writer's own keys left to it."""
    kv: list[KV] = []
    for key in meta.keys():
        if key in RESERVED_KEYS or key == ALIGNMENT_KEY:
            continue
        vtype, value = meta.raw(key)
        if key == FILE_TYPE_KEY:
            value, vtype = file_type(qtype), V.UINT32
        elif vtype is V.ARRAY:
            vtype = meta.elem_type(key) or V.ARRAY  # the KV convention: an array carries its element type
        kv.append((key, value, vtype))
    if FILE_TYPE_KEY not in meta:
        kv.append((FILE_TYPE_KEY, file_type(qtype), V.UINT32))
    if quantized and QUANT_VERSION_KEY not in meta:
        kv.append((QUANT_VERSION_KEY, QUANTIZATION_VERSION, V.UINT32))
    return kv


def _contexts(f: GGUFFile, facts: ModelFacts, has_imatrix: bool) -> list[TensorCtx]:
    """One TensorCtx per tensor, in file order."""
    return [TensorCtx(name, ti.ne, layer_of(name), facts.n_layers, facts.tied, facts.n_gqa, facts.n_expert,
                      facts.arch, facts.is_70b, has_imatrix, src_type=ti.type) for name, ti in f.tensors.items()]


def plan_requantize(f: GGUFFile, qtype: str, overrides: Overrides | None = None,
                    allow_requantize: bool = False, imatrix: ImportanceMatrix | None = None) -> RequantPlan:
    """Every output tensor's type (and importance, given an imatrix); refuses quantized sources (naming
    them) unless allow_requantize."""
    mix = get_mix(qtype)
    if mix.default not in storage_types():
        raise ConvertError(f"type {qtype} needs a {mix.default.name} codec, which is not available")
    avail = storage_types()
    ctxs = with_counters(_contexts(f, model_facts(f), imatrix is not None), mix, overrides)
    tensors, requantized, no_codec = [], [], []
    for c in ctxs:
        t = choose_type(mix, c, avail, overrides)
        src = c.src_type
        if t != src:
            if src not in registered_types():
                no_codec.append(f"{c.name} ({src.name})")
            elif src not in FLOAT_SOURCES:
                requantized.append(c.name)
        imp = imatrix.for_tensor(c.name, tuple(c.ne)) if imatrix is not None and t != src else None
        if imatrix is not None and t != src:
            check_importance(mix, c.name, t, imp)
        tensors.append(PlannedTensor(c.name, tuple(c.ne), t, source=c.name, importance=imp))
    if no_codec:
        raise ConvertError(f"{f.path}: cannot read tensors of a type with no codec here: {', '.join(no_codec[:10])}")
    if requantized and not allow_requantize:
        first = f.tensors[requantized[0]]
        raise ConvertError(
            f"{f.path}: tensor {requantized[0]} is already quantized ({first.type.name}); requantizing loses "
            f"quality twice, pass --allow-requantize to do it anyway ({len(requantized)} tensors: "
            f"{', '.join(requantized[:5])}{' ...' if len(requantized) > 5 else ''})")
    kv = _copy_kv(f.meta, qtype, mix.quantized)
    if imatrix is not None:  # replaces the keys of an imatrix the source was made with
        kv = [e for e in kv if e[0] not in KV_KEYS] + imatrix.kv()
    return RequantPlan(qtype.upper(), kv, tensors, requantized)


def check_output(f: GGUFFile, plan: RequantPlan) -> None:
    """The file about to be written through the runtime's validator (qf.format.model_check), for the
    architectures it knows; others are requantized as llama-quantize does, unchecked beyond the reader."""
    meta = KVMetadata(plan.kv, str(f.path))
    if meta.get_str("general.architecture", "") not in KNOWN_ARCHS:
        return
    table = {t.name: TensorDecl(tuple(int(x) for x in t.ne), t.type) for t in plan.tensors}
    validate_model(meta, table, str(f.path), registered_types(), f.dequantize)


# ---------------------------------------------------------------------------------------------- writing

def tensor_encoder(f: GGUFFile) -> Callable[[PlannedTensor], np.ndarray]:
    """Encoder for write_tensors: the source bytes when the type is kept, else dequantize -> quantize by chunks."""

    def encode(t: PlannedTensor) -> np.ndarray:
        ti = f.info(t.source)
        raw = f.raw(t.source)  # [n_rows, row_bytes], read-only mmap view
        if t.type == ti.type:
            return raw
        src, dst = get_codec(ti.type), get_codec(t.type)
        ne0 = int(t.ne[0])
        out = np.empty((raw.shape[0], row_bytes(t.type, ne0)), np.uint8)  # out: [n_rows, new row_bytes]
        step = max(1, CHUNK_ELEMENTS // max(1, ne0))
        for a in range(0, raw.shape[0], step):
            x = src.dequantize(raw[a:a + step])  # x: [rows, ne0] f32
            out[a:a + step] = dst.quantize(x, t.importance)
        return out

    return encode


def requantize(in_path: str | Path, out_path: str | Path, qtype: str, overrides: Overrides | None = None,
               allow_requantize: bool = False, progress: Progress | None = None,
               on_plan: Callable[[RequantPlan], None] | None = None,
               imatrix: ImportanceMatrix | None = None) -> ConvertSummary:
    """Requantize in_path to out_path (written atomically) under a --type mix, optional overrides and
    an optional importance matrix (qf.quant.imatrix.load_imatrix)."""
    t0 = time.perf_counter()
    refuse_input_as_output(out_path, [in_path, imatrix.path if imatrix is not None else None], ConvertError)
    with open_gguf(in_path) as f:
        plan = plan_requantize(f, qtype, overrides, allow_requantize, imatrix)
        check_output(f, plan)
        if plan.requantized:
            warnings.warn(f"{in_path}: requantizing {len(plan.requantized)} already-quantized tensors "
                          f"(first: {plan.requantized[0]}); quality is lost twice", RequantizeWarning, stacklevel=2)
        if on_plan is not None:
            on_plan(plan)
        write_tensors(out_path, plan.kv, plan.tensors, tensor_encoder(f), progress, f.alignment)
    return summarize(out_path, plan.tensors, t0)
