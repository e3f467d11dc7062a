"""A .qf / .gguf file with quantized linears -> a quantized Hugging Face folder that transformers and vLLM load.

Layer linears (integer-group or FP8 payloads, or ggml Q4_0 / Q8_0, which are symmetric integer groups exactly) go
out in a layout of qf.convert.export_layouts; every other tensor (embeddings, lm_head, norms) dequantized to the
float dtype. Payloads go out bit for bit: importing the export (qconvert) gives back the same member tensors.
Written atomically, one tensor at a time (the file stays memory-mapped); every tensor is planned (and every
refusal raised) before the output is opened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qf.convert.export import (
    WEIGHTS_NAME, ExportSource, expert_weights, float_dtype, float_entries, hf_config, hf_names, open_source,
    write_float, write_side_files,
)
from qf.convert.export_layouts import SOURCE_LAYOUT, Layout, layout
from qf.convert.export_linears import LinearInfo, plan_linears, read_linear
from qf.convert.folder_io import atomic_folder
from qf.convert.safetensors_io import SafetensorsWriter
from qf.format.errors import ConvertError
from qf.format.output_guard import refuse_folder_over_input
from qf.format.reader import open_gguf
from qf.quant.formats import PAYLOAD_SOURCE_KEY

DEFAULT_LAYOUT = "compressed-tensors"
HEAD_MODULE = "lm_head"  # transformers' output projection module in every architecture qf exports


@dataclass
class ExportSummary:
    """What an export wrote: folder, layout, quantized linears by origin, tensors written as floats."""

    path: Path
    layout: str
    linears: dict[str, int]  # origin (scheme string or ggml type) -> count
    floats: int
    group_note: str


def default_layout(src: ExportSource) -> str:
    """The layout the file's payloads came from (qf.payload.source), else compressed-tensors."""
    return SOURCE_LAYOUT.get(str(src.meta.get(PAYLOAD_SOURCE_KEY, "")), DEFAULT_LAYOUT)


def _plan(src: ExportSource, lay: Layout) -> tuple[list[tuple[str, str]], dict[str, LinearInfo], list[str]]:
    """(GGUF, HF) name pairs, the quantized linears by GGUF name, and the HF modules left unquantized."""
    pairs = hf_names(src)
    infos = plan_linears(src, [g for g, _ in pairs])
    hf_of = dict(pairs)
    try:
        lay.check({hf_of[g]: i for g, i in infos.items()})
    except ConvertError as e:
        raise ConvertError(f"{src.path}: {e}") from None
    ignore = [hf[: -len(".weight")] for g, hf in pairs
              if g not in infos and hf.endswith(".weight") and len(src.ne(g)) >= 2 and "embed" not in hf]
    if HEAD_MODULE not in ignore:  # a tied head is still a Linear module that a "Linear" target would match
        ignore.insert(0, HEAD_MODULE)
    return pairs, infos, ignore


def _entries(src: ExportSource, lay: Layout, pairs: list[tuple[str, str]], infos: dict[str, LinearInfo],
             st_dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every safetensors declaration, in write order."""
    out = []
    for g, hf in pairs:
        out += lay.entries(hf, infos[g]) if g in infos else float_entries(src, [(g, hf)], st_dtype)
    return out


def _group_note(infos: dict[str, LinearInfo]) -> str:
    """How ggml blocks were read (their group size), for the summary."""
    groups = {i.params.group for i in infos.values() if not i.origin.startswith(("int;", "fp8;"))}
    if not groups:
        return ""
    g = groups.pop()
    return (f"ggml blocks read as symmetric groups of {g}" if g != 32 else
            "ggml blocks read as symmetric groups of 32 (their fp16 scales differ within every larger group)"
            ) if g != -1 else "ggml blocks read as one group per row (every scale of a row agrees)"


def export_quantized(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, fmt: str | None = None,
                     dtype: str = "float16", overwrite: bool = False, **layout_options: Any) -> ExportSummary:
    """Write the file's quantized linears in HF layout `fmt` (None: the layout its payloads came from, else
    compressed-tensors) and the rest as `dtype` floats, with config, tokenizer and generation config."""
    st_dtype, cast = float_dtype(dtype)
    refuse_folder_over_input(out_dir, [gguf_path], ConvertError)
    with open_gguf(gguf_path) as f:
        src = open_source(f, os.fspath(gguf_path))
        lay = layout(fmt or default_layout(src), **layout_options)
        pairs, infos, ignore = _plan(src, lay)
        if not infos:
            raise ConvertError(f"{src.path}: no quantized layer linears to export; use the float export "
                               "(qexport --format float)")
        cfg = hf_config(src, dtype)
        cfg["quantization_config"] = lay.config({hf: infos[g] for g, hf in pairs if g in infos}, ignore)
        entries = _entries(src, lay, pairs, infos, st_dtype)
        with atomic_folder(out_dir, overwrite) as tmp:
            with SafetensorsWriter(tmp / WEIGHTS_NAME, entries, metadata={"format": "pt"}) as w:
                for g, hf in pairs:
                    if g not in infos:
                        write_float(w, src, g, hf, cast)
                        continue
                    for name, arr in lay.tensors(hf, read_linear(src, g, infos[g])):
                        w.write(name, arr)
            write_side_files(src, tmp, cfg)
        n_float = sum(len(expert_weights(src, g, hf)) for g, hf in pairs if g not in infos)
    origins: dict[str, int] = {}
    for i in infos.values():
        origins[i.origin] = origins.get(i.origin, 0) + 1
    return ExportSummary(Path(out_dir), lay.name, origins, n_float, _group_note(infos))
