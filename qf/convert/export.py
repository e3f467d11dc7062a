"""A .qf / .gguf file -> Hugging Face folder (safetensors, config.json, tokenizer files), written atomically.

The source is checked first by the runtime's validator (qf.format.model_check) and every other key it reads by
its value type, so each failure is a QFError naming the file and the key or tensor; the output folder may not
hold the source."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from qf.convert.archspec import ArchSpec, NameMap, head_permutation, inverse_permutation, shortest_f32, tensor_suffix
from qf.convert.folder_io import atomic_folder, write_json
from qf.convert.registry import all_specs, spec_for_gguf
from qf.convert.safetensors_io import SafetensorsWriter, f32_to_bf16_bits
from qf.convert.tokenizer_export import special_ids, write_tokenizer_files
from qf.format.errors import ConvertError
from qf.format.model_check import TensorDecl, validate_model
from qf.format.output_guard import refuse_folder_over_input
from qf.format.reader import GGUFFile, open_gguf
from qf.format.values import FLOAT_TYPES, INTEGER_TYPES, GGUFValueType
from qf.quant.codecs import registered_types

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


def _validate(f: GGUFFile, path: str) -> None:
    """The source through the runtime's validator (shapes, layers, types with a codec), yarn scaling allowed."""
    table = {n: TensorDecl(tuple(int(x) for x in ti.ne), ti.type) for n, ti in f.tensors.items()}
    validate_model(f.meta, table, path, registered_types(), f.dequantize, rope_scaling_types=EXPORT_ROPE_TYPES)


def _hf_names(f: GGUFFile, spec: ArchSpec) -> list[tuple[str, str]]:
    """(GGUF name, HF name) for every weight (generated tensors aside); an expert stack's HF name keeps
    "{xid}"; an unmapped tensor is an error."""
    names = NameMap(spec.tensor_map)
    out, unknown = [], []
    for g in f.tensors:
        if g in spec.generated:
            continue
        m = names.to_hf(g)
        if m is None:
            unknown.append(g)
        else:
            out.append((g, m[0]))
    if unknown:
        raise ConvertError(f"{f.path}: tensors with no Hugging Face name for {spec.gguf_arch}: "
                           f"{', '.join(unknown[:10])}")
    return out


def _spec_for(f: GGUFFile) -> ArchSpec:
    """The converter spec of the file's architecture whose name map covers its tensors (llama with experts is
    Mixtral); the first of them when none does (its error names the tensors)."""
    arch = str(f.meta.get_str("general.architecture", ""))
    first = spec_for_gguf(arch)
    for spec in (s for s in all_specs() if s.gguf_arch == arch):
        names = NameMap(spec.tensor_map)
        if all(g in spec.generated or names.to_hf(g) is not None for g in f.tensors):
            return spec
    return first


def _weights(f: GGUFFile, g: str, hf: str) -> list[tuple[str, str]]:
    """(HF name, "") per weight of one GGUF tensor; an expert stack gives one per expert."""
    if "{xid}" not in hf:
        return [(hf, "")]
    return [(hf.replace("{xid}", str(e)), str(e)) for e in range(int(f.tensors[g].shape[0]))]


def _unpermute(x: np.ndarray, g: str, spec: ArchSpec, meta: dict[str, Any]) -> np.ndarray:
    """Undo the Q/K row permutation of the converter (a no-op for tensors it does not touch)."""
    key = spec.permute.get(tensor_suffix(g))
    if key is None:
        return x
    perm = head_permutation(x.shape[0], int(meta[f"{spec.gguf_arch}.{key}"]))
    return x[inverse_permutation(perm)]


def _unshift(x: np.ndarray, g: str, spec: ArchSpec) -> np.ndarray:
    """Undo a constant the converter added to a tensor's values (gemma's 1 + w norms); a no-op for others."""
    shift = spec.value_shift.get(tensor_suffix(g))
    return x if shift is None else x - np.float32(shift)


def _write_weights(f: GGUFFile, spec: ArchSpec, meta: dict[str, Any], st_dtype: str, cast, path: Path) -> None:
    """model.safetensors, streamed one dequantized tensor at a time."""
    pairs = _hf_names(f, spec)
    entries = [(name, st_dtype, f.tensors[g].shape[1:] if e else f.tensors[g].shape)
               for g, hf in pairs for name, e in _weights(f, g, hf)]
    with SafetensorsWriter(path, entries, metadata={"format": "pt"}) as w:
        for g, hf in pairs:
            x = _unshift(_unpermute(f.dequantize(g), g, spec, meta), g, spec)
            for name, e in _weights(f, g, hf):
                w.write(name, cast(x[int(e)] if e else x))


def _config(f: GGUFFile, spec: ArchSpec, meta: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json from the hyperparameter table (inverted) plus the architecture's own extras."""
    arch = spec.gguf_arch
    cfg: dict[str, Any] = {"architectures": [spec.hf_architectures[0]], "model_type": spec.hf_model_type}
    for hp in spec.hparams:
        if f"{arch}.{hp.key}" in meta:
            v = meta[f"{arch}.{hp.key}"]
            cfg[hp.hf[0]] = shortest_f32(v) if hp.vtype == GGUFValueType.FLOAT32 else v
    cfg.setdefault("vocab_size", f.tensors["token_embd.weight"].ne[1])
    cfg.update(spec.export_config(meta, set(f.tensors)))
    cfg.update(spec.export_generated(meta, {g: f.dequantize(g) for g in spec.generated if g in f.tensors}))
    n_tokens = len(meta.get("tokenizer.ggml.tokens", []))
    ids = special_ids(meta, n_tokens)
    cfg.update({f"{t}_token_id": ids.get(t) for t in ("bos", "eos")})
    cfg["tie_word_embeddings"] = "output.weight" not in f.tensors
    cfg["torch_dtype"] = dtype
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in cfg.items()}


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: the special ids generation needs."""
    ids = special_ids(meta, len(meta.get("tokenizer.ggml.tokens", [])))
    out: dict[str, Any] = {f"{t}_token_id": ids[t] for t in ("bos", "eos", "pad") if t in ids}
    return {**out, "_from_model_config": False}


def export_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float16",
              overwrite: bool = False) -> Path:
    """Dequantize a .qf/.gguf into an HF folder (model.safetensors, config.json, tokenizer and generation config)."""
    if dtype not in DTYPES:
        raise ConvertError(f"unsupported export dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    refuse_folder_over_input(out_dir, [gguf_path], ConvertError)
    with atomic_folder(out_dir, overwrite) as tmp, open_gguf(gguf_path) as f:
        spec = _spec_for(f)
        _validate(f, os.fspath(gguf_path))
        meta = typed_meta(f, spec.gguf_arch)
        cfg = _config(f, spec, meta, dtype)  # before the weights: fails fast on what cannot be exported
        st_dtype, cast = DTYPES[dtype]
        _write_weights(f, spec, meta, st_dtype, cast, tmp / WEIGHTS_NAME)
        write_json(tmp / "config.json", cfg)
        write_json(tmp / "generation_config.json", _generation_config(meta))
        write_tokenizer_files(meta, tmp, cfg.get("max_position_embeddings") or 2048)
    return Path(out_dir)
