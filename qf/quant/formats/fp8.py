"""The FP8 scheme `fp8`: float8 e4m3fn values with per-tensor, per-channel or per-block scales.

W[o, i] = e4m3(weight_fp8[o, i]) * scale[o // bh, i // bw] (tensor: one scale; channel: bh = 1, bw = n_in;
block: bh x bw blocks, the last ones partial).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from qf.format.ggml_types import GGMLType
from qf.format.hparams import ModelCheckError
from qf.format.model_check import TensorDecl
from qf.quant.formats.base import FLOAT_SCALES, Member, field_int, member_name, parse_fields, register, scales_f32

STRATEGIES = ("tensor", "channel", "block")


def e4m3fn_table() -> np.ndarray:
    """f32 value of every float8 e4m3fn bit pattern (bias 7, no infinities, S.1111.111 is NaN)."""
    b = np.arange(256, dtype=np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7))
    val = sign * val
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


E4M3 = e4m3fn_table()


@dataclass(frozen=True)
class Fp8Params:
    """Scale strategy and, for blocks, the block height (output rows) and width (inputs)."""

    strategy: str
    block_h: int = 0
    block_w: int = 0

    def block(self, n_in: int, n_out: int) -> tuple[int, int]:
        """(rows, columns) one scale covers."""
        if self.strategy == "tensor":
            return n_out, n_in
        if self.strategy == "channel":
            return 1, n_in
        return self.block_h, self.block_w

    def scale_ne(self, n_in: int, n_out: int) -> tuple[int, ...]:
        """ggml shape of the scale member."""
        if self.strategy == "tensor":
            return (1,)
        if self.strategy == "channel":
            return (1, n_out)
        return (-(-n_in // self.block_w), -(-n_out // self.block_h))


class Fp8Format:
    """Registry entry `fp8`."""

    name = "fp8"

    def parse(self, text: str, where: str) -> Fp8Params:
        """`fp8;scale=tensor|channel` or `fp8;scale=block;block=HxW`."""
        f = parse_fields(text, self.name, where)
        strat = f.get("scale")
        if strat not in STRATEGIES or set(f) - {"scale", "block"} or (("block" in f) != (strat == "block")):
            raise ModelCheckError(where, "qf.payload.schemes", f"scheme {text!r}: expected 'fp8;scale=tensor', "
                                  "'fp8;scale=channel' or 'fp8;scale=block;block=HxW'")
        if strat != "block":
            return Fp8Params(strat)
        h, _, w = f["block"].partition("x")
        return Fp8Params("block", field_int({"h": h}, "h", text, where), field_int({"w": w}, "w", text, where))

    def scheme(self, p: Fp8Params) -> str:
        """Canonical scheme string."""
        return f"fp8;scale=block;block={p.block_h}x{p.block_w}" if p.strategy == "block" else f"fp8;scale={p.strategy}"

    def members(self, p: Fp8Params) -> tuple[Member, ...]:
        """Values (I8 bit patterns), weight scales, optional static input scale (kept, not applied)."""
        return (Member("weight_fp8", frozenset({GGMLType.I8})), Member("weight_scale", FLOAT_SCALES),
                Member("input_scale", frozenset({GGMLType.F32}), required=False))

    def check(self, p: Fp8Params, decls: Mapping[str, TensorDecl], name: str, path: str) -> tuple[int, int]:
        """Values 2-D; the scale's shape follows from the strategy."""
        v = decls["weight_fp8"]
        if len(v.ne) != 2:
            raise ModelCheckError(path, member_name(name, "weight_fp8"), f"must be 2-D [n_in, n_out], has ne "
                                  f"{v.ne}", tensor=True)
        n_in, n_out = v.ne
        want = p.scale_ne(n_in, n_out)
        got = tuple(decls["weight_scale"].ne)
        if got != want:
            raise ModelCheckError(path, member_name(name, "weight_scale"), f"has ne {got}, expected {want} "
                                  f"({p.strategy} scales of a [{n_out}, {n_in}] weight)", tensor=True)
        if "input_scale" in decls and tuple(decls["input_scale"].ne) != (1,):
            raise ModelCheckError(path, member_name(name, "input_scale"), "must hold one value", tensor=True)
        return n_in, n_out

    def check_values(self, p: Fp8Params, arrays: Mapping[str, np.ndarray], n_in: int, name: str, path: str) -> None:
        """Nothing is indexed by value: no check beyond the shapes."""

    def slice_rows(self, p: Fp8Params, arrays: Mapping[str, np.ndarray], start: int, stop: int,
                   name: str) -> dict[str, np.ndarray]:
        """Rows of the values; channel scales by row, block scales by block row (the cut must be on a block edge),
        the tensor scale shared."""
        out = dict(arrays)
        out["weight_fp8"] = arrays["weight_fp8"][start:stop]
        if p.strategy == "channel":
            out["weight_scale"] = arrays["weight_scale"][start:stop]
        elif p.strategy == "block":
            if start % p.block_h:
                raise ModelCheckError("<weights>", name, f"rows [{start}, {stop}) do not start on a {p.block_h}-row "
                                      "scale block", tensor=True)
            out["weight_scale"] = arrays["weight_scale"][start // p.block_h: -(-stop // p.block_h)]
        return out

    def dequantize(self, p: Fp8Params, arrays: Mapping[str, np.ndarray], n_in: int) -> np.ndarray:
        """f32 [n_out, n_in]."""
        v = E4M3[arrays["weight_fp8"].view(np.uint8)]
        n_out = v.shape[0]
        bh, bw = p.block(n_in, n_out)
        s = scales_f32(arrays["weight_scale"]).reshape(-(-n_out // bh), -(-n_in // bw))
        return v * np.repeat(np.repeat(s, bh, axis=0)[:n_out], bw, axis=1)[:, :n_in]


FP8 = register(Fp8Format())
