"""Per-tensor checksums recorded by the writer (spec: docs/qf-extensions.md)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable

CRC_KEY = "qf.tensor_crc32"  # UINT32 array, one CRC-32 per tensor, in tensor-info order
ALGORITHM_KEY = "qf.checksum.algorithm"  # STRING, "crc32"
TABLE_KEY = "qf.checksum.tensor_table_crc32"  # UINT32, CRC-32 of the tensor-info table the CRCs were made for
ALGORITHM = "crc32"
RESERVED_KEYS = frozenset({CRC_KEY, ALGORITHM_KEY, TABLE_KEY})


def crc32(data, value: int = 0) -> int:
    """zlib CRC-32 of a bytes-like object (continuing from value), as an unsigned 32-bit int."""
    return zlib.crc32(data, value) & 0xFFFFFFFF


def tensor_table_crc(infos: Iterable[tuple[str, tuple[int, ...], int, int]]) -> int:
    """CRC-32 of the GGUF tensor-info table encoding of (name, ne, ggml type, offset from the data start)."""
    value = 0
    for name, ne, gtype, rel_offset in infos:
        raw = name.encode("utf-8")
        value = crc32(struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(ne))
                      + struct.pack(f"<{len(ne)}q", *ne) + struct.pack("<IQ", int(gtype), rel_offset), value)
    return value
