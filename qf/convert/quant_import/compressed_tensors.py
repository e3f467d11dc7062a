"""compressed-tensors checkpoints (llm-compressor): `pack-quantized` integer weights and `float-quantized` FP8.

Layouts (compressed_tensors/compressors/pack_quantized, compressors/naive_quantized, quantization/lifecycle):
pack-quantized stores per linear `weight_packed` int32 [out, ceil(in*b/32)] (signed codes + 2^(b-1) as a dense
little-endian bit stream along the input: qf's `int` layout as is), `weight_scale` [out, groups],
`weight_shape` [2], asymmetric `weight_zero_point` int32 [ceil(out*b/32), groups] (packed along the output,
same offset), optional `weight_g_idx` [in]. float-quantized stores `weight` float8_e4m3fn [out, in] and
`weight_scale` (1,) | [out, 1] | [ceil(out/bh), ceil(in/bw)], optional static `input_scale`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qf.convert.checkpoint import Checkpoint
from qf.convert.quant_import.base import (
    ROWS, SHARED, LinearPayload, MemberSource, as_dict, field_error, matches, modules_with, scale_member,
    static_input_scale, tensor_error, want,
)
from qf.format.ggml_types import GGMLType
from qf.quant.formats.fp8 import FP8, Fp8Params
from qf.quant.formats.intgroup import BITS, INT, IntParams, unpack_codes

FORMATS = ("pack-quantized", "float-quantized", "naive-quantized")
STRATEGIES_INT = ("group", "channel")
STRATEGIES_FP8 = ("tensor", "channel", "block")


def _groups(qc: Mapping[str, Any], path: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """(group name, scheme) of config_groups, each with a `weights` object."""
    groups = as_dict(qc.get("config_groups"), path, "config_groups")
    out = []
    for gname, g in groups.items():
        g = as_dict(g, path, f"config_groups.{gname}")
        as_dict(g.get("weights"), path, f"config_groups.{gname}.weights")
        out.append((gname, g))
    if not out:
        raise field_error(path, "config_groups", "is empty")
    return out


def _fmt(qc: Mapping[str, Any], g: Mapping[str, Any], gname: str, path: Path) -> str:
    """The group's format (its own, else the config's)."""
    fmt = g.get("format") or qc.get("format")
    if fmt not in FORMATS:
        raise field_error(path, f"config_groups.{gname}.format", f"{fmt!r} is not supported (supported: "
                          "pack-quantized, float-quantized)")
    return fmt


def _int_params(w: Mapping[str, Any], field: str, path: Path, n_in: int) -> IntParams:
    """IntParams of an int weights config for an [*, n_in] weight."""
    bits, strat = w.get("num_bits"), w.get("strategy")
    if w.get("type", "int") != "int" or bits not in BITS:
        raise field_error(path, f"{field}.num_bits", f"{bits!r} ({w.get('type')}) : qf reads int weights of "
                          f"{', '.join(map(str, BITS))} bits")
    if strat not in STRATEGIES_INT:
        raise field_error(path, f"{field}.strategy", f"{strat!r}: pack-quantized is read for group/channel")
    group = -1 if strat == "channel" else w.get("group_size")
    if strat == "group" and (not isinstance(group, int) or group <= 0 or group * bits % 32):
        raise field_error(path, f"{field}.group_size", f"{group!r}: must be > 0 and fill whole int32 words")
    gidx = w.get("actorder") == "group"
    return IntParams(int(bits), int(group), bool(w.get("symmetric", True)), gidx)


def _pack_quantized(ckpt: Checkpoint, mod: str, w: Mapping[str, Any], field: str, path: Path) -> LinearPayload:
    """One pack-quantized linear."""
    shape_name = f"{mod}.weight_shape"
    want(ckpt, shape_name, ("I64", "I32"), (2,), "weight_shape")
    n_out, n_in = (int(v) for v in np.asarray(ckpt.raw(shape_name)).reshape(-1))
    p = _int_params(w, field, path, n_in)
    if n_in * p.bits % 32:
        raise tensor_error(ckpt, shape_name, f"{n_in} inputs of {p.bits} bits do not fill whole int32 words")
    if p.group > 0 and n_in % p.group:
        raise tensor_error(ckpt, shape_name, f"{n_in} inputs are not a whole number of groups of {p.group} "
                           f"({field}.group_size)")
    n_groups = p.n_groups(n_in)
    packed = f"{mod}.weight_packed"
    want(ckpt, packed, ("I32",), (n_out, n_in * p.bits // 32), f"weight_packed ({p.bits}-bit codes)")
    members = {"weight_packed": MemberSource((n_in * p.bits // 32, n_out), GGMLType.I32,
                                             lambda: np.ascontiguousarray(ckpt.raw(packed)))}
    members["weight_scale"] = scale_member(ckpt, f"{mod}.weight_scale", (n_out, n_groups), (n_groups, n_out), ROWS)
    consumed = [packed, shape_name, f"{mod}.weight_scale"]
    zname = f"{mod}.weight_zero_point"
    if not p.sym:
        words = -(-n_out * p.bits // 32)
        want(ckpt, zname, ("I32",), (words, n_groups), f"weight_zero_point ({p.bits}-bit, packed along the output)")
        members["weight_zero"] = MemberSource((n_groups, n_out), GGMLType.I16, lambda: _zero_points(
            ckpt.raw(zname), p.bits, n_out))
        consumed.append(zname)
    elif zname in ckpt:
        raise tensor_error(ckpt, zname, f"present, but {field}.symmetric is true")
    gname = f"{mod}.weight_g_idx"
    if gname in ckpt:
        want(ckpt, gname, ("I32", "I64"), (n_in,), "weight_g_idx")
        g = np.asarray(ckpt.raw(gname)).astype(np.int64)
        if g.size and (g.min() < 0 or g.max() >= n_groups):
            bad = int(np.flatnonzero((g < 0) | (g >= n_groups))[0])
            raise tensor_error(ckpt, gname, f"weight_g_idx[{bad}] = {int(g[bad])} is outside [0, {n_groups})")
        p = IntParams(p.bits, p.group, p.sym, True)
        members["weight_g_idx"] = MemberSource((n_in,), GGMLType.I32, lambda: g.astype(np.int32), SHARED)
        consumed.append(gname)
    elif p.g_idx:
        raise tensor_error(ckpt, gname, f"is missing ({field}.actorder is 'group')")
    return LinearPayload(f"{mod}.weight", INT.scheme(p), members, tuple(consumed), n_out, n_in)


def _zero_points(raw: np.ndarray, bits: int, n_out: int) -> np.ndarray:
    """Zero points packed along the output [words, groups] -> unsigned codes int16 [out, groups]."""
    codes = unpack_codes(np.ascontiguousarray(np.asarray(raw).T), bits)[:, :n_out]  # [groups, out]
    return np.ascontiguousarray(codes.T.astype(np.int16))


def _fp8_params(w: Mapping[str, Any], field: str, path: Path) -> Fp8Params:
    """Fp8Params of a float weights config."""
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise field_error(path, f"{field}.num_bits", f"{w.get('num_bits')!r} ({w.get('type')}): float-quantized "
                          "is read for 8-bit float (e4m3) weights")
    strat = w.get("strategy")
    if strat not in STRATEGIES_FP8:
        raise field_error(path, f"{field}.strategy", f"{strat!r}: supported: {', '.join(STRATEGIES_FP8)}")
    if strat != "block":
        return Fp8Params(strat)
    b = w.get("block_structure")
    if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
        raise field_error(path, f"{field}.block_structure", f"{b!r}: expected [rows, columns]")
    return Fp8Params("block", b[0], b[1])


def _float_quantized(ckpt: Checkpoint, mod: str, w: Mapping[str, Any], field: str, path: Path) -> LinearPayload:
    """One float-quantized (FP8) linear."""
    p = _fp8_params(w, field, path)
    vname = f"{mod}.weight"
    n_out, n_in = want(ckpt, vname, ("F8_E4M3",), None, "weight (float8_e4m3fn)")
    bh, bw = p.block(n_in, n_out)
    sshape = {"tensor": None, "channel": (n_out, 1), "block": (-(-n_out // bh), -(-n_in // bw))}[p.strategy]
    sname = f"{mod}.weight_scale"
    got = want(ckpt, sname, ("F32", "F16", "BF16"), sshape, "weight_scale")
    if p.strategy == "tensor" and int(np.prod(got)) != 1:
        raise tensor_error(ckpt, sname, f"weight_scale has shape {got}; a tensor-wise scale holds one value")
    ne = p.scale_ne(n_in, n_out)
    members = {"weight_fp8": MemberSource((n_in, n_out), GGMLType.I8,
                                          lambda: np.ascontiguousarray(ckpt.raw(vname)).view(np.int8)),
               "weight_scale": scale_member(ckpt, sname, got, ne, {"tensor": SHARED, "channel": ROWS,
                                                                  "block": bh}[p.strategy])}
    consumed = [vname, sname]
    iname = f"{mod}.input_scale"
    if iname in ckpt:
        members["input_scale"] = static_input_scale(ckpt, iname, "input_scale")
        consumed.append(iname)
    return LinearPayload(vname, FP8.scheme(p), members, tuple(consumed), n_out, n_in)


READERS = {"pack-quantized": _pack_quantized, "float-quantized": _float_quantized,
           "naive-quantized": _float_quantized}
MARKERS = {"pack-quantized": "weight_packed", "float-quantized": "weight_scale", "naive-quantized": "weight_scale"}


class CompressedTensorsImporter:
    """quant_method `compressed-tensors`."""

    method = "compressed-tensors"
    source = "compressed-tensors"

    def check(self, qc: dict[str, Any], path: Path) -> None:
        """config_groups with supported formats and weights; no sparsity, no transforms."""
        for gname, g in _groups(qc, path):
            fmt = _fmt(qc, g, gname, path)
            w = g["weights"]
            if fmt == "pack-quantized":
                _int_params(w, f"config_groups.{gname}.weights", path, 0)
            else:
                _fp8_params(w, f"config_groups.{gname}.weights", path)
        for key in ("sparsity_config", "transform_config"):
            if qc.get(key):
                raise field_error(path, key, "is set; qf reads dense quantized checkpoints only")

    def scan(self, ckpt: Checkpoint, qc: dict[str, Any], path: Path) -> dict[str, LinearPayload]:
        """Every module with a weight_scale, read by the first config group targeting it."""
        groups = _groups(qc, path)
        ignore = qc.get("ignore") or []
        out: dict[str, LinearPayload] = {}
        for mod in modules_with(ckpt, "weight_scale"):
            if matches(ignore, mod):
                raise tensor_error(ckpt, f"{mod}.weight_scale", "module is in quantization_config 'ignore' but "
                                   "holds quantization scales")
            hit = next(((gn, g) for gn, g in groups if matches(g.get("targets"), mod)), None)
            if hit is None:
                raise tensor_error(ckpt, f"{mod}.weight_scale", "no config group targets this module")
            gname, g = hit
            fmt = _fmt(qc, g, gname, path)
            if MARKERS[fmt] == "weight_packed" and f"{mod}.weight_packed" not in ckpt:
                raise tensor_error(ckpt, f"{mod}.weight_packed", f"is missing (config group {gname} is {fmt})")
            lp = READERS[fmt](ckpt, mod, g["weights"], f"config_groups.{gname}.weights", path)
            out[lp.hf_weight] = lp
        return out


IMPORTER = CompressedTensorsImporter()
