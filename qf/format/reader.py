"""GGUF v2/v3 reader: validates the whole header against hostile input, then serves tensors from an mmap.

Mirrors the checks of llama.cpp's ggml/src/gguf.cpp (gguf_init_from_file_impl) and the data-range
check of src/llama-model-loader.cpp; every failure is a FormatError naming file, field and offset.

Beyond llama.cpp: only regular files are opened (a FIFO or device would block or misbehave), and the
decoded metadata has a budget (MetadataLimits: values and estimated Python memory; defaults in
qf.format.values, raised with $QF_MAX_METADATA_VALUES / $QF_MAX_METADATA_MIB or open_gguf(limits=...)).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from qf.format.checksum import CRC_KEY, TABLE_KEY, crc32, tensor_table_crc
from qf.format.errors import FormatError, QFError
from qf.format.ggml_types import BLOCK, GGMLType
from qf.format.values import (
    ALIGNMENT_KEY, COST_KV, COST_LIST, COST_NDARRAY, COST_STR, COST_TENSOR, DEFAULT_ALIGNMENT, ENV_MAX_METADATA_MIB,
    ENV_MAX_METADATA_VALUES, FLOAT_TYPES, GGUF_MAGIC, INT64_MAX, INTEGER_TYPES, MAX_ALIGNMENT, MAX_ARRAY_DEPTH,
    MAX_ARRAY_LEN, MAX_DIMS, MAX_METADATA_BYTES, MAX_METADATA_VALUES, MAX_STRING_LEN, MAX_TENSOR_NAME,
    MIN_SIZE, SCALAR, SUPPORTED_VERSIONS, GGUFValueType,
)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_SCALAR_STRUCT = {t: struct.Struct("<" + code) for t, (code, _) in SCALAR.items()}
_HEADER_SIZE = 4 + 4 + 8 + 8  # magic, version, n_tensors, n_kv
_MIN_KV_SIZE = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MISSING = object()


def _pad(n: int, alignment: int) -> int:
    """n rounded up to a multiple of alignment (GGML_PAD)."""
    return -(-n // alignment) * alignment


def _env_limit(name: str, default: int, scale: int = 1) -> int:
    """A positive integer from environment variable name (times scale), or default when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if v <= 0:
        raise QFError(f"${name}: expected a positive integer, got {raw!r}")
    return v * scale


class MetadataLimits(NamedTuple):
    """Budget for decoded metadata: Python objects (values) and their estimated memory (bytes)."""

    max_values: int = MAX_METADATA_VALUES
    max_bytes: int = MAX_METADATA_BYTES

    @classmethod
    def from_env(cls) -> "MetadataLimits":
        """The defaults, overridden by $QF_MAX_METADATA_VALUES and $QF_MAX_METADATA_MIB (MiB)."""
        return cls(_env_limit(ENV_MAX_METADATA_VALUES, MAX_METADATA_VALUES),
                   _env_limit(ENV_MAX_METADATA_MIB, MAX_METADATA_BYTES, 1 << 20))


# ---------------------------------------------------------------------------------------------
# Cursor over the mapped bytes: bounds-checked primitive reads
# ---------------------------------------------------------------------------------------------

class _Cursor:
    """Reads little-endian primitives from buf, refusing to step past size."""

    __slots__ = ("buf", "pos", "size", "path", "limits", "values", "mem")

    def __init__(self, buf: Any, size: int, path: str, limits: MetadataLimits | None = None) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, size, path
        self.limits = limits or MetadataLimits()
        self.values = self.mem = 0  # metadata decoded so far: objects, estimated bytes

    def charge(self, values: int, nbytes: int, field: str, offset: int) -> None:
        """Count values and nbytes against the metadata budget before they are allocated."""
        self.values += values
        self.mem += nbytes
        lim = self.limits
        if self.values > lim.max_values:
            raise self.error(f"metadata budget exceeded: decoding this value takes the metadata past "
                             f"{lim.max_values:,} values (raise with ${ENV_MAX_METADATA_VALUES} or "
                             "open_gguf(path, limits=MetadataLimits(max_values=...)))", field, offset)
        if self.mem > lim.max_bytes:
            raise self.error(f"metadata budget exceeded: decoding this value takes the metadata past an "
                             f"estimated {lim.max_bytes / 2**20:g} MiB of memory (raise with "
                             f"${ENV_MAX_METADATA_MIB} or open_gguf(path, limits=MetadataLimits(max_bytes=...)))",
                             field, offset)

    def error(self, msg: str, field: str, offset: int | None = None) -> FormatError:
        """A FormatError at offset (default: the cursor)."""
        return FormatError(msg, path=self.path, field=field, offset=self.pos if offset is None else offset)

    def truncated(self, need: int, field: str, offset: int | None = None, why: str = "") -> FormatError:
        """The error for a read that would end at byte need of a file of self.size bytes."""
        return self.error(f"corrupted or incomplete: need {need} bytes, have {self.size}{why}", field, offset)

    def need(self, n: int, field: str) -> None:
        """Raise unless n more bytes are available."""
        if self.pos + n > self.size:
            raise self.truncated(self.pos + n, field)

    def unpack(self, st: struct.Struct, field: str) -> Any:
        """One struct value."""
        self.need(st.size, field)
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def u32(self, field: str) -> int:
        """u32."""
        return self.unpack(_U32, field)

    def u64(self, field: str) -> int:
        """u64."""
        return self.unpack(_U64, field)

    def i64(self, field: str) -> int:
        """i64."""
        return self.unpack(_I64, field)

    def raw_string(self, field: str, max_len: int = MAX_STRING_LEN) -> bytes:
        """u64 length + bytes; the length is checked before anything is read or allocated."""
        start = self.pos
        n = self.u64(field)
        if n > max_len:
            raise self.error(f"string length {n} exceeds the limit of {max_len} bytes", field, start)
        self.need(n, field)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def name(self, field: str, max_len: int = MAX_STRING_LEN) -> str:
        """A non-empty strict UTF-8 string of at most max_len bytes (keys, tensor names)."""
        start = self.pos
        b = self.raw_string(field, max_len)
        if not b:
            raise self.error("empty name", field, start)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"name is not valid UTF-8 ({e.reason} at byte {e.start})", field, start) from None

    def string_array(self, n: int, field: str) -> list[str]:
        """n strings back to back (the hot loop for vocabularies and merges: kept flat).

        The n values and their headers are charged to the budget up front; the text bytes as they come."""
        self.charge(n, n * COST_STR, field, self.pos)
        room = self.limits.max_bytes - self.mem  # text bytes this array may still decode
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        text = 0
        for i in range(n):
            if pos + 8 > size:
                self.pos = pos
                raise self.truncated(pos + 8, f"{field}[{i}]")
            (ln,) = unpack(buf, pos)
            end = pos + 8 + ln
            text += ln
            if ln > MAX_STRING_LEN or end > size or text > room:
                self.pos = pos
                if ln > MAX_STRING_LEN:
                    raise self.error(f"string length {ln} exceeds the limit of {MAX_STRING_LEN} bytes", f"{field}[{i}]")
                if end > size:
                    raise self.truncated(end, f"{field}[{i}]")
                self.charge(0, text, f"{field}[{i}]", pos)  # raises: over the budget
            append(buf[pos + 8:end].decode("utf-8", "surrogateescape"))
            pos = end
        self.pos = pos
        self.mem += text
        return out


# ---------------------------------------------------------------------------------------------
# Key-value section
# ---------------------------------------------------------------------------------------------

class _Entry(NamedTuple):
    """One metadata value as read: its type, Python value, array element type and file offset."""

    vtype: GGUFValueType
    value: Any
    elem: GGUFValueType | None
    offset: int


def _read_vtype(cur: _Cursor, field: str) -> GGUFValueType:
    """A u32 value type tag, rejecting unknown ids."""
    start = cur.pos
    t = cur.u32(field)
    try:
        return GGUFValueType(t)
    except ValueError:
        raise cur.error(f"unknown value type {t}", field, start) from None


def _read_scalar(cur: _Cursor, vtype: GGUFValueType, field: str) -> Any:
    """One fixed-size value as a Python int/float/bool."""
    v = cur.unpack(_SCALAR_STRUCT[vtype], field)
    return v != 0 if vtype is GGUFValueType.BOOL else v


def _read_array(cur: _Cursor, field: str, depth: int, prepaid: bool = False) -> tuple[Any, GGUFValueType]:
    """Element type, u64 count, elements -> (numpy array | list[str] | list of arrays, element type).

    prepaid: the enclosing array already charged this one as one value of COST_LIST bytes."""
    elem = _read_vtype(cur, f"{field}.type")
    count_at = cur.pos
    n = cur.u64(f"{field}.count")
    if n > MAX_ARRAY_LEN:
        raise cur.error(f"array count {n} exceeds the limit of {MAX_ARRAY_LEN}", field, count_at)
    if n * MIN_SIZE[elem] > cur.size - cur.pos:
        raise cur.truncated(cur.pos + n * MIN_SIZE[elem], field, count_at,
                            f" ({n} {elem.name} elements take at least {n * MIN_SIZE[elem]})")
    if elem in SCALAR:
        dt = SCALAR[elem][1]
        cur.charge(0 if prepaid else 1, COST_NDARRAY - (COST_LIST if prepaid else 0)
                   + n * dt.itemsize * (2 if elem is GGUFValueType.BOOL else 1), field, count_at)
        a = np.frombuffer(cur.buf, dtype=dt, count=n, offset=cur.pos).copy()
        cur.pos += n * dt.itemsize
        if elem is GGUFValueType.BOOL:
            a = a != 0
        a.flags.writeable = False
        return a, elem
    if elem is GGUFValueType.STRING:
        if not prepaid:
            cur.charge(1, COST_LIST, field, count_at)
        return cur.string_array(n, field), elem
    if depth >= MAX_ARRAY_DEPTH:
        raise cur.error(f"arrays nested more than {MAX_ARRAY_DEPTH} deep", field, count_at - 4)
    cur.charge(1 + n, COST_LIST + n * (8 + COST_LIST), field, count_at)  # every inner array at its least
    return _read_inner_arrays(cur, n, field, depth + 1), elem


def _frozen_empty(dt: np.dtype) -> np.ndarray:
    """A read-only empty array of dtype dt (shared: empty inner arrays cost a list slot, not an ndarray)."""
    a = np.empty(0, dtype=dt)
    a.flags.writeable = False
    return a


_ARRAY_HEAD = struct.Struct("<IQ")  # element type, count
# Fast path for inner arrays: element type id -> (dtype, shared empty array); BOOL takes the slow path.
_INNER_FAST = {int(t): (dt, _frozen_empty(dt)) for t, (_, dt) in SCALAR.items() if t is not GGUFValueType.BOOL}


def _read_inner_arrays(cur: _Cursor, n: int, field: str, depth: int) -> list[Any]:
    """The n arrays of an array of arrays (already charged at COST_LIST each): numeric ones inline, the
    rest (strings, bools, anything malformed) through _read_array."""
    out: list[Any] = []
    append = out.append
    buf, size, lim = cur.buf, cur.size, cur.limits.max_bytes
    for i in range(n):
        pos = cur.pos
        fast = _INNER_FAST.get(_ARRAY_HEAD.unpack_from(buf, pos)[0]) if pos + 12 <= size else None
        if fast is not None:
            count = _ARRAY_HEAD.unpack_from(buf, pos)[1]
            dt, empty = fast
            end = pos + 12 + count * dt.itemsize
            if count <= MAX_ARRAY_LEN and end <= size:
                if count == 0:
                    append(empty)
                else:
                    cur.mem += COST_NDARRAY - COST_LIST + count * dt.itemsize
                    if cur.mem > lim:
                        cur.charge(0, 0, f"{field}[{i}]", pos)  # raises: over the budget
                    a = np.frombuffer(buf, dtype=dt, count=count, offset=pos + 12).copy()
                    a.flags.writeable = False
                    append(a)
                cur.pos = end
                continue
        append(_read_array(cur, f"{field}[{i}]", depth, True)[0])
    return out


def _read_value(cur: _Cursor, vtype: GGUFValueType, field: str) -> tuple[Any, GGUFValueType | None]:
    """The value of a KV pair of type vtype -> (value, element type or None)."""
    if vtype in SCALAR:
        return _read_scalar(cur, vtype, field), None
    if vtype is GGUFValueType.STRING:
        at = cur.pos
        n = cur.u64(field)  # peeked to charge the budget before the bytes are decoded
        cur.pos = at
        if n <= MAX_STRING_LEN:
            cur.charge(0, COST_STR + n, field, at)
        return cur.raw_string(field).decode("utf-8", "surrogateescape"), None
    return _read_array(cur, field, 1)


def _read_kvs(cur: _Cursor, n_kv: int) -> dict[str, _Entry]:
    """The n_kv key-value pairs, rejecting empty, duplicate and non-UTF-8 keys."""
    entries: dict[str, _Entry] = {}
    for i in range(n_kv):
        key_at = cur.pos
        key = cur.name(f"kv[{i}].key")
        if key in entries:
            raise cur.error(f"duplicate key {key!r}", key, key_at)
        cur.charge(0, len(key), key, key_at)  # the rest of the pair was charged with n_kv
        vtype = _read_vtype(cur, key)
        at = cur.pos
        value, elem = _read_value(cur, vtype, key)
        entries[key] = _Entry(vtype, value, elem, at)
    return entries


def _alignment(cur: _Cursor, entries: dict[str, _Entry]) -> int:
    """general.alignment: UINT32, a power of two, at most MAX_ALIGNMENT (default 32)."""
    e = entries.get(ALIGNMENT_KEY)
    if e is None:
        return DEFAULT_ALIGNMENT
    if e.vtype is not GGUFValueType.UINT32:
        raise cur.error(f"must be UINT32, found {e.vtype.name}", ALIGNMENT_KEY, e.offset)
    a = e.value
    if a == 0 or a & (a - 1) or a > MAX_ALIGNMENT:
        raise cur.error(f"alignment {a} is not a power of two in [1, {MAX_ALIGNMENT}]", ALIGNMENT_KEY, e.offset)
    return a


# ---------------------------------------------------------------------------------------------
# Tensor infos
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor: ggml type, ggml shape ne (ne[0] innermost), absolute data offset and size."""

    name: str
    type: GGMLType
    ne: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (ne reversed)."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def n_rows(self) -> int:
        """prod(ne[1:])."""
        n = 1
        for d in self.ne[1:]:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        """Bytes per row of ne[0] elements."""
        bs, ts = BLOCK[self.type]
        return (self.ne[0] if self.ne else 1) // bs * ts


class _RawInfo(NamedTuple):
    """A tensor info as read, before offsets are made absolute; at = offset of its offset field."""

    name: str
    type: GGMLType
    ne: tuple[int, ...]
    rel_offset: int
    nbytes: int
    at: int


def _read_ne(cur: _Cursor, name: str) -> tuple[int, ...]:
    """n_dims (<= 4, checked before reading dims) and ne, each >= 0, product <= INT64_MAX.

    Zero dims are skipped in the product, so (0, 2**40, 2**40) is refused too: its row count overflows.
    """
    at = cur.pos
    n_dims = cur.u32(f"{name}.n_dims")
    if n_dims > MAX_DIMS:
        raise cur.error(f"{n_dims} dimensions, at most {MAX_DIMS} allowed", f"{name}.n_dims", at)
    ne, total = [], 1
    for j in range(n_dims):
        d_at = cur.pos
        d = cur.i64(f"{name}.ne[{j}]")
        if d < 0:
            raise cur.error(f"negative dimension {d}", f"{name}.ne[{j}]", d_at)
        total *= max(d, 1)
        if total > INT64_MAX:
            raise cur.error("element count overflows int64", f"{name}.ne", at)
        ne.append(d)
    return tuple(ne)


def _read_ggml_type(cur: _Cursor, name: str, ne: tuple[int, ...]) -> GGMLType:
    """The tensor's ggml type: a known id with a block layout that divides ne[0]."""
    at = cur.pos
    t = cur.u32(f"{name}.type")
    try:
        gt = GGMLType(t)
    except ValueError:
        raise cur.error(f"unknown or removed ggml type {t}", f"{name}.type", at) from None
    if gt not in BLOCK:
        raise cur.error(f"ggml type {gt.name} has no known block layout", f"{name}.type", at)
    bs = BLOCK[gt][0]
    ne0 = ne[0] if ne else 1
    if ne0 % bs:
        raise cur.error(f"row of {ne0} elements is not a whole number of {gt.name} blocks of {bs}",
                        f"{name}.ne[0]", at)
    return gt


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[_RawInfo]:
    """The n_tensors tensor infos, each validated on its own."""
    infos: list[_RawInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        at = cur.pos
        name = cur.name(f"tensor[{i}].name", MAX_TENSOR_NAME - 1)
        if name in seen:
            raise cur.error(f"duplicate tensor name {name!r}", f"tensor[{i}].name", at)
        seen.add(name)
        ne = _read_ne(cur, name)
        gt = _read_ggml_type(cur, name, ne)
        off_at = cur.pos
        rel = cur.u64(f"{name}.offset")
        bs, ts = BLOCK[gt]
        n_rows, row_bytes = 1, (ne[0] if ne else 1) // bs * ts
        for d in ne[1:]:
            n_rows *= d
        if row_bytes * max(n_rows, 1) > INT64_MAX:  # byte strides must fit, even for empty tensors
            raise cur.error(f"byte size of shape {ne} overflows int64", f"{name}.ne", at)
        infos.append(_RawInfo(name, gt, ne, rel, row_bytes * n_rows, off_at))
    return infos


def _place_tensors(cur: _Cursor, infos: list[_RawInfo], alignment: int, data_offset: int) -> dict[str, TensorInfo]:
    """Offsets must equal the running sum of padded sizes (gguf.cpp) and the data must lie in the file."""
    out: dict[str, TensorInfo] = {}
    expected = 0
    for ri in infos:
        field = f"{ri.name}.offset"
        if ri.rel_offset % alignment:
            raise cur.error(f"offset {ri.rel_offset} is not a multiple of the alignment {alignment}", field, ri.at)
        if ri.rel_offset < expected:
            raise cur.error(f"offset {ri.rel_offset} overlaps the previous tensor or is out of order "
                            f"(expected {expected})", field, ri.at)
        if ri.rel_offset > expected:
            raise cur.error(f"offset {ri.rel_offset} leaves a gap after the previous tensor "
                            f"(expected {expected})", field, ri.at)
        end = data_offset + ri.rel_offset + ri.nbytes
        if ri.nbytes and end > cur.size:
            raise cur.truncated(end, f"{ri.name}.data", ri.at)
        out[ri.name] = TensorInfo(ri.name, ri.type, ri.ne, data_offset + ri.rel_offset, ri.nbytes)
        expected += _pad(ri.nbytes, alignment)
    return out


# ---------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------

def _read_version(cur: _Cursor) -> int:
    """u32 version: 2 or 3 (a byte-swapped version means a big-endian file)."""
    at = cur.pos
    v = cur.u32("version")
    if v in SUPPORTED_VERSIONS:
        return v
    if v and (v & 0xFFFF) == 0 and int.from_bytes(v.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
        raise cur.error(f"endianness mismatch: version reads as {v:#010x}, a big-endian GGUF", "version", at)
    raise cur.error(f"unsupported version {v} (supported: 2, 3)", "version", at)


def _read_counts(cur: _Cursor) -> tuple[int, int]:
    """n_tensors and n_kv, bounded by what the bytes left could hold."""
    at = cur.pos
    n_tensors = cur.u64("n_tensors")
    n_kv = cur.u64("n_kv")
    t_min, kv_min = n_tensors * _MIN_TENSOR_INFO_SIZE, n_kv * _MIN_KV_SIZE
    if cur.pos + t_min > cur.size:
        raise cur.truncated(cur.pos + t_min, "n_tensors", at,
                            f" (n_tensors {n_tensors} is more than the bytes left could hold)")
    if cur.pos + t_min + kv_min > cur.size:
        raise cur.truncated(cur.pos + t_min + kv_min, "n_kv", at + 8,
                            f" (n_kv {n_kv} is more than the bytes left could hold)")
    cur.charge(n_kv, n_kv * COST_KV, "n_kv", at + 8)
    cur.charge(n_tensors, n_tensors * COST_TENSOR, "n_tensors", at)
    return n_tensors, n_kv


class _Header(NamedTuple):
    """Everything parsed from the header."""

    version: int
    entries: dict[str, _Entry]
    alignment: int
    data_offset: int
    tensors: dict[str, TensorInfo]


def _parse(buf: Any, size: int, path: str, limits: MetadataLimits | None = None) -> _Header:
    """Parse and validate the whole header of a GGUF file held in buf."""
    cur = _Cursor(buf, size, path, limits)
    cur.need(4, "magic")
    if bytes(buf[0:4]) != GGUF_MAGIC:
        raise cur.error(f"bad magic {bytes(buf[0:4])!r}, expected {GGUF_MAGIC!r}: not a GGUF file", "magic", 0)
    cur.pos = 4
    cur.need(_HEADER_SIZE - 4, "header")
    version = _read_version(cur)
    n_tensors, n_kv = _read_counts(cur)
    entries = _read_kvs(cur, n_kv)
    alignment = _alignment(cur, entries)
    infos = _read_tensor_infos(cur, n_tensors)
    data_offset = _pad(cur.pos, alignment)
    tensors = _place_tensors(cur, infos, alignment, data_offset)
    return _Header(version, entries, alignment, data_offset, tensors)


# ---------------------------------------------------------------------------------------------
# Public objects
# ---------------------------------------------------------------------------------------------

class TypedGetters:
    """The typed scalar getters of a metadata view; `_get(key, accepted types, what, default)` does the work."""

    def _get(self, key: str, accepted: Iterable[GGUFValueType], what: str, default: Any) -> Any:
        """The value of key when its type is one of accepted; an error naming what was expected otherwise."""
        raise NotImplementedError

    def get_int(self, key: str, default: Any = _MISSING) -> int:
        """An integer of any integer value type (not BOOL, not FLOAT)."""
        return self._get(key, INTEGER_TYPES, "an integer", default)

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        """A FLOAT32 or FLOAT64 value."""
        return self._get(key, FLOAT_TYPES, "FLOAT32 or FLOAT64", default)

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        """A STRING value."""
        return self._get(key, (GGUFValueType.STRING,), "STRING", default)

    def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        """A BOOL value."""
        return self._get(key, (GGUFValueType.BOOL,), "BOOL", default)


class Metadata(TypedGetters):
    """Typed, read-only access to the key-value pairs; a getter never reinterprets another type.

    Keys are strict UTF-8. String values that are not valid UTF-8 (llama.cpp does not check them)
    decode with 'surrogateescape', so the original bytes round-trip through QFWriter.
    """

    def __init__(self, entries: dict[str, _Entry], path: str) -> None:
        self._e = entries
        self._path = path

    def __contains__(self, key: object) -> bool:
        return key in self._e

    def __iter__(self) -> Iterator[str]:
        return iter(self._e)

    def __len__(self) -> int:
        return len(self._e)

    def keys(self) -> list[str]:
        """Keys in file order."""
        return list(self._e)

    def raw(self, key: str) -> tuple[GGUFValueType, Any]:
        """(value type, value) as stored; arrays come back as (ARRAY, value)."""
        e = self._entry(key)
        return e.vtype, e.value

    def elem_type(self, key: str) -> GGUFValueType | None:
        """Element type of an array value (None for scalars)."""
        return self._entry(key).elem

    def offset(self, key: str) -> int:
        """File offset of the value of key."""
        return self._entry(key).offset

    def _entry(self, key: str) -> _Entry:
        e = self._e.get(key)
        if e is None:
            raise FormatError(f"missing key {key!r}", path=self._path, field=key)
        return e

    def _get(self, key: str, accepted: Iterable[GGUFValueType], what: str, default: Any) -> Any:
        """The value of key if its type is one of accepted; default if absent (when given)."""
        e = self._e.get(key)
        if e is None:
            if default is _MISSING:
                raise FormatError(f"missing key {key!r}", path=self._path, field=key)
            return default
        if e.vtype not in accepted:
            found = e.vtype.name if e.elem is None else f"ARRAY of {e.elem.name}"
            raise FormatError(f"expected {what}, found {found}", path=self._path, field=key, offset=e.offset)
        return e.value

    def get_array(self, key: str, default: Any = _MISSING, *,
                  elem: GGUFValueType | Iterable[GGUFValueType] | None = None) -> Any:
        """An ARRAY: numpy array (numeric, read-only), list[str] (STRING) or list (nested).

        elem, when given, is the element type (or types) the caller accepts; any other is an error.
        """
        e = self._e.get(key)
        v = self._get(key, (GGUFValueType.ARRAY,), "ARRAY", default)
        if e is None:
            return v
        if elem is not None:
            ok = (elem,) if isinstance(elem, GGUFValueType) else tuple(elem)
            if e.elem not in ok:
                want = " or ".join(t.name for t in ok)
                raise FormatError(f"expected ARRAY of {want}, found ARRAY of {e.elem.name}",
                                  path=self._path, field=key, offset=e.offset)
        return list(v) if isinstance(v, list) else v


class GGUFFile:
    """An open, validated GGUF file; tensor data stays in the read-only mmap."""

    def __init__(self, path: str, mm: mmap.mmap, size: int, header: _Header) -> None:
        self.path = path
        self.file_size = size
        self.version = header.version
        self.alignment = header.alignment
        self.data_offset = header.data_offset
        self.meta = Metadata(header.entries, path)
        self.tensors: dict[str, TensorInfo] = header.tensors
        self._mm: mmap.mmap | None = mm
        self._u8: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8)  # [file_size], read-only

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.meta)} keys, {len(self.tensors)} tensors)"

    def close(self) -> None:
        """Drop the mapping; views handed out by raw() stay valid until they are released."""
        mm, self._mm, self._u8 = self._mm, None, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views still exported: the map is unmapped when the last one is collected

    def _data(self) -> np.ndarray:
        if self._u8 is None:
            raise ValueError(f"{self.path}: file is closed")
        return self._u8

    def info(self, name: str) -> TensorInfo:
        """The TensorInfo of name, or a FormatError naming it."""
        ti = self.tensors.get(name)
        if ti is None:
            raise FormatError(f"no tensor named {name!r}", path=self.path, field=name)
        return ti

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy read-only bytes of a tensor: u8 [n_rows, row_bytes]."""
        ti = self.info(name)
        return self._data()[ti.offset:ti.offset + ti.nbytes].reshape(ti.n_rows, ti.row_bytes)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as f32 in numpy shape, through the codec registered for its type."""
        from qf.quant.codecs import get_codec  # late: qf.quant imports qf.format

        ti = self.info(name)
        try:
            codec = get_codec(ti.type)
        except KeyError as e:
            raise FormatError(str(e.args[0]), path=self.path, field=f"{name}.type") from None
        x = codec.dequantize(self.raw(name))  # x: [n_rows, ne0]
        return np.asarray(x, dtype=np.float32).reshape(ti.shape)

    @property
    def has_checksums(self) -> bool:
        """Whether the file records per-tensor checksums (qf.tensor_crc32)."""
        return CRC_KEY in self.meta

    def checksums(self) -> np.ndarray:
        """The recorded CRC-32 per tensor: u32 [n_tensors] (FormatError if absent or malformed)."""
        crcs = self.meta.get_array(CRC_KEY, elem=GGUFValueType.UINT32)
        if len(crcs) != len(self.tensors):
            raise FormatError(f"{len(crcs)} checksums for {len(self.tensors)} tensors",
                              path=self.path, field=CRC_KEY, offset=self.meta.offset(CRC_KEY))
        return crcs

    @property
    def checksums_stale(self) -> bool:
        """True when the CRCs were recorded for another tensor table: a tool rewrote the tensors and copied
        our qf.* keys along (llama-quantize does), so they describe some other file and cannot be checked."""
        if TABLE_KEY not in self.meta:
            return False  # files written before the key existed: checked as they are
        want = self.meta.get_int(TABLE_KEY)
        have = tensor_table_crc((t.name, t.ne, t.type, t.offset - self.data_offset) for t in self.tensors.values())
        return have != want

    def verify(self) -> list[str]:
        """Names of tensors whose CRC-32 does not match the recorded one ([] when all pass).

        FormatError when there are no checksums, or when they are stale (see checksums_stale)."""
        if self.checksums_stale:
            raise FormatError(f"{CRC_KEY} was recorded for a different tensor table: the file was rewritten "
                              "by a tool that copied the qf.* keys (e.g. llama-quantize), so its tensors "
                              "cannot be checked against them", path=self.path, field=TABLE_KEY)
        data = self._data()
        return [ti.name for ti, want in zip(self.tensors.values(), self.checksums().tolist())
                if crc32(data[ti.offset:ti.offset + ti.nbytes]) != want]


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str | None:
    """What kind of non-regular file mode describes (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _FILE_KINDS if test(mode)), f"not a regular file (mode {mode:#o})")


def _open_regular(path: str) -> int:
    """A read-only descriptor on path, which must be a regular file (checked before and after opening).

    The stat comes first so that a FIFO is never opened (open() would wait for a writer); O_NONBLOCK
    and the fstat re-check cover a file swapped for a FIFO or device in between."""
    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_BINARY", 0))
            try:
                kind = _not_regular(os.fstat(fd).st_mode)
            except OSError:
                os.close(fd)
                raise
            if kind is None:
                return fd
            os.close(fd)
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror or e}", path=path) from None
    raise FormatError(f"cannot open: {kind}, not a regular file (a model must be a GGUF file)", path=path)


def open_gguf(path: str | os.PathLike, *, limits: MetadataLimits | None = None) -> GGUFFile:
    """Open, map and validate a GGUF file; raises FormatError on anything malformed.

    limits bounds the decoded metadata (default: MetadataLimits.from_env())."""
    path = os.fspath(path)
    limits = MetadataLimits.from_env() if limits is None else limits
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size < 4:
            raise FormatError(f"corrupted or incomplete: need 4 bytes, have {size}",
                              path=path, field="magic", offset=0)
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror or e}", path=path) from None
    finally:
        os.close(fd)
    try:
        header = _parse(mm, size, path, limits)
    except BaseException:
        try:
            mm.close()
        except BufferError:  # a view is still referenced (e.g. by a traceback): unmapped when collected
            pass
        raise
    return GGUFFile(path, mm, size, header)
