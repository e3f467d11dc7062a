"""The codec seam: a ggml type is a *layout* (bytes <-> fields, dequantize) plus *strategies* that choose values.

Layouts and strategies register their classes when their module is imported; instances are built on first use
(`get_codec`), so importing qf builds no tables. A strategy works on whole rows (ggml's importance searches take
statistics per row) and declares whether it uses and whether it requires an importance vector. `get_codec(t)`
pairs a type's layout with its default strategy (ggml's own choice, what llama-quantize writes).
"""

from __future__ import annotations

from functools import cache
from typing import ClassVar

import numpy as np

from qf.format.errors import QFError
from qf.format.ggml_types import BLOCK, GGMLType

_LAYOUTS: dict[GGMLType, type["Layout"]] = {}
_STRATEGIES: dict[GGMLType, dict[str, type["Strategy"]]] = {}
_DEFAULT: dict[GGMLType, str] = {}


class Layout:
    """One ggml block layout: packs fields into blocks, unpacks them, dequantizes; subclasses register by qtype."""

    qtype: GGMLType
    block_size: int
    type_size: int

    def __init_subclass__(cls, qtype: GGMLType | None = None, **kw) -> None:
        super().__init_subclass__(**kw)
        if qtype is not None:
            cls.qtype = GGMLType(qtype)
            cls.block_size, cls.type_size = BLOCK[cls.qtype]
            _LAYOUTS[cls.qtype] = cls

    def dequantize_blocks(self, b: np.ndarray) -> np.ndarray:
        """b: u8 [n, type_size] -> f32 [n, block_size]."""
        raise NotImplementedError(f"dequantization of {self.qtype.name} is not implemented")


class Strategy:
    """Chooses the values of one type's blocks from whole rows; subclasses register for qtypes under a name."""

    name: ClassVar[str]
    uses_importance: ClassVar[bool] = False  # reads the importance vector when one is given
    requires_importance: ClassVar[bool] = False  # refuses to run without one

    def __init_subclass__(cls, name: str | None = None, qtypes: tuple[GGMLType, ...] = (), default: bool = False,
                          **kw) -> None:
        super().__init_subclass__(**kw)
        if name is None:
            return
        cls.name = name
        for t in qtypes:
            _STRATEGIES.setdefault(GGMLType(t), {})[name] = cls
            if default or GGMLType(t) not in _DEFAULT:
                _DEFAULT[GGMLType(t)] = name

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def quantize_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """rows: f32 [r, ne0] (ne0 a multiple of the block) -> u8 [r * ne0 / block_size, type_size]."""
        raise NotImplementedError


class Codec:
    """A layout with one strategy: the row-level quantize / dequantize API every caller uses."""

    def __init__(self, layout: Layout, strategy: Strategy) -> None:
        self.layout = layout
        self.strategy = strategy
        self.qtype, self.block_size, self.type_size = layout.qtype, layout.block_size, layout.type_size

    def quantize(self, x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """x: f32 [..., ne0] -> u8 [..., ne0 // block_size * type_size]; importance per column or like x."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        ne0 = x.shape[-1] if x.ndim else 1
        if ne0 % self.block_size:
            raise ValueError(f"row of {ne0} is not a multiple of the {self.qtype.name} block size {self.block_size}")
        rows = x.reshape(-1, ne0)
        imp = None
        if importance is not None and self.strategy.uses_importance:
            imp = np.broadcast_to(np.asarray(importance, dtype=np.float32), x.shape).reshape(-1, ne0)
        elif importance is None and self.strategy.requires_importance:
            raise QFError(f"quantizing to {self.qtype.name} ({self.strategy.name}) requires an importance matrix")
        out = self.strategy.quantize_rows(rows, imp)
        return out.reshape(*x.shape[:-1], ne0 // self.block_size * self.type_size)

    def dequantize(self, b: np.ndarray) -> np.ndarray:
        """b: u8 [..., row_bytes] -> f32 [..., row_bytes // type_size * block_size]."""
        b = np.ascontiguousarray(b).view(np.uint8)
        rb = b.shape[-1]
        if rb % self.type_size:
            raise ValueError(f"{rb} bytes is not a whole number of {self.qtype.name} blocks")
        out = self.layout.dequantize_blocks(b.reshape(-1, self.type_size))
        return out.reshape(*b.shape[:-1], rb // self.type_size * self.block_size)


def _type(t: GGMLType | int) -> GGMLType:
    """t as a GGMLType with a registered layout, or KeyError listing the known ones."""
    try:
        t = GGMLType(t)
        if t in _LAYOUTS and t in _STRATEGIES:
            return t
    except ValueError:
        pass
    known = ", ".join(x.name for x in registered_types())
    raise KeyError(f"no codec for ggml type {t!r}; available: {known}") from None


@cache
def get_layout(t: GGMLType | int) -> Layout:
    """The layout of ggml type t (built once)."""
    return _LAYOUTS[_type(t)]()


@cache
def get_codec(t: GGMLType | int, strategy: str | None = None) -> Codec:
    """Type t's layout with the named strategy (default: ggml's, as llama-quantize writes), or a clear error."""
    t = _type(t)
    name = strategy or _DEFAULT[t]
    if name not in _STRATEGIES[t]:
        raise KeyError(f"no strategy {name!r} for {t.name}; available: {', '.join(sorted(_STRATEGIES[t]))}")
    layout = get_layout(t)
    return Codec(layout, _STRATEGIES[t][name](layout))


def strategies(t: GGMLType | int) -> dict[str, type[Strategy]]:
    """The strategies registered for type t, by name."""
    return dict(_STRATEGIES[_type(t)])


def registered_types() -> list[GGMLType]:
    """Types that have a layout and at least one strategy."""
    return sorted(t for t in _LAYOUTS if t in _STRATEGIES)
