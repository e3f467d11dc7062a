"""Value tables of ggml's IQ types (ggml-common.h), as data built on first use.

Importing this module builds nothing; each table is a cached function returning a read-only array.
"""

from __future__ import annotations

from functools import cache

import numpy as np

# kvalues_iq4nl: the 16 non-linear levels of IQ4_NL and IQ4_XS (ggml-common.h)
_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _frozen(a: np.ndarray) -> np.ndarray:
    """a, marked read-only."""
    a.setflags(write=False)
    return a


@cache
def kvalues_iq4nl() -> np.ndarray:
    """IQ4_NL / IQ4_XS levels as int8 [16] (ascending)."""
    return _frozen(np.array(_IQ4NL, np.int8))


@cache
def kvalues_iq4nl_f32() -> np.ndarray:
    """The same levels as f32 [16] (what ggml's float arithmetic sees)."""
    return _frozen(kvalues_iq4nl().astype(np.float32))
