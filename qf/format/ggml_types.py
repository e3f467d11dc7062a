"""ggml tensor type ids and block layouts (wire values fixed by ggml.h; sizes as byte sums)."""

from __future__ import annotations

from enum import IntEnum


class GGMLType(IntEnum):
    """ggml tensor type ids as stored in a GGUF tensor info."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    # 4 and 5 were Q4_2 / Q4_3: removed, rejected on read.
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


QK_K = 256

# type -> (elements per block, bytes per block), written as byte sums like ggml's block structs.
BLOCK: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 2 + 16),  # d, qs[16]
    GGMLType.Q4_1: (32, 2 + 2 + 16),  # d, m, qs[16]
    GGMLType.Q5_0: (32, 2 + 4 + 16),  # d, qh[4], qs[16]
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),  # d, m, qh[4], qs[16]
    GGMLType.Q8_0: (32, 2 + 32),  # d, qs[32]
    GGMLType.Q8_1: (32, 4 + 4 + 32),  # d, s, qs[32]
    GGMLType.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),  # scales[16], qs[64], d, dmin
    GGMLType.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),  # hmask[32], qs[64], scales[12], d
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),  # d, dmin, scales[12], qs[128]
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # d, dmin, scales[12], qh[32], qs[128]
    GGMLType.Q6_K: (QK_K, 2 + QK_K // 16 + 3 * QK_K // 4),  # ql[128], qh[64], scales[16], d
    GGMLType.Q8_K: (QK_K, 4 + QK_K + QK_K // 8),  # d (f32), qs[256], bsums[16] (i16)
    GGMLType.IQ2_XXS: (QK_K, 2 + QK_K // 4),
    GGMLType.IQ2_XS: (QK_K, 2 + QK_K // 4 + QK_K // 32),
    GGMLType.IQ3_XXS: (QK_K, 2 + QK_K // 4 + QK_K // 8),
    GGMLType.IQ1_S: (QK_K, 2 + QK_K // 8 + QK_K // 16),
    GGMLType.IQ4_NL: (32, 2 + 16),
    GGMLType.IQ3_S: (QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    GGMLType.IQ2_S: (QK_K, 2 + QK_K // 4 + QK_K // 16),
    GGMLType.IQ4_XS: (QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    GGMLType.IQ1_M: (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    GGMLType.TQ1_0: (QK_K, 2 + 4 * 13),
    GGMLType.TQ2_0: (QK_K, 2 + 64),
    GGMLType.MXFP4: (32, 1 + 16),
}


# Where blocks keep their float scales (checked for inf/NaN by `qinspect --verify`): type -> ((field name, byte
# offset in the block, numpy dtype), ...), from ggml-common.h. "e8m0" is MXFP4's exponent byte (0xFF = NaN).
# IQ1_M is absent: its scale is spread over the high nibbles of its sub-block scales.
_D0 = (("d", 0, "<f2"),)
_D_DMIN = (("d", 0, "<f2"), ("dmin", 2, "<f2"))
SCALE_FIELDS: dict[GGMLType, tuple[tuple[str, int, str], ...]] = {
    GGMLType.Q4_0: _D0,
    GGMLType.Q4_1: (("d", 0, "<f2"), ("m", 2, "<f2")),
    GGMLType.Q5_0: _D0,
    GGMLType.Q5_1: (("d", 0, "<f2"), ("m", 2, "<f2")),
    GGMLType.Q8_0: _D0,
    GGMLType.Q8_1: (("d", 0, "<f4"), ("s", 4, "<f4")),
    GGMLType.Q2_K: (("d", QK_K // 16 + QK_K // 4, "<f2"), ("dmin", QK_K // 16 + QK_K // 4 + 2, "<f2")),
    GGMLType.Q3_K: (("d", QK_K // 8 + QK_K // 4 + 12, "<f2"),),
    GGMLType.Q4_K: _D_DMIN,
    GGMLType.Q5_K: _D_DMIN,
    GGMLType.Q6_K: (("d", QK_K // 2 + QK_K // 4 + QK_K // 16, "<f2"),),
    GGMLType.Q8_K: (("d", 0, "<f4"),),
    GGMLType.IQ2_XXS: _D0,
    GGMLType.IQ2_XS: _D0,
    GGMLType.IQ3_XXS: _D0,
    GGMLType.IQ1_S: _D0,
    GGMLType.IQ4_NL: _D0,
    GGMLType.IQ3_S: _D0,
    GGMLType.IQ2_S: _D0,
    GGMLType.IQ4_XS: _D0,
    GGMLType.TQ1_0: (("d", (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64, "<f2"),),
    GGMLType.TQ2_0: (("d", QK_K // 4, "<f2"),),
    GGMLType.MXFP4: (("e", 0, "e8m0"),),
}
# Float element types as unsigned bit patterns: type -> (unsigned dtype, exponent mask: all ones = inf/NaN).
FLOAT_BITS: dict[GGMLType, tuple[str, int]] = {
    GGMLType.F32: ("<u4", 0x7F80_0000),
    GGMLType.F16: ("<u2", 0x7C00),
    GGMLType.BF16: ("<u2", 0x7F80),
    GGMLType.F64: ("<u8", 0x7FF0_0000_0000_0000),
}


def block_size(t: GGMLType) -> int:
    """Elements per block of type t."""
    return BLOCK[GGMLType(t)][0]


def type_size(t: GGMLType) -> int:
    """Bytes per block of type t."""
    return BLOCK[GGMLType(t)][1]


def row_bytes(t: GGMLType, ne0: int) -> int:
    """Bytes of one row of ne0 elements; ne0 must be a whole number of blocks."""
    bs, ts = BLOCK[GGMLType(t)]
    if ne0 % bs:
        raise ValueError(f"row of {ne0} elements is not a whole number of {GGMLType(t).name} blocks of {bs}")
    return ne0 // bs * ts


def tensor_bytes(t: GGMLType, ne: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor with ggml shape ne (ne[0] innermost)."""
    n_rows = 1
    for d in ne[1:]:
        n_rows *= int(d)
    return row_bytes(t, int(ne[0]) if ne else 1) * n_rows


# llama.cpp's general.file_type values (llama_ftype), by the name qconvert --type takes.
FILE_TYPE: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32,
}
