"""Hugging Face `fp8` checkpoints (`quant_method: fp8`, FineGrainedFP8Config; DeepSeek-V3 style) -> qf's `fp8`
payload.

Layout (transformers/integrations/finegrained_fp8.py, Fp8Quantize / Fp8Dequantize): per linear `weight`
float8_e4m3fn [out, in] and `weight_scale_inv` float32 [out / bh, in / bw] for weight_block_size [bh, bw] (one
value without a block size); W = weight * weight_scale_inv. A static `activation_scale` is kept as input_scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qf.convert.checkpoint import Checkpoint
from qf.convert.quant_import.base import (
    ROWS, SHARED, LinearPayload, MemberSource, field_error, modules_with, scale_member, static_input_scale,
    tensor_error, want,
)
from qf.format.ggml_types import GGMLType
from qf.quant.formats.fp8 import FP8, Fp8Params


def _params(qc: Mapping[str, Any], path: Path) -> Fp8Params:
    """Block scales for weight_block_size [rows, columns], a tensor scale for null."""
    b = qc.get("weight_block_size")
    if b is None:
        return Fp8Params("tensor")
    if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
        raise field_error(path, "weight_block_size", f"{b!r}: expected [rows, columns]")
    return Fp8Params("block", b[0], b[1])


class HfFp8Importer:
    """quant_method `fp8`."""

    method = "fp8"
    source = "hf-fp8"

    def check(self, qc: dict[str, Any], path: Path) -> None:
        """A block size qf reads and float32/bf16 scales (UE8M0 scales are not read)."""
        _params(qc, path)
        if qc.get("scale_fmt") not in (None, "float", "float32", "fp32"):
            raise field_error(path, "scale_fmt", f"{qc.get('scale_fmt')!r}: qf reads float32 weight_scale_inv")

    def scan(self, ckpt: Checkpoint, qc: dict[str, Any], path: Path) -> dict[str, LinearPayload]:
        """Every module with a weight_scale_inv."""
        p = _params(qc, path)
        out = {}
        for mod in modules_with(ckpt, "weight_scale_inv"):
            lp = self._module(ckpt, mod, p)
            out[lp.hf_weight] = lp
        return out

    def _module(self, ckpt: Checkpoint, mod: str, p: Fp8Params) -> LinearPayload:
        """One FP8 linear."""
        vname, sname, aname = f"{mod}.weight", f"{mod}.weight_scale_inv", f"{mod}.activation_scale"
        n_out, n_in = want(ckpt, vname, ("F8_E4M3",), None, "weight (float8_e4m3fn)")
        bh, bw = p.block(n_in, n_out)
        sshape = want(ckpt, sname, ("F32", "BF16", "F16"), None, "weight_scale_inv")
        if p.strategy == "tensor" and int(np.prod(sshape)) != 1:
            raise tensor_error(ckpt, sname, f"weight_scale_inv has shape {sshape}; without weight_block_size it "
                               "holds one value")
        if p.strategy == "block" and sshape != (-(-n_out // bh), -(-n_in // bw)):
            raise tensor_error(ckpt, sname, f"weight_scale_inv has shape {sshape}, expected "
                               f"{(-(-n_out // bh), -(-n_in // bw))} for [{bh}, {bw}] blocks of a [{n_out}, {n_in}] weight")
        members = {"weight_fp8": MemberSource((n_in, n_out), GGMLType.I8,
                                              lambda: np.ascontiguousarray(ckpt.raw(vname)).view(np.int8)),
                   "weight_scale": scale_member(ckpt, sname, sshape, p.scale_ne(n_in, n_out),
                                                SHARED if p.strategy == "tensor" else (bh if bh > 1 else ROWS))}
        consumed = [vname, sname]
        if aname in ckpt:
            members["input_scale"] = static_input_scale(ckpt, aname, "activation_scale")
            consumed.append(aname)
        return LinearPayload(vname, FP8.scheme(p), members, tuple(consumed), n_out, n_in)


IMPORTER = HfFp8Importer()
