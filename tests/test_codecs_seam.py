"""The codec seam: layouts (pack / unpack / dequantize) apart from strategies (which choose values), per type.

- every layout's unpack inverts its pack on random bytes (pack(unpack(b)) == b), so strategies can be swapped
  without touching byte order;
- the registry: each quantizable type has a default strategy (ggml's, what llama-quantize writes), strategies
  declare whether they use / require importance, and a strategy that requires it refuses to run without;
- importing qf.quant.codecs builds no layout instance (tables are built on first use).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qf.format.errors import QFError
from qf.format.ggml_types import GGMLType
from qf.quant.codecs import Codec, Strategy, get_codec, get_layout, registered_types, strategies

PACKED = [t for t in registered_types() if hasattr(get_layout(t), "unpack")]


@pytest.mark.parametrize("t", PACKED, ids=lambda t: t.name)
def test_unpack_inverts_pack_on_random_bytes(t: GGMLType) -> None:
    layout = get_layout(t)
    b = np.random.default_rng(int(t)).integers(0, 256, (50, layout.type_size), dtype=np.uint8)
    if t in (GGMLType.F16, GGMLType.BF16, GGMLType.F32):
        b = np.ascontiguousarray(get_codec(t).quantize(np.random.default_rng(0).standard_normal((50, 1))))
    assert np.array_equal(layout.pack(layout.unpack(b)), b)


def test_every_type_has_a_default_strategy_and_declares_importance() -> None:
    for t in registered_types():
        codec = get_codec(t)
        assert codec.strategy.name in strategies(t)
        for cls in strategies(t).values():
            assert isinstance(cls.uses_importance, bool) and isinstance(cls.requires_importance, bool)
            assert cls.uses_importance or not cls.requires_importance


def test_strategies_are_selectable_and_unknown_names_are_refused() -> None:
    assert get_codec(GGMLType.Q4_K, "rtn").strategy.name == "rtn"
    assert get_codec(GGMLType.Q4_K) is get_codec(GGMLType.Q4_K)
    with pytest.raises(KeyError, match="no strategy"):
        get_codec(GGMLType.Q4_K, "nope")
    with pytest.raises(KeyError, match="no codec"):
        get_codec(GGMLType.Q8_1)


def test_a_strategy_that_requires_importance_refuses_without() -> None:
    class Needs(Strategy):  # unnamed: not registered
        name = "needs"
        uses_importance = requires_importance = True

        def quantize_rows(self, rows, importance):
            return get_codec(GGMLType.Q4_0).quantize(rows, importance).reshape(-1, 18)

    layout = get_layout(GGMLType.Q4_0)
    codec = Codec(layout, Needs(layout))
    with pytest.raises(QFError, match="requires an importance matrix"):
        codec.quantize(np.ones((1, 32), np.float32))
    assert codec.quantize(np.ones((1, 32), np.float32), np.ones(32, np.float32)).shape == (1, 18)


def test_import_builds_no_layout() -> None:
    code = ("import qf.quant.codecs as c, qf.quant.codecs.base as b; "
            "assert b.get_layout.cache_info().currsize == 0 and b.get_codec.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True)
