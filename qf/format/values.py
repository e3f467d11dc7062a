"""GGUF metadata value types and their wire layout (data only; ids fixed by gguf.h / gguf-py)."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class GGUFValueType(IntEnum):
    """Type tag of a GGUF key-value pair (u32 on disk)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


V = GGUFValueType

# Fixed-size scalar types: value type -> (struct code, little-endian numpy dtype). Size = dtype.itemsize.
SCALAR: dict[GGUFValueType, tuple[str, np.dtype]] = {
    V.UINT8: ("B", np.dtype("<u1")),
    V.INT8: ("b", np.dtype("<i1")),
    V.UINT16: ("H", np.dtype("<u2")),
    V.INT16: ("h", np.dtype("<i2")),
    V.UINT32: ("I", np.dtype("<u4")),
    V.INT32: ("i", np.dtype("<i4")),
    V.FLOAT32: ("f", np.dtype("<f4")),
    V.BOOL: ("b", np.dtype("<i1")),  # one byte; 0 = false, anything else = true (as gguf.cpp reads it)
    V.UINT64: ("Q", np.dtype("<u8")),
    V.INT64: ("q", np.dtype("<i8")),
    V.FLOAT64: ("d", np.dtype("<f8")),
}

INTEGER_TYPES: frozenset[GGUFValueType] = frozenset(
    {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
)
FLOAT_TYPES: frozenset[GGUFValueType] = frozenset({V.FLOAT32, V.FLOAT64})

# Smallest encoding of one value of each type, in bytes: bounds counts read from a file
# before anything is allocated. STRING = u64 length; ARRAY = u32 element type + u64 count.
MIN_SIZE: dict[GGUFValueType, int] = {
    **{t: dt.itemsize for t, (_, dt) in SCALAR.items()},
    V.STRING: 8,
    V.ARRAY: 4 + 8,
}

# numpy dtype (by kind + size) -> value type, for inferring the type of arrays and numpy scalars.
DTYPE_TO_VTYPE: dict[str, GGUFValueType] = {
    "u1": V.UINT8, "i1": V.INT8, "u2": V.UINT16, "i2": V.INT16,
    "u4": V.UINT32, "i4": V.INT32, "u8": V.UINT64, "i8": V.INT64,
    "f4": V.FLOAT32, "f8": V.FLOAT64, "b1": V.BOOL,
}


def dtype_key(dt: np.dtype) -> str:
    """'u4', 'f8', 'b1'... : the DTYPE_TO_VTYPE key of a numpy dtype."""
    return f"{dt.kind}{dt.itemsize}"


# Limits on what a file may ask us to allocate (the same figures llama.cpp's gguf.cpp enforces).
MAX_STRING_LEN = 1 << 30
MAX_ARRAY_LEN = 1 << 30
# gguf.cpp rejects arrays of arrays; gguf-py writes them. We accept one level (an array whose
# elements are arrays of scalars or strings) and reject anything deeper before reading it.
MAX_ARRAY_DEPTH = 2
MAX_TENSOR_NAME = 64  # GGML_MAX_NAME: names must be shorter than this many bytes
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1
MAX_ALIGNMENT = 1 << 20  # a power of two above this is treated as hostile
DEFAULT_ALIGNMENT = 32
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
SUPPORTED_VERSIONS = frozenset({2, 3})  # gguf.cpp: v1 is rejected, v2 and v3 share one layout
ALIGNMENT_KEY = "general.alignment"

# Budget for the decoded metadata: a file can be tiny on disk and huge as Python objects (millions of
# empty nested arrays: 12 bytes each on disk, ~120 in memory). The largest real vocabularies (262k tokens,
# ~400k merges) take under 1M values and ~60 MiB. Raise with the environment variables below (read at
# each open) or open_gguf(path, limits=MetadataLimits(...)).
MAX_METADATA_VALUES = 4_000_000  # Python objects: keys, tensor infos, strings, arrays (numeric array: one)
MAX_METADATA_BYTES = 256 << 20  # estimated Python memory of keys, values, containers and tensor infos
ENV_MAX_METADATA_VALUES = "QF_MAX_METADATA_VALUES"
ENV_MAX_METADATA_MIB = "QF_MAX_METADATA_MIB"
# Estimated Python memory per decoded object (CPython 3.11, 64-bit), bytes on top of the payload.
COST_KV = 200  # dict slot, key str header, entry tuple, scalar value
COST_TENSOR = 400  # tensor info as read and as placed: name, shape tuple, records, dict and set slots
COST_STR = 64  # str header (49..76) + list slot
COST_LIST = 64  # empty list + slot in the parent
COST_NDARRAY = 120  # ndarray header + slot in the parent
