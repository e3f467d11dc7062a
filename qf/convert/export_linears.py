"""The quantized linears of a .qf file as an exporter sees them: integer groups or FP8, in Hugging Face row order.

Sources (a registry keyed by what a tensor is stored as):
- an `int` payload: its codes, scales (stored dtype kept), zero points and group index as they are;
- an `fp8` payload: its e4m3 bytes, scales (stored shape and dtype) and static input scale;
- ggml `Q4_0` (x = d * (q - 8)) and `Q8_0` (x = d * q): exactly symmetric 4-bit / 8-bit integer groups of 32 with
  fp16 scales; a larger group (or one per row) when the fp16 scales of its 32-blocks agree, chosen for the file.
  The scales go out as f32 holding the fp16 values: compressed-tensors multiplies in the scale's dtype, and
  d * (q - 8) rounded to fp16 is not the ggml value; layouts that store fp16 (GPTQ, AWQ) cast them back exactly.
Any other storage of a block linear is refused, naming the tensor and its type. Output rows are put back into
HF's order (the converter's Q/K head permutation undone); block scales must not straddle that permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

from qf.convert.export import ExportSource, row_order
from qf.format.errors import ConvertError
from qf.format.ggml_types import GGMLType
from qf.quant.formats.fp8 import Fp8Params
from qf.quant.formats.intgroup import IntParams, unpack_codes

QK = 32  # values per legacy ggml block
MERGE_GROUPS = (-1, 256, 128, 64, 32)  # group sizes tried for ggml blocks, largest first (-1: one per row)
SCALE_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<u2"): "BF16"}  # member dtype -> name


@dataclass(frozen=True)
class LinearInfo:
    """What a quantized linear is, known without reading its codes: scheme parameters, shape, scale dtype."""

    params: Union[IntParams, Fp8Params]
    n_out: int
    n_in: int
    scale_dtype: str  # F32 / F16 / BF16
    scale_shape: tuple[int, ...]  # numpy shape of the scale as stored (fp8: tensor (1,), channel (n_out, 1), ...)
    input_scale: bool = False
    origin: str = ""  # what the .qf stores: the scheme string or the ggml type name


@dataclass
class IntLinear:
    """Integer-group weight in HF row order: W[o, i] = scale[o, g(i)] * (codes[o, i] - zero[o, g(i)])."""

    info: LinearInfo
    codes: np.ndarray  # uint8 [n_out, n_in]
    scale: np.ndarray  # stored dtype [n_out, groups] (bf16 as uint16 bits)
    zero: np.ndarray | None  # int16 [n_out, groups]; None: symmetric (2^(bits-1))
    g_idx: np.ndarray | None  # int32 [n_in]; None: i // group


@dataclass
class Fp8Linear:
    """FP8 e4m3 weight in HF row order: W[o, i] = e4m3(values[o, i]) * scale[o // bh, i // bw]."""

    info: LinearInfo
    values: np.ndarray  # uint8 e4m3fn bit patterns [n_out, n_in]
    scale: np.ndarray  # stored dtype; tensor (1,), channel (n_out, 1), block (ceil(out/bh), ceil(in/bw))
    input_scale: np.ndarray | None  # f32 (1,)


Linear = Union[IntLinear, Fp8Linear]


def _rows(src: ExportSource, g: str, n_out: int) -> np.ndarray | None:
    """GGUF row of each HF row (None: unpermuted)."""
    return row_order(src, g, n_out)


def _take(a: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """Rows of a in HF order."""
    return np.ascontiguousarray(a if order is None else a[order])


# ---------------------------------------------------------------------------------------------------- payloads

def _payload_info(src: ExportSource, g: str) -> LinearInfo:
    """LinearInfo of a payload weight (members' dtypes and shapes, no codes read)."""
    d = src.payloads[g]
    scale = src.payload(g).arrays["weight_scale"]
    if isinstance(d.params, Fp8Params):
        shape = {"tensor": (1,), "channel": (d.n_out, 1)}.get(d.params.strategy, scale.shape)
        return LinearInfo(d.params, d.n_out, d.n_in, SCALE_DTYPES[scale.dtype], tuple(shape),
                          "input_scale" in d.members, d.scheme)
    return LinearInfo(d.params, d.n_out, d.n_in, SCALE_DTYPES[scale.dtype], tuple(scale.shape), False, d.scheme)


def _payload_linear(src: ExportSource, g: str, info: LinearInfo) -> Linear:
    """A payload weight in HF row order."""
    a = src.payload(g).arrays
    order = _rows(src, g, info.n_out)
    if isinstance(info.params, Fp8Params):
        return Fp8Linear(info, _take(a["weight_fp8"].view(np.uint8), order), _fp8_scale(src, g, info, a, order),
                         np.array(a["input_scale"], np.float32).reshape(1) if "input_scale" in a else None)
    p: IntParams = info.params
    codes = unpack_codes(_take(a["weight_packed"], order), p.bits)[:, :info.n_in]
    zero = _take(a["weight_zero"], order) if "weight_zero" in a else None
    g_idx = np.ascontiguousarray(a["weight_g_idx"]) if "weight_g_idx" in a else None
    return IntLinear(info, codes, _take(a["weight_scale"], order), zero, g_idx)


def _fp8_scale(src: ExportSource, g: str, info: LinearInfo, a: dict, order: np.ndarray | None) -> np.ndarray:
    """The FP8 scale in HF order and stored shape; block rows must stay within their blocks."""
    p: Fp8Params = info.params
    s = np.ascontiguousarray(a["weight_scale"])
    if p.strategy == "channel":
        return _take(s, order).reshape(info.n_out, 1)
    if p.strategy == "block" and order is not None and np.any(order // p.block_h !=
                                                             np.arange(info.n_out) // p.block_h):
        raise ConvertError(f"{src.path}: tensor {g!r}: its {p.block_h}-row scale blocks straddle the Q/K head "
                           "permutation; the HF layout cannot hold them")
    return s.reshape(info.scale_shape)


# -------------------------------------------------------------------------------------------------- ggml blocks

@dataclass(frozen=True)
class GgmlGrid:
    """A ggml block type that is an integer-group grid: bits, bytes per block, codes of a block's bytes."""

    bits: int
    block_bytes: int
    codes: Callable[[np.ndarray], np.ndarray]  # u8 [n, blocks, block_bytes - 2] -> u8 codes [n, blocks, 32]


def _q4_0_codes(qs: np.ndarray) -> np.ndarray:
    """Q4_0 quants: value j in the low nibble of byte j, value j + 16 in the high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q8_0_codes(qs: np.ndarray) -> np.ndarray:
    """Q8_0 int8 quants -> unsigned codes (q + 128)."""
    return (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8)


GGML_GRIDS: dict[GGMLType, GgmlGrid] = {
    GGMLType.Q4_0: GgmlGrid(4, 18, _q4_0_codes),
    GGMLType.Q8_0: GgmlGrid(8, 34, _q8_0_codes),
}


def _blocks(src: ExportSource, g: str, grid: GgmlGrid) -> np.ndarray:
    """The tensor's blocks, u8 [n_out, n_in / 32, block_bytes] (a view of the file)."""
    n_out, n_in = src.shape(g)
    return np.asarray(src.f.raw(g)).view(np.uint8).reshape(n_out, n_in // QK, grid.block_bytes)


def _block_scales(src: ExportSource, g: str, grid: GgmlGrid) -> np.ndarray:
    """fp16 d of every block, [n_out, n_in / 32]."""
    return np.ascontiguousarray(_blocks(src, g, grid)[:, :, :2]).view(np.float16)[..., 0]


def ggml_groups(src: ExportSource, g: str) -> set[int]:
    """Group sizes (MERGE_GROUPS) over which every fp16 scale of this Q4_0/Q8_0 tensor's 32-blocks agrees."""
    grid = GGML_GRIDS[src.ggml_type(g)]
    d = _block_scales(src, g, grid).view(np.uint16)  # bit patterns: -0.0 and 0.0 differ, as the codes would
    n_in = d.shape[1] * QK
    out = {QK}
    for size in MERGE_GROUPS:
        k = (n_in if size == -1 else size) // QK
        if size != QK and k >= 1 and n_in % (k * QK) == 0 and np.all(d.reshape(d.shape[0], -1, k) ==
                                                                       d.reshape(d.shape[0], -1, k)[:, :, :1]):
            out.add(size)
    return out


def _ggml_info(src: ExportSource, g: str, group: int) -> LinearInfo:
    """LinearInfo of a Q4_0/Q8_0 tensor read as symmetric groups of `group` with fp16 scales."""
    t = src.ggml_type(g)
    n_out, n_in = src.shape(g)
    p = IntParams(GGML_GRIDS[t].bits, group, True, False)
    return LinearInfo(p, n_out, n_in, "F32", (n_out, p.n_groups(n_in)), False, t.name)


def _ggml_linear(src: ExportSource, g: str, info: LinearInfo) -> IntLinear:
    """A Q4_0/Q8_0 tensor as integer groups in HF row order."""
    grid = GGML_GRIDS[src.ggml_type(g)]
    order = _rows(src, g, info.n_out)
    blocks = _take(_blocks(src, g, grid), order)
    codes = grid.codes(blocks[:, :, 2:]).reshape(info.n_out, info.n_in)
    d = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[..., 0]  # [n_out, n_in / 32]
    k = (info.n_in if info.params.group == -1 else info.params.group) // QK
    return IntLinear(info, codes, d[:, ::k].astype(np.float32), None, None)  # fp16 values held in f32 (exact)


# ----------------------------------------------------------------------------------------------------- the file

def is_block_linear(src: ExportSource, g: str) -> bool:
    """A layer's 2-D weight matrix (what quantizers quantize); embeddings, lm_head, norms and biases are not."""
    return g.startswith("blk.") and g.endswith(".weight") and len(src.ne(g)) >= 2 and min(src.ne(g)[:2]) > 1


def _refuse(src: ExportSource, g: str) -> ConvertError:
    """The error for a block linear no quantized layout holds."""
    t = src.ggml_type(g)
    if len(src.ne(g)) > 2:
        return ConvertError(f"{src.path}: tensor {g!r} is a stack of experts; quantized export handles 2-D linears")
    return ConvertError(f"{src.path}: tensor {g!r} is stored as {t.name}, which no integer-group or FP8 layout holds "
                        f"exactly (exportable: int/fp8 payloads, {', '.join(x.name for x in GGML_GRIDS)}); export "
                        "it dequantized with --format float")


def file_group(src: ExportSource, names: list[str]) -> int:
    """The largest group size every Q4_0/Q8_0 linear of the file can be read with (32 always works)."""
    sets = [ggml_groups(src, g) for g in names if src.ggml_type(g) in GGML_GRIDS]
    common = set.intersection(*sets) if sets else {QK}
    return next(s for s in MERGE_GROUPS if s in common)


def plan_linears(src: ExportSource, names: list[str]) -> dict[str, LinearInfo]:
    """LinearInfo of every block linear among names (GGUF names); ConvertError for one no layout can hold."""
    linears = [g for g in names if is_block_linear(src, g)]
    for g in linears:
        if g not in src.payloads and (src.ggml_type(g) not in GGML_GRIDS or len(src.ne(g)) > 2):
            raise _refuse(src, g)
    group = file_group(src, linears)
    return {g: _payload_info(src, g) if g in src.payloads else _ggml_info(src, g, group) for g in linears}


def read_linear(src: ExportSource, g: str, info: LinearInfo) -> Linear:
    """The weight of a planned linear in HF row order."""
    return _payload_linear(src, g, info) if g in src.payloads else _ggml_linear(src, g, info)
