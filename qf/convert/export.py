"""A .qf / .gguf file -> Hugging Face folder (safetensors, config.json, tokenizer files), written atomically.

The source is checked first by the runtime's validator (qf.format.model_check, payload members folded into their
logical weights) and every other key it reads by its value type, so each failure is a QFError naming the file and
the key or tensor; the output folder may not hold the source. `ExportSource` and the config, tokenizer and float
helpers here are shared with the quantized exporter (qf.convert.export_quant)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qf.convert.archspec import ArchSpec, NameMap, head_permutation, inverse_permutation, shortest_f32, tensor_suffix
from qf.convert.folder_io import atomic_folder, write_json
from qf.convert.registry import all_specs, spec_for_gguf
from qf.convert.safetensors_io import SafetensorsWriter, f32_to_bf16_bits
from qf.convert.tokenizer_export import special_ids, write_tokenizer_files
from qf.format.errors import ConvertError
from qf.format.ggml_types import GGMLType
from qf.format.model_check import TensorDecl, validate_model
from qf.format.output_guard import refuse_folder_over_input
from qf.format.reader import GGUFFile, open_gguf
from qf.format.values import FLOAT_TYPES, INTEGER_TYPES, GGUFValueType
from qf.quant.codecs import registered_types
from qf.quant.formats import Payload, PayloadDecl, fold_payloads
from qf.quant.formats.base import STORAGE_DTYPES

# dtype argument -> (safetensors dtype, f32 -> stored array)
DTYPES = {
    "float16": ("F16", lambda x: x.astype(np.float16)),
    "bfloat16": ("BF16", f32_to_bf16_bits),
    "float32": ("F32", lambda x: x.astype(np.float32, copy=False)),
}
WEIGHTS_NAME = "model.safetensors"
EXPORT_ROPE_TYPES = ("none", "linear", "yarn")  # yarn: the runtime cannot run it, but config.json can say it

_S, _B, _I, _F = GGUFValueType.STRING, GGUFValueType.BOOL, tuple(INTEGER_TYPES), tuple(FLOAT_TYPES)
# Keys the exporter reads beyond the hyperparameters (which validate_model reads typed) -> accepted value
# types; an array is ("array", element types). "{arch}" is the file's architecture.
TYPED_KEYS: dict[str, Any] = {
    "tokenizer.ggml.model": (_S,), "tokenizer.ggml.pre": (_S,), "tokenizer.chat_template": (_S,),
    "tokenizer.ggml.tokens": ("array", (_S,)), "tokenizer.ggml.merges": ("array", (_S,)),
    "tokenizer.ggml.token_type": ("array", _I), "tokenizer.ggml.scores": ("array", _F),
    "tokenizer.ggml.bos_token_id": _I, "tokenizer.ggml.eos_token_id": _I,
    "tokenizer.ggml.unknown_token_id": _I, "tokenizer.ggml.padding_token_id": _I,
    "tokenizer.ggml.add_bos_token": (_B,), "tokenizer.ggml.add_eos_token": (_B,),
    "tokenizer.ggml.add_space_prefix": (_B,), "tokenizer.ggml.remove_extra_whitespaces": (_B,),
    "{arch}.rope.scaling.type": (_S,), "{arch}.rope.scaling.original_context_length": _I,
}


def read_meta(f: GGUFFile) -> dict[str, Any]:
    """Every metadata key of an open file -> its value (arrays as numpy arrays or lists of str)."""
    return {k: f.meta.raw(k)[1] for k in f.meta.keys()}


def typed_meta(f: GGUFFile, arch: str) -> dict[str, Any]:
    """read_meta, with every key the exporter reads checked against its value type (FormatError naming it)."""
    meta = read_meta(f)
    for template, accepted in TYPED_KEYS.items():
        key = template.format(arch=arch)
        if key not in f.meta:
            continue
        if accepted[0] == "array":
            meta[key] = f.meta.get_array(key, elem=accepted[1])
        elif f.meta.raw(key)[0] not in accepted:
            raise ConvertError(f"{f.path}: {key}: expected {' or '.join(t.name for t in accepted)}, "
                               f"found {f.meta.raw(key)[0].name}")
    return meta


def _spec_for(f: GGUFFile, names: list[str]) -> ArchSpec:
    """The converter spec of the file's architecture whose name map covers its tensors (llama with experts is
    Mixtral); the first of them when none does (its error names the tensors)."""
    arch = str(f.meta.get_str("general.architecture", ""))
    first = spec_for_gguf(arch)
    for spec in (s for s in all_specs() if s.gguf_arch == arch):
        names_map = NameMap(spec.tensor_map)
        if all(g in spec.generated or names_map.to_hf(g) is not None for g in names):
            return spec
    return first


@dataclass
class ExportSource:
    """An open, validated source file: its spec, metadata, payload weights, and logical tensor names in file order
    (each payload's members folded into its `<base>.weight`)."""

    f: GGUFFile
    path: str
    spec: ArchSpec
    meta: dict[str, Any]
    payloads: dict[str, PayloadDecl]
    names: list[str]

    def ne(self, name: str) -> tuple[int, ...]:
        """GGUF shape (ne) of a logical tensor."""
        d = self.payloads.get(name)
        return (d.n_in, d.n_out) if d is not None else tuple(int(x) for x in self.f.tensors[name].ne)

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy shape of a logical tensor."""
        d = self.payloads.get(name)
        return (d.n_out, d.n_in) if d is not None else tuple(self.f.tensors[name].shape)

    def ggml_type(self, name: str) -> GGMLType | None:
        """The ggml type of a plain tensor (None for a payload)."""
        return None if name in self.payloads else GGMLType(int(self.f.tensors[name].type))

    def payload(self, name: str) -> Payload:
        """A payload weight with its member arrays (zero-copy views of the file), index values checked."""
        d = self.payloads[name]
        arrays = {}
        for suffix, full in d.members.items():
            ti = self.f.tensors[full]
            arrays[suffix] = self.f.raw(full).view(STORAGE_DTYPES[GGMLType(int(ti.type))]).reshape(
                tuple(reversed([int(x) for x in ti.ne])))
        d.fmt.check_values(d.params, arrays, d.n_in, d.name, self.path)
        return Payload(d, arrays)

    def dequantize(self, name: str) -> np.ndarray:
        """A logical tensor as f32 in GGUF row order (a payload through its reference dequantizer)."""
        return self.payload(name).dequantize() if name in self.payloads else self.f.dequantize(name)


def open_source(f: GGUFFile, path: str) -> ExportSource:
    """Validate an open file (the runtime's checks, yarn scaling allowed) and describe it for export."""
    table = {n: TensorDecl(tuple(int(x) for x in ti.ne), ti.type) for n, ti in f.tensors.items()}
    table, payloads = fold_payloads(f.meta, table, path)
    members = {m for d in payloads.values() for m in d.members.values()}
    names = [n for n in f.tensors if n not in members] + list(payloads)
    spec = _spec_for(f, names)  # first: an architecture with no converter spec is refused with the supported list
    validate_model(f.meta, table, path, registered_types(), f.dequantize, rope_scaling_types=EXPORT_ROPE_TYPES)
    return ExportSource(f, path, spec, typed_meta(f, spec.gguf_arch), payloads, names)


def hf_names(src: ExportSource) -> list[tuple[str, str]]:
    """(GGUF name, HF name) for every weight (generated tensors aside); an expert stack's HF name keeps
    "{xid}"; an unmapped tensor is an error."""
    spec = src.spec
    names = NameMap(spec.tensor_map)
    out, unknown = [], []
    for g in src.names:
        if g in spec.generated:
            continue
        m = names.to_hf(g)
        if m is None:
            unknown.append(g)
        else:
            out.append((g, m[0]))
    if unknown:
        raise ConvertError(f"{src.path}: tensors with no Hugging Face name for {spec.gguf_arch}: "
                           f"{', '.join(unknown[:10])}")
    return out


def expert_weights(src: ExportSource, g: str, hf: str) -> list[tuple[str, str]]:
    """(HF name, "") per weight of one GGUF tensor; an expert stack gives one per expert."""
    if "{xid}" not in hf:
        return [(hf, "")]
    return [(hf.replace("{xid}", str(e)), str(e)) for e in range(int(src.shape(g)[0]))]


def row_order(src: ExportSource, g: str, n_rows: int) -> np.ndarray | None:
    """The GGUF row of each HF row of tensor g (undoing the converter's Q/K permutation); None: rows kept."""
    key = src.spec.permute.get(tensor_suffix(g))
    if key is None:
        return None
    return inverse_permutation(head_permutation(n_rows, int(src.meta[f"{src.spec.gguf_arch}.{key}"])))


def _unshift(x: np.ndarray, g: str, spec: ArchSpec) -> np.ndarray:
    """Undo a constant the converter added to a tensor's values (gemma's 1 + w norms); a no-op for others."""
    shift = spec.value_shift.get(tensor_suffix(g))
    return x if shift is None else x - np.float32(shift)


def hf_float(src: ExportSource, g: str) -> np.ndarray:
    """A tensor dequantized to f32 in HF's row order and values."""
    x = src.dequantize(g)
    order = row_order(src, g, x.shape[0])
    return _unshift(x if order is None else x[order], g, src.spec)


def float_entries(src: ExportSource, pairs: list[tuple[str, str]], st_dtype: str) -> list[tuple[str, str, tuple]]:
    """Safetensors declarations (name, dtype, shape) of tensors written dequantized."""
    return [(name, st_dtype, src.shape(g)[1:] if e else src.shape(g))
            for g, hf in pairs for name, e in expert_weights(src, g, hf)]


def write_float(w: SafetensorsWriter, src: ExportSource, g: str, hf: str, cast) -> None:
    """One GGUF tensor (or expert stack) written dequantized."""
    x = hf_float(src, g)
    for name, e in expert_weights(src, g, hf):
        w.write(name, cast(x[int(e)] if e else x))


def _write_weights(src: ExportSource, st_dtype: str, cast, path: Path) -> None:
    """model.safetensors, streamed one dequantized tensor at a time."""
    pairs = hf_names(src)
    with SafetensorsWriter(path, float_entries(src, pairs, st_dtype), metadata={"format": "pt"}) as w:
        for g, hf in pairs:
            write_float(w, src, g, hf, cast)


def hf_config(src: ExportSource, dtype: str) -> dict[str, Any]:
    """config.json from the hyperparameter table (inverted) plus the architecture's own extras."""
    f, spec, meta = src.f, src.spec, src.meta
    arch = spec.gguf_arch
    cfg: dict[str, Any] = {"architectures": [spec.hf_architectures[0]], "model_type": spec.hf_model_type}
    for hp in spec.hparams:
        if f"{arch}.{hp.key}" in meta:
            v = meta[f"{arch}.{hp.key}"]
            cfg[hp.hf[0]] = shortest_f32(v) if hp.vtype == GGUFValueType.FLOAT32 else v
    cfg.setdefault("vocab_size", src.ne("token_embd.weight")[1])
    cfg.update(spec.export_config(meta, set(src.names)))
    cfg.update(spec.export_generated(meta, {g: f.dequantize(g) for g in spec.generated if g in f.tensors}))
    n_tokens = len(meta.get("tokenizer.ggml.tokens", []))
    ids = special_ids(meta, n_tokens)
    cfg.update({f"{t}_token_id": ids.get(t) for t in ("bos", "eos")})
    cfg["tie_word_embeddings"] = "output.weight" not in src.names
    cfg["torch_dtype"] = dtype
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in cfg.items()}


def generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: the special ids generation needs."""
    ids = special_ids(meta, len(meta.get("tokenizer.ggml.tokens", [])))
    out: dict[str, Any] = {f"{t}_token_id": ids[t] for t in ("bos", "eos", "pad") if t in ids}
    return {**out, "_from_model_config": False}


def write_side_files(src: ExportSource, tmp: Path, cfg: dict[str, Any]) -> None:
    """config.json, generation_config.json and the tokenizer files."""
    write_json(tmp / "config.json", cfg)
    write_json(tmp / "generation_config.json", generation_config(src.meta))
    write_tokenizer_files(src.meta, tmp, cfg.get("max_position_embeddings") or 2048)


def float_dtype(dtype: str) -> tuple[str, Any]:
    """(safetensors dtype, f32 -> stored array) of an export dtype name; ConvertError for an unknown one."""
    if dtype not in DTYPES:
        raise ConvertError(f"unsupported export dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def export_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float16",
              overwrite: bool = False) -> Path:
    """Dequantize a .qf/.gguf into an HF folder (model.safetensors, config.json, tokenizer and generation config);
    payload weights are dequantized too."""
    st_dtype, cast = float_dtype(dtype)
    refuse_folder_over_input(out_dir, [gguf_path], ConvertError)
    with atomic_folder(out_dir, overwrite) as tmp, open_gguf(gguf_path) as f:
        src = open_source(f, os.fspath(gguf_path))
        cfg = hf_config(src, dtype)  # before the weights: fails fast on what cannot be exported
        _write_weights(src, st_dtype, cast, tmp / WEIGHTS_NAME)
        write_side_files(src, tmp, cfg)
    return Path(out_dir)
