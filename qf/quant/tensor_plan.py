"""What a file-writing tool plans per output tensor, and the per-tensor write loop (shared by qconvert and
qquantize: qf.convert and qf.quant both depend on this module, never on each other)."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qf.format.ggml_types import GGMLType, tensor_bytes
from qf.format.values import DEFAULT_ALIGNMENT, GGUFValueType
from qf.format.writer import QFWriter

KV = tuple[str, Any, GGUFValueType]  # (full GGUF key, value, value type; for a list/array its element type)
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
CHUNK_ELEMENTS = 1 << 22  # rows are converted in chunks of about this many values (16 MiB of f32)
Progress = Callable[[int, int, str], None]  # (bytes written, total bytes, tensor name)
Producer = Callable[[], np.ndarray]  # a stored array made at write time (a payload member)


@dataclass
class PlannedTensor:
    """One output tensor: where its values come from and how it is stored."""

    name: str
    ne: tuple[int, ...]  # ggml order, ne[0] innermost
    type: GGMLType
    source: str | None = None  # HF tensor name; None for generated tensors
    permute_heads: int | None = None  # axis-0 rows reordered into this many heads
    data: np.ndarray | None = None  # generated values (f32), e.g. rope_freqs
    shift: float = 0.0  # constant added to the source values (gemma's 1 + w norms)
    importance: np.ndarray | None = None  # per-column weights for the quantizer (imatrix), f32 [ne0]
    parts: tuple[str, ...] = ()  # HF tensors stacked on a new outer axis (one per expert); source = parts[0]
    produce: Producer | None = None  # stored array made by an importer (payload members, transcoded weights)
    group: str = ""  # what the summary reports this tensor under (payload scheme or transcoding)
    payload: tuple[str, str] | None = None  # (logical weight name, scheme) when a payload member

    @property
    def nbytes(self) -> int:
        """Bytes in the output file (before alignment padding)."""
        return tensor_bytes(self.type, self.ne)

    @property
    def n_elements(self) -> int:
        """Number of values."""
        return int(np.prod(self.ne, dtype=np.int64))


@dataclass
class ConvertSummary:
    """What a conversion produced."""

    path: Path
    n_tensors: int
    n_params: int
    tensor_bytes: int
    file_bytes: int
    seconds: float
    types: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)  # per tensor group: what was written and why

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per value over all tensors."""
        return 8.0 * self.tensor_bytes / max(1, self.n_params)


Encoder = Callable[[PlannedTensor], np.ndarray]  # one tensor's stored bytes (u8 rows or a typed array)


def write_tensors(out_path: str | Path, kv: list[KV], tensors: list[PlannedTensor], encode: Encoder,
                  progress: Progress | None = None, alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Declare every key and tensor, then stream each tensor's encode() into an atomically written file."""
    total, done = sum(t.nbytes for t in tensors), 0
    with QFWriter(out_path, alignment) as w:
        for key, value, vtype in kv:
            w.add_kv(key, value, vtype)
        for t in tensors:
            w.add_tensor_info(t.name, t.ne, t.type)
        w.write_header()
        for t in tensors:
            w.write_tensor(t.name, encode(t))
            done += t.nbytes
            if progress is not None:
                progress(done, total, t.name)


def summarize(out_path: str | Path, tensors: list[PlannedTensor], t0: float,
              notes: list[str] | None = None) -> ConvertSummary:
    """What a finished write produced (t0: time.perf_counter() at the start)."""
    return ConvertSummary(
        path=Path(out_path), n_tensors=len(tensors), n_params=sum(t.n_elements for t in tensors),
        tensor_bytes=sum(t.nbytes for t in tensors), file_bytes=os.path.getsize(out_path),
        seconds=time.perf_counter() - t0, types=Counter(t.type.name for t in tensors), notes=list(notes or []),
    )
