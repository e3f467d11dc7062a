"""The IQ grids as the CPU kernels read them: flat byte tables, entry k at bytes [k * width, (k + 1) * width).

Each grid entry holds the signed 8-bit values of 8 (IQ2, IQ1) or 4 (IQ3) consecutive weights, in the byte
order of ggml's u64 / u32 grid words (ggml-common.h). The values come from qf.quant's tables; this module
only lays them out. The kernels index the tables with masked indices, so every index is in range by
construction (`SIZES` gives the entry counts the masks assume; `tables()` checks them).
"""

from __future__ import annotations

from functools import cache

import numpy as np

# grid -> (entries, bytes per entry): what the kernels' index masks assume
SIZES: dict[str, tuple[int, int]] = {
    "iq2xxs": (256, 8), "iq2xs": (512, 8), "iq2s": (1024, 8),
    "iq3xxs": (256, 4), "iq3s": (512, 4), "iq1s": (2048, 8),
}


def _flat(a: np.ndarray, entries: int, width: int, name: str) -> np.ndarray:
    """A grid as u8 [entries * width]: packed words (u64/u32, little-endian) or a [entries, width] value array."""
    a = np.asarray(a)
    if a.dtype.kind in "ui" and a.dtype.itemsize == width and a.size == entries:
        out = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))).view(np.uint8).reshape(-1)
    elif a.size == entries * width:
        v = a.reshape(-1)
        if not np.array_equal(v, np.round(v)) or v.min() < -128 or v.max() > 127:
            raise ValueError(f"grid {name}: values must be 8-bit integers")
        out = v.astype(np.int64).astype(np.int8).view(np.uint8)
    else:
        raise ValueError(f"grid {name}: expected {entries} entries of {width} values, got {a.dtype} {a.shape}")
    out = np.ascontiguousarray(out)
    out.setflags(write=False)
    return out


def _source() -> dict[str, np.ndarray]:
    """The grids from qf.quant (ggml-common.h's data)."""
    from qf.quant import iq1_tables, iq_grids

    return {"iq2xxs": iq_grids.iq2xxs_grid(), "iq2xs": iq_grids.iq2xs_grid(), "iq2s": iq_grids.iq2s_grid(),
            "iq3xxs": iq_grids.iq3xxs_grid(), "iq3s": iq_grids.iq3s_grid(), "iq1s": iq1_tables.iq1s_grid()}


@cache
def tables() -> dict[str, np.ndarray]:
    """Every grid as a flat read-only u8 table (see the module docstring)."""
    src = _source()
    return {name: _flat(src[name], n, w, name) for name, (n, w) in SIZES.items()}
