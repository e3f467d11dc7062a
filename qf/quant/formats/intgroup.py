"""The integer-group scheme `int`: b-bit codes packed along the input, per-group scales, optional zero points and
group index (GPTQ, AWQ, compressed-tensors pack-quantized, all converted to this one layout on import).

W[o, i] = scale[o, g(i)] * (code[o, i] - zero[o, g(i)]), g(i) = g_idx[i] if present else i // group; zero is
2^(bits-1) when symmetric (no member). Codes of a row form a little-endian bit stream in int32 words: code i
is bits [i*bits, i*bits + bits) (for 2/4/8 bits: word i*bits//32, bits (i*bits) % 32 upwards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from qf.format.ggml_types import GGMLType
from qf.format.hparams import ModelCheckError
from qf.format.model_check import TensorDecl
from qf.quant.formats.base import (
    FLOAT_SCALES, Member, field_int, member_name, parse_fields, register, scales_f32, shape_error,
)

BITS = (2, 4, 8)  # widths whose codes never straddle a word
WORD_BITS = 32


@dataclass(frozen=True)
class IntParams:
    """bits per code, group size (-1: one group per row), symmetric (no zero points), group index present."""

    bits: int
    group: int
    sym: bool
    g_idx: bool

    @property
    def per_word(self) -> int:
        """Codes per int32 word."""
        return WORD_BITS // self.bits

    def n_groups(self, n_in: int) -> int:
        """Scale columns per row."""
        return 1 if self.group <= 0 else -(-n_in // self.group)

    def group_of(self, n_in: int, g_idx: np.ndarray | None) -> np.ndarray:
        """Group of every input column, int64 [n_in]."""
        if g_idx is not None:
            return g_idx.astype(np.int64)
        return np.zeros(n_in, np.int64) if self.group <= 0 else np.arange(n_in, dtype=np.int64) // self.group


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 words [n_out, W] -> codes uint8 [n_out, W * 32 / bits] (low bits first)."""
    u = packed.view(np.uint32)
    shifts = np.arange(0, WORD_BITS, bits, dtype=np.uint32)
    codes = (u[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(u.shape[0], -1).astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 [rows, n] (n * bits a multiple of 32) -> int32 words [rows, n * bits / 32], low bits first."""
    per = WORD_BITS // bits
    c = codes.astype(np.uint32).reshape(codes.shape[0], -1, per)
    words = np.zeros(c.shape[:2], np.uint32)
    for k in range(per):
        words |= c[:, :, k] << np.uint32(k * bits)
    return words.view(np.int32)


class IntGroupFormat:
    """Registry entry `int`."""

    name = "int"

    def parse(self, text: str, where: str) -> IntParams:
        """`int;bits=B;group=G;sym=0|1;g_idx=0|1`."""
        f = parse_fields(text, self.name, where)
        bits = field_int(f, "bits", text, where, BITS)
        group = int(f.get("group", "x")) if f.get("group", "").lstrip("-").isdigit() else None
        if group is None or not (group == -1 or group > 0):
            raise ModelCheckError(where, "qf.payload.schemes", f"scheme {text!r}: field 'group' must be -1 or > 0")
        if group > 0 and group * bits % WORD_BITS:
            raise ModelCheckError(where, "qf.payload.schemes", f"scheme {text!r}: a group of {group} {bits}-bit "
                                  "codes does not fill whole int32 words")
        sym, gi = field_int(f, "sym", text, where, (0, 1)), field_int(f, "g_idx", text, where, (0, 1))
        if set(f) != {"bits", "group", "sym", "g_idx"}:
            raise ModelCheckError(where, "qf.payload.schemes", f"scheme {text!r}: unknown fields "
                                  f"{sorted(set(f) - {'bits', 'group', 'sym', 'g_idx'})}")
        return IntParams(bits, group, bool(sym), bool(gi))

    def scheme(self, p: IntParams) -> str:
        """Canonical scheme string."""
        return f"int;bits={p.bits};group={p.group};sym={int(p.sym)};g_idx={int(p.g_idx)}"

    def members(self, p: IntParams) -> tuple[Member, ...]:
        """packed codes, scales, zero points (asym), group index (act-order)."""
        out = [Member("weight_packed", frozenset({GGMLType.I32})), Member("weight_scale", FLOAT_SCALES)]
        if not p.sym:
            out.append(Member("weight_zero", frozenset({GGMLType.I16})))
        if p.g_idx:
            out.append(Member("weight_g_idx", frozenset({GGMLType.I32})))
        return tuple(out)

    def check(self, p: IntParams, decls: Mapping[str, TensorDecl], name: str, path: str) -> tuple[int, int]:
        """Shapes implied by the packed member: n_in = words * 32 / bits."""
        packed = decls["weight_packed"]
        full = member_name(name, "weight_packed")
        if len(packed.ne) != 2:
            raise ModelCheckError(path, full, f"must be 2-D [words, n_out], has ne {packed.ne}", tensor=True)
        n_in, n_out = packed.ne[0] * p.per_word, packed.ne[1]
        if p.group > 0 and not p.g_idx and n_in % p.group:
            raise ModelCheckError(path, full, f"{n_in} inputs are not a whole number of groups of {p.group}",
                                  tensor=True)
        want = {"weight_scale": (p.n_groups(n_in), n_out), "weight_zero": (p.n_groups(n_in), n_out),
                "weight_g_idx": (n_in,)}
        for suffix, d in decls.items():
            if suffix in want and tuple(d.ne) != want[suffix]:
                raise shape_error(path, member_name(name, suffix), tuple(d.ne), want[suffix],
                                  f"[groups, n_out] for {n_in} inputs, group {p.group}" if suffix != "weight_g_idx"
                                  else "one group per input")
        return n_in, n_out

    def check_values(self, p: IntParams, arrays: Mapping[str, np.ndarray], n_in: int, name: str, path: str) -> None:
        """g_idx within the scale columns; zero points within [0, 2^bits]."""
        n_groups = arrays["weight_scale"].shape[1]
        g = arrays.get("weight_g_idx")
        if g is not None and g.size and (int(g.min()) < 0 or int(g.max()) >= n_groups):
            bad = int(np.flatnonzero((g < 0) | (g >= n_groups))[0])
            raise ModelCheckError(path, member_name(name, "weight_g_idx"), f"g_idx[{bad}] = {int(g[bad])} is "
                                  f"outside [0, {n_groups})", tensor=True)
        z = arrays.get("weight_zero")
        if z is not None and z.size and (int(z.min()) < 0 or int(z.max()) > (1 << p.bits)):
            raise ModelCheckError(path, member_name(name, "weight_zero"), f"zero points outside [0, {1 << p.bits}] "
                                  f"for {p.bits}-bit codes", tensor=True)

    def slice_rows(self, p: IntParams, arrays: Mapping[str, np.ndarray], start: int, stop: int,
                   name: str) -> dict[str, np.ndarray]:
        """Rows of every per-row member; the group index is shared."""
        return {k: (v if k == "weight_g_idx" else v[start:stop]) for k, v in arrays.items()}

    def dequantize(self, p: IntParams, arrays: Mapping[str, np.ndarray], n_in: int) -> np.ndarray:
        """f32 [n_out, n_in]."""
        codes = unpack_codes(arrays["weight_packed"], p.bits)[:, :n_in].astype(np.float32)
        gi = p.group_of(n_in, arrays.get("weight_g_idx"))
        s = scales_f32(arrays["weight_scale"])[:, gi]
        z = (arrays["weight_zero"].astype(np.float32)[:, gi] if "weight_zero" in arrays
             else np.float32(1 << (p.bits - 1)))
        return s * (codes - z)


INT = register(IntGroupFormat())
