"""Validated, memory-mapped safetensors reading (zero-copy) and a streaming safetensors writer."""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qf.format.errors import FormatError

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors reference implementation enforces
HEADER_LEN_BYTES = 8  # u64 little-endian header length
METADATA_KEY = "__metadata__"

# safetensors dtype name -> numpy storage dtype (BF16 and FP8 are kept as raw bits).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bits: u16 [...] (bfloat16 patterns) -> f32 [...], exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """x: f32 [...] -> u16 [...] bfloat16 patterns, round to nearest even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (u >> 16) | np.uint32(0x40), rounded).astype(np.uint16)


# dtype name -> f32 decoder of the stored array (the table FLOAT_DTYPES promises).
_TO_F32 = {
    "F32": lambda a: a.astype(np.float32, copy=False),
    "F16": lambda a: a.astype(np.float32),
    "F64": lambda a: a.astype(np.float32),
    "BF16": bf16_bits_to_f32,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: dtype name, numpy shape, absolute byte range [start, end)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.end - self.start


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: duplicate keys are an error, not last-one-wins."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    """A JSON object repeats a key."""


def _parse_header(raw: bytes, path: Path) -> dict[str, Any]:
    """UTF-8 JSON object with unique keys, else FormatError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"header is not valid UTF-8 ({e.reason})", path=path, field="header",
                          offset=HEADER_LEN_BYTES + e.start) from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise FormatError(f"duplicate key {e.args[0]!r} in header", path=path, field="header") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, the 4300-digit integer limit, deep nesting
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise FormatError(f"header is not valid JSON: {reason}", path=path, field="header") from None
    if not isinstance(obj, dict):
        raise FormatError("header is not a JSON object", path=path, field="header")
    return obj


def _is_int(v: Any) -> bool:
    """A JSON integer (bool is not one)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(name: str, spec: Any, base: int, path: Path) -> TensorEntry:
    """One header entry -> TensorEntry, checking dtype, shape, offsets and size."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise FormatError("entry must have exactly dtype, shape, data_offsets", path=path, field=name)
    dtype, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPES:
        raise FormatError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}", path=path, field=name)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"shape {shape!r} is not a list of non-negative integers", path=path, field=name)
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)):
        raise FormatError(f"data_offsets {offs!r} is not [begin, end]", path=path, field=name)
    begin, end = offs
    if end < begin:
        raise FormatError(f"data_offsets reversed: end {end} < begin {begin}", path=path, field=name,
                          offset=base + begin)
    n = 1
    for d in shape:
        n *= d
    need = n * DTYPES[dtype].itemsize
    if end - begin != need:
        raise FormatError(f"{dtype} {shape} needs {need} bytes, data_offsets span {end - begin}",
                          path=path, field=name, offset=base + begin)
    return TensorEntry(name, dtype, tuple(shape), base + begin, base + end)


def _check_layout(entries: list[TensorEntry], base: int, file_size: int, path: Path) -> None:
    """Tensors tile the data section exactly: no gap, no overlap, no trailing or missing bytes."""
    pos = base
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start > pos:
            raise FormatError(f"gap of {e.start - pos} bytes before tensor", path=path, field=e.name, offset=pos)
        if e.start < pos:
            raise FormatError(f"tensor overlaps the previous one by {pos - e.start} bytes", path=path,
                              field=e.name, offset=e.start)
        pos = e.end
    if pos > file_size:
        raise FormatError(f"corrupted or incomplete: need {pos} bytes, have {file_size}", path=path,
                          field="data", offset=file_size)
    if pos < file_size:
        raise FormatError(f"{file_size - pos} trailing bytes after the last tensor", path=path,
                          field="data", offset=pos)


def read_header(path: Path, fd: int, file_size: int) -> tuple[int, dict[str, Any]]:
    """Validate the length prefix and read the JSON header -> (data start, header dict)."""
    if file_size < HEADER_LEN_BYTES:
        raise FormatError(f"file of {file_size} bytes is too short for a safetensors header", path=path,
                          field="header_len", offset=0)
    (n,) = struct.unpack("<Q", os.pread(fd, HEADER_LEN_BYTES, 0))
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"header length {n} exceeds the limit {MAX_HEADER_BYTES}", path=path,
                          field="header_len", offset=0)
    if HEADER_LEN_BYTES + n > file_size:
        raise FormatError(f"header length {n} runs past the end of the {file_size}-byte file", path=path,
                          field="header_len", offset=0)
    raw = os.pread(fd, n, HEADER_LEN_BYTES)
    if len(raw) != n:
        raise FormatError(f"short read of header: {len(raw)} of {n} bytes", path=path, field="header")
    return HEADER_LEN_BYTES + n, _parse_header(raw, path)


class SafetensorsFile:
    """One validated safetensors file, memory-mapped; tensors come back as read-only views."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror}", path=self.path) from None
        try:
            size = os.fstat(fd).st_size
            base, header = read_header(self.path, fd, size)
            meta = header.pop(METADATA_KEY, {})
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise FormatError("__metadata__ must map strings to strings", path=self.path, field=METADATA_KEY)
            self.metadata: dict[str, str] = meta
            self._entries = {k: _parse_entry(k, v, base, self.path) for k, v in header.items()}
            _check_layout(list(self._entries.values()), base, size, self.path)
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size > base else None
        finally:
            os.close(fd)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TensorEntry:
        """The header entry of a tensor."""
        try:
            return self._entries[name]
        except KeyError:
            raise FormatError("no such tensor", path=self.path, field=name) from None

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy read-only view in the stored dtype (BF16 as u16 bits), numpy shape."""
        e = self.entry(name)
        dt = DTYPES[e.dtype]
        if e.nbytes == 0 or self._mm is None:
            return np.zeros(e.shape, dtype=dt)
        return np.frombuffer(self._mm, dtype=dt, count=e.nbytes // dt.itemsize, offset=e.start).reshape(e.shape)

    def to_f32(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """A float tensor (or the rows selected on axis 0) as f32; bf16 is widened without torch."""
        e = self.entry(name)
        if e.dtype not in _TO_F32:
            raise FormatError(f"dtype {e.dtype} is not a float type ({', '.join(FLOAT_DTYPES)})",
                              path=self.path, field=name)
        a = self.raw(name)
        if rows is not None:
            a = a[rows]
        return _TO_F32[e.dtype](a)

    def release(self, name: str) -> None:
        """Drop this tensor's pages from our resident set (they stay in the page cache)."""
        e = self.entry(name)
        if self._mm is None or e.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = e.start // page * page
        self._mm.madvise(mmap.MADV_DONTNEED, start, e.end - start)

    def close(self) -> None:
        """Unmap (deferred to garbage collection while views are still alive)."""
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """JSON header for tensors laid out in the given order, space-padded to 8 bytes."""
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    pos = 0
    for name, dtype, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-(len(raw) + HEADER_LEN_BYTES) % 8)


class SafetensorsWriter:
    """Streams tensors into a safetensors file: the header first, then each tensor in declared order."""

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        for name, dtype, _ in entries:
            if dtype not in DTYPES:
                raise ValueError(f"unknown safetensors dtype {dtype!r} for {name}")
        self.path = Path(path)
        self._entries = list(entries)
        self._next = 0
        header = _header_bytes(entries, metadata)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(header)) + header)

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor; name, dtype size and shape must match the declaration."""
        exp_name, dtype, shape = self._entries[self._next] if self._next < len(self._entries) else (None, None, None)
        if exp_name != name:
            raise ValueError(f"tensor {name!r} written out of order (expected {exp_name!r})")
        a = np.ascontiguousarray(array)
        if a.shape != tuple(shape) or a.dtype.itemsize != DTYPES[dtype].itemsize:
            raise ValueError(f"{name}: got {a.dtype}{list(a.shape)}, declared {dtype}{list(shape)}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        self._f.write(memoryview(a.reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        """Check every declared tensor was written, flush and close."""
        left = self._entries[self._next] if self._next < len(self._entries) else None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if left is not None:
            raise ValueError(f"tensor {left[0]!r} was declared but never written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
