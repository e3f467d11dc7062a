"""Importance matrices (llama.cpp's imatrix files): read both formats, give each weight its column importance.

Two on-disk formats, as llama.cpp's common/imatrix-loader.cpp reads them (spec: ../shared formats.md):

- GGUF (llama-imatrix's default since 2025): `imatrix.datasets`, `imatrix.chunk_count`,
  `imatrix.chunk_size`, and per weight `<name>.in_sum2` F32 [n_mat, n_in] (sum of x^2 over the calibration
  tokens) with `<name>.counts` F32 [n_mat, 1]. Importance = in_sum2 / count per matrix (1 where count is 0).
- legacy `.dat` (little-endian): i32 n_entries; per entry {i32 len, name, i32 ncall, i32 nval,
  f32 values[nval]}; optional trailer {i32 chunk_count, i32 len, dataset}. Importance = values / ncall.

Both are hostile input: every length is checked against the file before it is used, and non-finite
values are refused (llama-quantize refuses them too).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qf.format.errors import FormatError
from qf.format.values import GGUFValueType

GGUF_MAGIC = b"GGUF"
SUMS, COUNTS = ".in_sum2", ".counts"
META_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
# What llama-quantize records in the output (tools/quantize/quantize.cpp): strings cut to 127 bytes.
KV_FILE, KV_DATASET = "quantize.imatrix.file", "quantize.imatrix.dataset"
KV_N_ENTRIES, KV_N_CHUNKS = "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"
KV_STR_MAX = 127
KV_KEYS = (KV_FILE, KV_DATASET, KV_N_ENTRIES, KV_N_CHUNKS)


@dataclass
class ImportanceMatrix:
    """Per-weight column importance: name -> f32 [n_mat, n_in] (n_mat > 1 only for stacked experts)."""

    path: str
    entries: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0

    def for_tensor(self, name: str, ne: tuple[int, ...]) -> np.ndarray | None:
        """Importance for a weight of ggml shape ne: f32 [ne0] (or [n_expert, ne0]); None when absent.

        A size that does not match is an error (the imatrix belongs to another model), except for
        token_embd, which llama-quantize skips with a warning for the same reason."""
        imp = self.entries.get(name)
        if imp is None:
            return None
        n_mat = ne[2] if len(ne) > 2 else 1
        if imp.shape != (n_mat, ne[0]):
            if name.startswith("token_embd"):
                return None
            raise FormatError(f"importance for {name} has {imp.size} values, the tensor needs {n_mat * ne[0]} "
                              "(is this imatrix from another model?)", path=self.path, field=name)
        return imp[0] if n_mat == 1 else imp

    def kv(self) -> list[tuple[str, str | int, GGUFValueType]]:
        """The quantize.imatrix.* keys llama-quantize writes for this file (strings cut to 127 bytes)."""
        cut = lambda s: s.encode("utf-8")[:KV_STR_MAX].decode("utf-8", "ignore")  # noqa: E731
        out: list[tuple[str, str | int, GGUFValueType]] = [(KV_FILE, cut(self.path), GGUFValueType.STRING)]
        if self.datasets:
            out.append((KV_DATASET, cut(self.datasets[0]), GGUFValueType.STRING))
        out.append((KV_N_ENTRIES, len(self.entries), GGUFValueType.UINT32))
        if self.chunk_count > 0:
            out.append((KV_N_CHUNKS, self.chunk_count, GGUFValueType.UINT32))
        return out


def _check_finite(m: ImportanceMatrix) -> None:
    """Refuse NaN / inf importance (it would silently poison the quantizer's weighted search)."""
    for name, v in m.entries.items():
        if not np.isfinite(v).all():
            raise FormatError("imatrix contains a non-finite value", path=m.path, field=name)


class _Reader:
    """Bounds-checked little-endian reads over a bytes object."""

    def __init__(self, data: bytes, path: str) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError(f"truncated: {what} needs {n} bytes at offset {self.pos}, the file has "
                              f"{len(self.data) - self.pos} left", path=self.path, field=what, offset=self.pos)
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _load_legacy(path: str, data: bytes) -> ImportanceMatrix:
    """The .dat format: values / ncall per entry, then the optional chunk count and dataset trailer."""
    r, m = _Reader(data, path), ImportanceMatrix(path)
    n = r.i32("n_entries")
    if n < 1:
        raise FormatError(f"no entries (n_entries = {n})", path=path, field="n_entries", offset=0)
    for i in range(n):
        name = r.take(r.i32(f"entry {i} name length"), f"entry {i} name").decode("utf-8", "replace")
        ncall, nval = r.i32(f"{name} ncall"), r.i32(f"{name} nval")
        if nval < 1:
            raise FormatError(f"entry {name!r} has {nval} values", path=path, field=name, offset=r.pos)
        if name in m.entries:
            raise FormatError(f"entry {name!r} appears twice", path=path, field=name, offset=r.pos)
        v = np.frombuffer(r.take(4 * nval, f"{name} values"), dtype="<f4").astype(np.float32)
        m.entries[name] = (v / np.float32(ncall) if ncall > 0 else v).reshape(1, nval)
    if r.pos + 4 <= len(data):
        m.chunk_count = r.i32("chunk_count")
        if r.pos + 4 <= len(data):
            ln = r.i32("dataset length")
            if 0 < ln <= len(data) - r.pos:
                m.datasets.append(r.take(ln, "dataset").decode("utf-8", "replace"))
    return m


def _load_gguf(path: str) -> ImportanceMatrix:
    """The GGUF format: per weight in_sum2 / counts, per stacked matrix."""
    from qf.format.reader import open_gguf

    m = ImportanceMatrix(path)
    with open_gguf(path) as f:
        if not all(k in f.meta for k in META_KEYS):
            missing = [k for k in META_KEYS if k not in f.meta]
            raise FormatError(f"not an imatrix file: missing {', '.join(missing)}", path=path)
        m.datasets = [str(s) for s in f.meta.raw("imatrix.datasets")[1]]
        m.chunk_count = int(f.meta.get_int("imatrix.chunk_count"))
        names = {n[:-len(SUMS)] for n in f.tensors if n.endswith(SUMS)}
        names |= {n[:-len(COUNTS)] for n in f.tensors if n.endswith(COUNTS)}
        for name in sorted(names):
            m.entries[name] = _gguf_entry(f, name, path)
    if not m.entries:
        raise FormatError("no importance entries (no <name>.in_sum2 tensors)", path=path)
    return m


def _gguf_entry(f, name: str, path: str) -> np.ndarray:
    """in_sum2 / counts of one weight: f32 [n_mat, n_in]."""
    s, c = f.tensors.get(name + SUMS), f.tensors.get(name + COUNTS)
    if s is None or c is None:
        raise FormatError(f"{name}: {SUMS} and {COUNTS} must both be present", path=path, field=name)
    if s.type.name != "F32" or c.type.name != "F32":
        raise FormatError(f"{name}: {SUMS} and {COUNTS} must be F32", path=path, field=name)
    sums = f.dequantize(name + SUMS).reshape(-1)
    counts = f.dequantize(name + COUNTS).reshape(-1)
    if counts.size < 1 or sums.size % counts.size:
        raise FormatError(f"{name}: {sums.size} sums do not split into {counts.size} matrices", path=path, field=name)
    sums = sums.reshape(counts.size, -1)  # [n_mat, n_in]
    with np.errstate(divide="ignore", invalid="ignore"):
        imp = np.where(counts[:, None] > 0, sums / counts[:, None].astype(np.float32), np.float32(1.0))
    return imp.astype(np.float32)


def load_imatrix(path: str | os.PathLike) -> ImportanceMatrix:
    """Read an imatrix file (GGUF or legacy .dat); FormatError on anything malformed."""
    path = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FormatError(f"cannot read imatrix file: {e.strerror or e}", path=path) from None
    m = _load_gguf(path) if data[:4] == GGUF_MAGIC else _load_legacy(path, data)
    _check_finite(m)
    return m


def write_imatrix(path: str | os.PathLike, sums: dict[str, np.ndarray], counts: dict[str, int],
                  datasets: list[str], chunk_count: int, chunk_size: int) -> Path:
    """Write the GGUF imatrix format (as llama-imatrix does): per weight in_sum2 [1, n_in] and counts [1, 1]."""
    from qf.format.ggml_types import GGMLType
    from qf.format.writer import QFWriter

    with QFWriter(path, checksums=False) as w:
        w.add_kv("general.type", "imatrix")
        w.add_kv("imatrix.datasets", list(datasets), GGUFValueType.ARRAY, elem_type=GGUFValueType.STRING)
        w.add_kv("imatrix.chunk_count", int(chunk_count), GGUFValueType.UINT32)
        w.add_kv("imatrix.chunk_size", int(chunk_size), GGUFValueType.UINT32)
        names = sorted(sums)
        for n in names:
            w.add_tensor_info(n + SUMS, ne=(sums[n].size, 1), type=GGMLType.F32)
            w.add_tensor_info(n + COUNTS, ne=(1, 1), type=GGMLType.F32)
        for n in names:
            w.write_tensor(n + SUMS, np.asarray(sums[n], np.float32).reshape(1, -1))
            w.write_tensor(n + COUNTS, np.array([[counts[n]]], np.float32))
    return Path(path)
