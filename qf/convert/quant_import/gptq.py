"""Classic GPTQ (`quant_method: gptq`, GPTQModel / AutoGPTQ) and AWQ GEMM (`quant_method: awq`, AutoAWQ)
checkpoints -> qf's `int` payload.

Layouts, checked against GPTQModel 7.7's own code (nn_modules/qlinear/__init__.py pack_original,
dequantize_weight; utils/model.py convert_gptq_v2_to_v1_format_module; quantization/awq/utils/packing_utils.py):
- GPTQ: `qweight` int32 [in * b / 32, out], code of input i at bits (i % (32/b)) * b of word i // (32/b) (qf's
  bit order, transposed); `qzeros` int32 [groups, out * b / 32] packed along the output the same way; `scales`
  [groups, out]; `g_idx` int32 [in]. checkpoint_format `gptq` (v1) stores every zero-point *word* minus
  0x11111111 (4-bit; 0x55555555 for 2, 0x01010101 for 8), so the word is added back before unpacking (exact, also
  where a zero of 0 borrowed); `gptq_v2` stores them as they are. 3-bit codes straddle words: refused.
- AWQ GEMM: `qweight` int32 [in, out / 8], `qzeros` int32 [groups, out / 8], `scales` [groups, out]; word c holds
  outputs 8c + [0, 2, 4, 6, 1, 3, 5, 7][j] in its nibble j. W = scales * (q - zeros).
Zero points that all equal 2^(b-1) make the payload symmetric (exactly); a group index equal to i // group is
dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from qf.convert.checkpoint import Checkpoint
from qf.convert.quant_import.base import (
    SHARED, SCALE_TYPES, LinearPayload, MemberSource, field_error, modules_with, tensor_error, want,
)
from qf.format.ggml_types import GGMLType
from qf.quant.formats.intgroup import BITS, INT, IntParams, pack_codes, unpack_codes

GPTQ_FORMATS = ("gptq", "gptq_v2")
V1_ZERO_WORD = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}  # what GPTQ v1 subtracted from each qzeros word
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble j of an AWQ word holds output 8c + AWQ_ORDER[j]
AWQ_VERSIONS = ("gemm",)
AWQ_REFUSED = {"gemv": "GEMV packs 8 inputs per word with its own interleave", "gemv_fast": "GEMV-fast",
               "marlin": "Marlin's tile-permuted layout", "exllama": "ExLlama's shuffled layout",
               "exllamav2": "ExLlamaV2's shuffled layout", "ipex": "IPEX's layout"}


def _group_size(qc: Mapping[str, Any], key: str, bits: int, path: Path) -> int:
    """group_size: -1 or > 0 filling whole int32 words."""
    g = qc.get(key, -1)
    if not isinstance(g, int) or isinstance(g, bool) or not (g == -1 or (g > 0 and g * bits % 32 == 0)):
        raise field_error(path, key, f"{g!r}: must be -1 or a positive size filling whole int32 words")
    return g


def _bits(qc: Mapping[str, Any], key: str, allowed: tuple[int, ...], path: Path) -> int:
    """bits, one qf reads (3-bit named with its reason)."""
    b = qc.get(key)
    if b == 3:
        raise field_error(path, key, "3-bit codes straddle int32 words (10 2/3 per word); qf's int payloads hold "
                          f"{', '.join(map(str, allowed))}-bit codes, which never do")
    if b not in allowed:
        raise field_error(path, key, f"{b!r}: qf reads {', '.join(map(str, allowed))}-bit weights")
    return int(b)


def _zeros_to_members(zeros: Callable[[], np.ndarray], bits: int, ckpt: Checkpoint, zname: str, sym_cfg: bool
                      ) -> tuple[bool, MemberSource | None, np.ndarray]:
    """(symmetric, zero member or None, zeros [out, groups]); symmetric when every zero is 2^(bits-1)."""
    z = zeros()
    mid = 1 << (bits - 1)
    if np.all(z == mid):
        return True, None, z
    if sym_cfg:
        bad = tuple(int(v) for v in np.argwhere(z != mid)[0])
        raise tensor_error(ckpt, zname, f"config says sym, but the zero point of (output, group) {bad} is "
                           f"{int(z[bad])}, not {mid}")
    return False, MemberSource((z.shape[1], z.shape[0]), GGMLType.I16, lambda: np.ascontiguousarray(z)), z


def _scales(ckpt: Checkpoint, name: str, groups: int, n_out: int) -> MemberSource:
    """scales [groups, out] -> qf's [out, groups] member, stored dtype kept."""
    want(ckpt, name, tuple(SCALE_TYPES), (groups, n_out), "scales")
    return MemberSource((groups, n_out), SCALE_TYPES[ckpt.entry(name).dtype],
                        lambda: np.ascontiguousarray(np.asarray(ckpt.raw(name)).T))


def _g_idx(ckpt: Checkpoint, name: str, n_in: int, group: int, groups: int, required: bool
           ) -> MemberSource | None:
    """The group index member (None when absent or trivially i // group)."""
    if name not in ckpt:
        if required:
            raise tensor_error(ckpt, name, "is missing (desc_act is true)")
        return None
    want(ckpt, name, ("I32", "I64"), (n_in,), "g_idx")
    g = np.asarray(ckpt.raw(name)).astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= groups):
        bad = int(np.flatnonzero((g < 0) | (g >= groups))[0])
        raise tensor_error(ckpt, name, f"g_idx[{bad}] = {int(g[bad])} is outside [0, {groups})")
    if np.array_equal(g, np.arange(n_in) // group if group > 0 else np.zeros(n_in, np.int64)):
        return None
    return MemberSource((n_in,), GGMLType.I32, lambda: g.astype(np.int32), SHARED)


def _payload(mod: str, p: IntParams, members: dict[str, MemberSource], consumed: list[str], n_out: int,
             n_in: int) -> LinearPayload:
    """The LinearPayload of one module."""
    return LinearPayload(f"{mod}.weight", INT.scheme(p), members, tuple(consumed), n_out, n_in)


class GptqImporter:
    """quant_method `gptq`: checkpoint_format gptq (v1) and gptq_v2."""

    method = "gptq"
    source = "gptq"

    def check(self, qc: dict[str, Any], path: Path) -> None:
        """bits 2/4/8, group size, a known checkpoint format, int32 packing."""
        _bits(qc, "bits", BITS, path)
        _group_size(qc, "group_size", qc["bits"], path)
        fmt = self._format(qc)
        if fmt not in GPTQ_FORMATS:
            raise field_error(path, "checkpoint_format", f"{fmt!r}: qf reads {', '.join(GPTQ_FORMATS)} (Marlin, "
                              "BitBLAS and other kernel layouts must be saved as gptq first)")
        if qc.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
            raise field_error(path, "pack_dtype", f"{qc.get('pack_dtype')!r}: qf reads int32 packing")

    @staticmethod
    def _format(qc: Mapping[str, Any]) -> str:
        """checkpoint_format (GPTQModel also writes `format`); gptq when absent."""
        return str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()

    def scan(self, ckpt: Checkpoint, qc: dict[str, Any], path: Path) -> dict[str, LinearPayload]:
        """Every module with a qweight."""
        bits, v1 = int(qc["bits"]), self._format(qc) == "gptq"
        group = _group_size(qc, "group_size", bits, path)
        out = {}
        for mod in modules_with(ckpt, "qweight"):
            lp = self._module(ckpt, mod, bits, group, v1, bool(qc.get("sym", True)), bool(qc.get("desc_act")))
            out[lp.hf_weight] = lp
        return out

    def _module(self, ckpt: Checkpoint, mod: str, bits: int, group: int, v1: bool, sym: bool, desc_act: bool
                ) -> LinearPayload:
        """One GPTQ linear."""
        qw, qz, sc, gi = (f"{mod}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx"))
        words, n_out = want(ckpt, qw, ("I32",), None, f"qweight ({bits}-bit codes packed along the input)")
        n_in = words * 32 // bits
        groups = 1 if group <= 0 else -(-n_in // group)
        want(ckpt, qz, ("I32",), (groups, -(-n_out * bits // 32)), f"qzeros ({bits}-bit, packed along the output)")
        scale = _scales(ckpt, sc, groups, n_out)

        def zeros() -> np.ndarray:
            raw = np.asarray(ckpt.raw(qz)).view(np.uint32)
            if v1:
                raw = (raw.astype(np.uint64) + V1_ZERO_WORD[bits]).astype(np.uint32)
            return np.ascontiguousarray(unpack_codes(raw, bits)[:, :n_out].T.astype(np.int16))  # [out, groups]

        is_sym, zmember, _ = _zeros_to_members(zeros, bits, ckpt, qz, sym)
        gmember = _g_idx(ckpt, gi, n_in, group, groups, desc_act)
        members = {"weight_packed": MemberSource((words, n_out), GGMLType.I32,
                                                 lambda: np.ascontiguousarray(np.asarray(ckpt.raw(qw)).T)),
                   "weight_scale": scale}
        if zmember is not None:
            members["weight_zero"] = zmember
        if gmember is not None:
            members["weight_g_idx"] = gmember
        consumed = [qw, qz, sc] + ([gi] if gi in ckpt else [])
        return _payload(mod, IntParams(bits, group, is_sym, gmember is not None), members, consumed, n_out, n_in)


def _awq_unpack(words: np.ndarray, n: int) -> np.ndarray:
    """AWQ-packed int32 [rows, n / 8] -> 4-bit codes uint8 [rows, n] in output order."""
    nib = unpack_codes(np.ascontiguousarray(words), 4)  # [rows, n]: nibble j of word c at 8c + j
    out = np.empty_like(nib)
    out.reshape(nib.shape[0], -1, 8)[:, :, AWQ_ORDER] = nib.reshape(nib.shape[0], -1, 8)
    return out[:, :n]


class AwqImporter:
    """quant_method `awq`: the GEMM layout."""

    method = "awq"
    source = "awq"

    def check(self, qc: dict[str, Any], path: Path) -> None:
        """4-bit GEMM with zero points."""
        version = str(qc.get("version", "gemm")).lower()
        if version in AWQ_REFUSED:
            raise field_error(path, "version", f"{version!r}: {AWQ_REFUSED[version]} is not read; qf reads AWQ "
                              "GEMM (save the model with version 'gemm')")
        if version not in AWQ_VERSIONS:
            raise field_error(path, "version", f"{version!r}: qf reads AWQ GEMM")
        _bits(qc, "bits" if "bits" in qc else "w_bit", (4,), path)
        _group_size(qc, "group_size" if "group_size" in qc else "q_group_size", 4, path)

    def scan(self, ckpt: Checkpoint, qc: dict[str, Any], path: Path) -> dict[str, LinearPayload]:
        """Every module with a qweight."""
        group = _group_size(qc, "group_size" if "group_size" in qc else "q_group_size", 4, path)
        out = {}
        for mod in modules_with(ckpt, "qweight"):
            lp = self._module(ckpt, mod, group)
            out[lp.hf_weight] = lp
        return out

    def _module(self, ckpt: Checkpoint, mod: str, group: int) -> LinearPayload:
        """One AWQ GEMM linear."""
        qw, qz, sc = (f"{mod}.{s}" for s in ("qweight", "qzeros", "scales"))
        n_in, cols = want(ckpt, qw, ("I32",), None, "qweight (4-bit codes packed along the output, AWQ order)")
        if n_in % 8:
            raise tensor_error(ckpt, qw, f"{n_in} inputs do not fill whole int32 words of 4-bit codes")
        groups = 1 if group <= 0 else -(-n_in // group)
        scale_shape = want(ckpt, sc, tuple(SCALE_TYPES), None, "scales")
        n_out = scale_shape[-1]
        if scale_shape != (groups, n_out) or -(-n_out // 8) != cols:
            raise tensor_error(ckpt, sc, f"scales has shape {scale_shape}, expected ({groups}, out) with out / 8 = "
                               f"{cols} qweight columns")
        want(ckpt, qz, ("I32",), (groups, cols), "qzeros (4-bit, packed along the output, AWQ order)")

        def zeros() -> np.ndarray:
            return np.ascontiguousarray(_awq_unpack(np.asarray(ckpt.raw(qz)).view(np.uint32), n_out).T
                                        .astype(np.int16))

        is_sym, zmember, _ = _zeros_to_members(zeros, 4, ckpt, qz, False)
        members = {"weight_packed": MemberSource((n_in // 8, n_out), GGMLType.I32, lambda: pack_codes(
            np.ascontiguousarray(_awq_unpack(np.asarray(ckpt.raw(qw)).view(np.uint32), n_out).T), 4)),
            "weight_scale": _scales(ckpt, sc, groups, n_out)}
        if zmember is not None:
            members["weight_zero"] = zmember
        return _payload(mod, IntParams(4, group, is_sym, False), members, [qw, qz, sc], n_out, n_in)


GPTQ = GptqImporter()
AWQ = AwqImporter()
