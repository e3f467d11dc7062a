"""Streaming, atomic GGUF v3 writer with per-tensor CRC-32 checksums.

State machine (as gguf-py's GGUFWriter): add_kv / add_tensor_info -> write_header -> write_tensor
(in info order) -> finish. Bytes go to a temp file in the destination folder; finish() patches the
checksum array reserved in the header, fsyncs and renames onto the final path; abort() (or leaving a
`with` block by an exception) removes the temp file and leaves any existing output untouched.
"""

from __future__ import annotations

import os
import secrets
import struct
import weakref
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from qf.format.checksum import ALGORITHM, ALGORITHM_KEY, CRC_KEY, RESERVED_KEYS, TABLE_KEY, crc32, tensor_table_crc
from qf.format.errors import FormatError
from qf.format.ggml_types import BLOCK, GGMLType
from qf.format.values import (
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, DTYPE_TO_VTYPE, GGUF_MAGIC, GGUF_VERSION, INT64_MAX,
    INTEGER_TYPES, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_DIMS, MAX_STRING_LEN,
    MAX_TENSOR_NAME, SCALAR, GGUFValueType, dtype_key,
)

V = GGUFValueType
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PARTIAL_SUFFIX = ".partial"

# Typed numpy arrays write_tensor accepts for plain (non-block) ggml types; u8/i8 raw bytes are
# accepted for every type. BF16 has no numpy dtype: pass its bit patterns as uint16.
PLAIN_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.F32: np.dtype("<f4"), GGMLType.F16: np.dtype("<f2"), GGMLType.BF16: np.dtype("<u2"),
    GGMLType.F64: np.dtype("<f8"), GGMLType.I8: np.dtype("<i1"), GGMLType.I16: np.dtype("<i2"),
    GGMLType.I32: np.dtype("<i4"), GGMLType.I64: np.dtype("<i8"),
}
_RAW_DTYPES = (np.dtype("u1"), np.dtype("i1"))


def _pad(n: int, alignment: int) -> int:
    """n rounded up to a multiple of alignment (GGML_PAD)."""
    return -(-n // alignment) * alignment


# ---------------------------------------------------------------------------------------------
# Value encoding
# ---------------------------------------------------------------------------------------------

class _ValueError(Exception):
    """Raised by the encoders; QFWriter turns it into a FormatError naming the key."""


def _int_vtype(lo: int, hi: int) -> GGUFValueType:
    """Value type for Python ints in [lo, hi]: UINT32, else INT32, else INT64, else UINT64."""
    if 0 <= lo and hi < 1 << 32:
        return V.UINT32
    if -(1 << 31) <= lo and hi < 1 << 31:
        return V.INT32
    if -(1 << 63) <= lo and hi <= INT64_MAX:
        return V.INT64
    if 0 <= lo and hi < 1 << 64:
        return V.UINT64
    raise _ValueError(f"integer {hi if hi > 0 else lo} does not fit in 64 bits")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _array_dtype_vtype(a: np.ndarray) -> GGUFValueType:
    """Element type of a numpy array from its dtype."""
    if a.dtype.kind in "USO":
        return V.STRING
    vt = DTYPE_TO_VTYPE.get(dtype_key(a.dtype))
    if vt is None:
        raise _ValueError(f"numpy dtype {a.dtype} has no GGUF value type")
    return vt


def _list_elem_vtype(values: list | tuple) -> GGUFValueType:
    """Element type of a Python sequence from its contents."""
    if not values:
        raise _ValueError("cannot infer the element type of an empty array: pass vtype")
    if all(isinstance(v, (str, bytes)) for v in values):
        return V.STRING
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return V.BOOL
    if all(_is_int(v) for v in values):
        return _int_vtype(int(min(values)), int(max(values)))
    if all(_is_int(v) or isinstance(v, (float, np.floating)) for v in values):
        return V.FLOAT32
    if all(isinstance(v, (list, tuple, np.ndarray)) for v in values):
        return V.ARRAY
    raise _ValueError("array elements are of mixed or unsupported types")


def infer_vtype(value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    """(value type, element type) for a Python/numpy value: bool->BOOL, int->UINT32/INT32/INT64,
    float->FLOAT32, str->STRING, sequences->ARRAY (numpy scalars keep their dtype)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise _ValueError(f"arrays must be 1-D, got shape {value.shape}")
        return V.ARRAY, _array_dtype_vtype(value)
    if isinstance(value, np.generic):
        return _array_dtype_vtype(np.asarray(value)), None
    if isinstance(value, bool):
        return V.BOOL, None
    if isinstance(value, int):
        return _int_vtype(value, value), None
    if isinstance(value, float):
        return V.FLOAT32, None
    if isinstance(value, (str, bytes)):
        return V.STRING, None
    if isinstance(value, (list, tuple)):
        return V.ARRAY, _list_elem_vtype(value)
    raise _ValueError(f"cannot store a {type(value).__name__} as a GGUF value")


def _encode_string(v: Any) -> bytes:
    """u64 length + UTF-8 bytes (surrogate escapes from the reader round-trip)."""
    if isinstance(v, str):
        v = v.encode("utf-8", "surrogateescape")
    elif not isinstance(v, bytes):
        raise _ValueError(f"expected str, got {type(v).__name__}")
    if len(v) > MAX_STRING_LEN:
        raise _ValueError(f"string of {len(v)} bytes exceeds the limit of {MAX_STRING_LEN}")
    return _U64.pack(len(v)) + v


def _encode_scalar(v: Any, vtype: GGUFValueType) -> bytes:
    """One fixed-size value, range- and kind-checked (never silently truncated)."""
    if vtype is V.BOOL:
        if not isinstance(v, (bool, np.bool_)):
            raise _ValueError(f"expected bool for BOOL, got {type(v).__name__}")
        return b"\x01" if v else b"\x00"
    if vtype in INTEGER_TYPES and not _is_int(v):
        raise _ValueError(f"expected an integer for {vtype.name}, got {type(v).__name__}")
    if not (_is_int(v) or isinstance(v, (float, np.floating))) or isinstance(v, (bool, np.bool_)):
        raise _ValueError(f"expected a number for {vtype.name}, got {type(v).__name__}")
    try:
        return struct.pack("<" + SCALAR[vtype][0], v.item() if isinstance(v, np.generic) else v)
    except (struct.error, OverflowError) as e:
        raise _ValueError(f"{v!r} does not fit in {vtype.name}: {e}") from None


def _numeric_array_bytes(values: Any, elem: GGUFValueType) -> bytes:
    """Packed little-endian elements of a numeric array, range- and kind-checked."""
    dt = SCALAR[elem][1]
    a = np.asarray(values)
    if a.size == 0:
        return b""
    if a.ndim != 1:
        raise _ValueError(f"arrays must be 1-D, got shape {a.shape}")
    if elem is V.BOOL:
        if a.dtype.kind != "b":
            raise _ValueError(f"expected bools for BOOL array, got {a.dtype}")
        return a.astype(dt).tobytes()
    if elem in INTEGER_TYPES:
        if a.dtype.kind not in "iu":
            raise _ValueError(f"expected integers for {elem.name} array, got {a.dtype}")
        info = np.iinfo(dt)
        if int(a.min()) < info.min or int(a.max()) > info.max:
            raise _ValueError(f"values in [{int(a.min())}, {int(a.max())}] do not fit in {elem.name}")
    elif a.dtype.kind not in "iuf":
        raise _ValueError(f"expected numbers for {elem.name} array, got {a.dtype}")
    return a.astype(dt).tobytes()


def _encode_array(values: Any, elem: GGUFValueType | None, depth: int = 1) -> bytes:
    """u32 element type + u64 count + elements."""
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise _ValueError(f"arrays must be 1-D, got shape {values.shape}")
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise _ValueError(f"expected a sequence for ARRAY, got {type(values).__name__}")
    if elem is None:
        elem = infer_vtype(values)[1]
    n = len(values)
    if n > MAX_ARRAY_LEN:
        raise _ValueError(f"array of {n} elements exceeds the limit of {MAX_ARRAY_LEN}")
    head = _U32.pack(elem) + _U64.pack(n)
    if elem in SCALAR:
        return head + _numeric_array_bytes(values, elem)
    if elem is V.STRING:
        return head + b"".join(_encode_string(s) for s in values)
    if depth >= MAX_ARRAY_DEPTH:
        raise _ValueError(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
    return head + b"".join(_encode_array(v, None, depth + 1) for v in values)


def encode_value(value: Any, vtype: GGUFValueType | None = None,
                 elem_type: GGUFValueType | None = None) -> tuple[GGUFValueType, bytes]:
    """(value type, encoded value without the type tag); vtype/elem_type inferred when None.

    A scalar vtype given with a sequence value is taken as the element type.
    """
    if vtype is None:
        vtype, inferred = infer_vtype(value)
        elem_type = elem_type if elem_type is not None else inferred
    vtype = V(vtype)
    if vtype is not V.ARRAY and isinstance(value, (list, tuple, np.ndarray)):
        vtype, elem_type = V.ARRAY, vtype
    if vtype is V.ARRAY:
        return vtype, _encode_array(value, None if elem_type is None else V(elem_type))
    if vtype is V.STRING:
        return vtype, _encode_string(value)
    return vtype, _encode_scalar(value, vtype)


# ---------------------------------------------------------------------------------------------
# Temp files
# ---------------------------------------------------------------------------------------------

def _partial_prefix(path: str) -> str:
    """Temp files of path are '.<name>.<pid>.<random>.partial' in the same folder."""
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.")


def pid_alive(pid: int) -> bool:
    """Whether a process still exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_partials(path: str) -> list[str]:
    """Delete temp files left for path by writers whose process is gone (e.g. SIGKILL); return them."""
    d = os.path.dirname(path) or "."
    base = os.path.basename(_partial_prefix(path))
    removed = []
    for entry in os.listdir(d):
        parts = entry[len(base):].split(".")
        if not (entry.startswith(base) and entry.endswith(_PARTIAL_SUFFIX) and len(parts) == 3):
            continue
        if parts[0].isdigit() and not pid_alive(int(parts[0])):
            try:
                os.unlink(os.path.join(d, entry))
                removed.append(os.path.join(d, entry))
            except OSError:
                pass
    return removed


def _cleanup(fh: list[BinaryIO | None], tmp: str) -> None:
    """Close the temp file and delete it (finalizer and abort path)."""
    if fh[0] is not None:
        try:
            fh[0].close()
        finally:
            fh[0] = None
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _fsync_dir(d: str) -> None:
    """Persist a rename (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(d or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _PendingTensor:
    """A declared tensor: name, type, ggml shape, size in bytes, offset relative to the data start."""

    name: str
    type: GGMLType
    ne: tuple[int, ...]
    nbytes: int
    rel_offset: int


class QFWriter:
    """Writes one GGUF v3 file atomically: header, then tensors streamed in declaration order."""

    def __init__(self, path: str | os.PathLike, alignment: int = DEFAULT_ALIGNMENT, *, checksums: bool = True) -> None:
        self.path = os.fspath(path)
        if not (0 < alignment <= MAX_ALIGNMENT and alignment & (alignment - 1) == 0):
            raise self._error(f"alignment {alignment} is not a power of two in [1, {MAX_ALIGNMENT}]", ALIGNMENT_KEY)
        if os.path.isdir(self.path):
            raise self._error("output path is a folder")
        if not os.path.isdir(os.path.dirname(self.path) or "."):
            raise self._error("output folder does not exist")
        self.alignment = alignment
        self.checksums = checksums
        self._kv: dict[str, bytes] = {}  # key -> u32 type tag + encoded value
        self._tensors: list[_PendingTensor] = []
        self._names: set[str] = set()
        self._data_size = 0  # running sum of padded sizes
        self._state = "adding"  # adding -> writing -> done | aborted
        self._fh: list[BinaryIO | None] = [None]
        self._tmp: str | None = None
        self._finalizer: weakref.finalize | None = None
        self._next = 0
        self._crcs: list[int] = []
        self._crc_at = -1  # file offset of the reserved checksum array data

    # -- errors and state --
    def _error(self, msg: str, field: str | None = None) -> FormatError:
        return FormatError(msg, path=self.path, field=field)

    def _expect(self, state: str, action: str) -> None:
        if self._state != state:
            raise self._error(f"cannot {action}: writer is {self._state}")

    def __enter__(self) -> "QFWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state not in ("done", "aborted"):
            try:
                self.finish()
            except BaseException:
                self.abort()
                raise

    # -- declaring --
    def add_kv(self, key: str, value: Any, vtype: GGUFValueType | None = None, *,
               elem_type: GGUFValueType | None = None) -> None:
        """Add one key-value pair; vtype (and array elem_type) inferred from value when omitted."""
        self._expect("adding", f"add key {key!r}")
        if not isinstance(key, str) or not key:
            raise self._error("keys must be non-empty strings", repr(key))
        if key in RESERVED_KEYS or key == ALIGNMENT_KEY:
            raise self._error("reserved key: set by the writer (pass alignment= to QFWriter)", key)
        if key in self._kv:
            raise self._error("duplicate key", key)
        try:
            vt, payload = encode_value(value, vtype, elem_type)
        except (_ValueError, ValueError) as e:
            raise self._error(str(e), key) from None
        self._kv[key] = _U32.pack(vt) + payload

    def add_tensor_info(self, name: str, ne: tuple[int, ...] | list[int], type: GGMLType) -> None:
        """Declare a tensor (ggml shape ne, ne[0] innermost); its data must follow in this order."""
        self._expect("adding", f"add tensor {name!r}")
        raw = name.encode("utf-8") if isinstance(name, str) else b""
        if not raw or len(raw) >= MAX_TENSOR_NAME:
            raise self._error(f"tensor names must be 1..{MAX_TENSOR_NAME - 1} UTF-8 bytes", repr(name))
        if name in self._names:
            raise self._error("duplicate tensor name", name)
        try:
            gt = GGMLType(type)
            bs, ts = BLOCK[gt]
        except (ValueError, KeyError):
            raise self._error(f"unknown ggml type {type!r}", name) from None
        ne = tuple(int(d) for d in ne)
        if not 1 <= len(ne) <= MAX_DIMS or any(d < 0 for d in ne):
            raise self._error(f"shape {ne} must have 1..{MAX_DIMS} non-negative dims", name)
        if ne[0] % bs:
            raise self._error(f"row of {ne[0]} elements is not a whole number of {gt.name} blocks of {bs}", name)
        n_rows = 1
        for d in ne[1:]:
            n_rows *= d
        if n_rows * ne[0] > INT64_MAX:
            raise self._error(f"shape {ne} has more than INT64_MAX elements", name)
        nbytes = ne[0] // bs * ts * n_rows
        self._tensors.append(_PendingTensor(name, gt, ne, nbytes, self._data_size))
        self._names.add(name)
        self._data_size += _pad(nbytes, self.alignment)

    # -- writing --
    def _all_kvs(self) -> list[tuple[str, bytes]]:
        """User KVs plus the writer's own (alignment first, checksums last)."""
        kvs = []
        if self.alignment != DEFAULT_ALIGNMENT:
            kvs.append((ALIGNMENT_KEY, _U32.pack(V.UINT32) + _U32.pack(self.alignment)))
        kvs.extend(self._kv.items())
        if self.checksums:
            kvs.append((ALGORITHM_KEY, _U32.pack(V.STRING) + _encode_string(ALGORITHM)))
            table = tensor_table_crc((t.name, t.ne, t.type, t.rel_offset) for t in self._tensors)
            kvs.append((TABLE_KEY, _U32.pack(V.UINT32) + _U32.pack(table)))
            reserved = np.zeros(len(self._tensors), dtype="<u4")
            kvs.append((CRC_KEY, _U32.pack(V.ARRAY) + _encode_array(reserved, V.UINT32)))
        return kvs

    def _header_bytes(self) -> bytes:
        """Magic, version, counts, KVs (recording where the CRC array lands), tensor infos, padding."""
        kvs = self._all_kvs()
        out = bytearray(GGUF_MAGIC + _U32.pack(GGUF_VERSION) + _U64.pack(len(self._tensors)) + _U64.pack(len(kvs)))
        for key, payload in kvs:
            out += _encode_string(key)
            if key == CRC_KEY:
                self._crc_at = len(out) + 4 + 4 + 8  # after type tag, element type and count
            out += payload
        for t in self._tensors:
            out += _encode_string(t.name) + _U32.pack(len(t.ne))
            out += b"".join(struct.pack("<q", d) for d in t.ne)
            out += _U32.pack(t.type) + _U64.pack(t.rel_offset)
        out += bytes(_pad(len(out), self.alignment) - len(out))
        return bytes(out)

    def write_header(self) -> None:
        """Open the temp file and write everything before the tensor data."""
        self._expect("adding", "write the header")
        remove_stale_partials(self.path)
        tmp = f"{_partial_prefix(self.path)}{os.getpid()}.{secrets.token_hex(4)}{_PARTIAL_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        self._tmp = tmp
        self._fh[0] = os.fdopen(fd, "wb")
        self._finalizer = weakref.finalize(self, _cleanup, self._fh, tmp)
        self._state = "writing"
        self._fh[0].write(self._header_bytes())

    def _tensor_buffer(self, t: _PendingTensor, data: Any) -> memoryview:
        """The bytes of data for tensor t, checked against its type and size."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            buf = memoryview(data).cast("B")
        else:
            a = np.asarray(data)
            want = PLAIN_DTYPES.get(t.type)
            if a.dtype.newbyteorder("<") not in _RAW_DTYPES and (want is None or a.dtype.newbyteorder("<") != want):
                allowed = "uint8" if want is None else f"uint8 or {want}"
                raise self._error(f"{t.type.name} data must be {allowed}, got {a.dtype}", t.name)
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
            buf = memoryview(a.reshape(-1).view(np.uint8))
        if buf.nbytes != t.nbytes:
            raise self._error(f"{buf.nbytes} bytes given, {t.type.name} {t.ne} needs {t.nbytes}", t.name)
        return buf

    def write_tensor(self, name: str, data: Any) -> None:
        """Write the next tensor's bytes (u8 blocks or a typed array for plain types) plus padding."""
        if self._state == "adding":
            self.write_header()
        self._expect("writing", f"write tensor {name!r}")
        if self._next >= len(self._tensors):
            raise self._error("all declared tensors are already written", name)
        t = self._tensors[self._next]
        if name != t.name:
            raise self._error(f"tensors must be written in declaration order: expected {t.name!r}", name)
        buf = self._tensor_buffer(t, data)
        fh = self._fh[0]
        fh.write(buf)
        fh.write(bytes(_pad(t.nbytes, self.alignment) - t.nbytes))
        self._crcs.append(crc32(buf))
        self._next += 1

    def finish(self) -> None:
        """Check all tensors were written, patch the checksums, fsync and rename onto the final path."""
        if self._state == "adding":
            self.write_header()
        self._expect("writing", "finish")
        if self._next != len(self._tensors):
            missing = [t.name for t in self._tensors[self._next:]]
            raise self._error(f"{len(missing)} declared tensors not written: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""), missing[0])
        fh = self._fh[0]
        if self.checksums:
            fh.seek(self._crc_at)
            fh.write(np.asarray(self._crcs, dtype="<u4").tobytes())
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        self._fh[0] = None
        os.replace(self._tmp, self.path)
        self._finalizer.detach()
        self._state = "done"
        _fsync_dir(os.path.dirname(self.path))

    def abort(self) -> None:
        """Discard the temp file; an existing file at the final path is left as it was."""
        if self._state == "done":
            return
        if self._finalizer is not None:
            self._finalizer()
        self._state = "aborted"
