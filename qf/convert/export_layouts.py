"""Hugging Face quantized checkpoint layouts the exporter writes, a registry keyed by `--format` name.

Each layout says which linears it can hold (ConvertError naming the tensor otherwise), declares the safetensors
tensors of one linear (name, dtype, shape) before any is written, produces them, and writes quantization_config.
The layouts are the inverse of the importers (qf.convert.quant_import), which cite the libraries' code:
- `compressed-tensors`: pack-quantized (`weight_packed` [out, in*b/32] int32, `weight_scale` [out, groups],
  `weight_shape` int64 [2], `weight_zero_point` int32 [ceil(out*b/32), groups] packed along the output,
  `weight_g_idx` int32 [in]) and float-quantized (`weight` F8_E4M3, `weight_scale`, static `input_scale`);
- `gptq` (GPTQModel / AutoGPTQ, checkpoint_format gptq = v1 with zero points stored minus one, or gptq_v2):
  `qweight` [in*b/32, out], `qzeros` [groups, out*b/32], `scales` fp16 [groups, out], `g_idx` [in];
- `awq` (AutoAWQ GEMM): `qweight` [in, out/8] and `qzeros` [groups, out/8] in the [0, 2, 4, 6, 1, 3, 5, 7]
  nibble order, `scales` fp16 [groups, out];
- `fp8` (transformers' FineGrainedFP8, quant_method fp8): `weight` F8_E4M3, `weight_scale_inv`, `activation_scale`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from qf.convert.export_linears import Fp8Linear, IntLinear, Linear, LinearInfo
from qf.convert.quant_import.gptq import AWQ_ORDER, V1_ZERO_WORD
from qf.format.errors import ConvertError
from qf.quant.formats.fp8 import Fp8Params
from qf.quant.formats.intgroup import IntParams, pack_codes

Entry = tuple[str, str, tuple[int, ...]]  # safetensors (name, dtype, shape)
NP_SCALE = {"F32": np.float32, "F16": np.float16}


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes u8 [rows, n] -> int32 words [rows, ceil(n*bits/32)] (zero codes pad the last word)."""
    per = 32 // bits
    pad = -codes.shape[1] % per
    if pad:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], pad), codes.dtype)], axis=1)
    return pack_codes(codes, bits)


def _g_idx(lin: IntLinear) -> np.ndarray:
    """The group of every input, int32 [n_in] (stored, else i // group)."""
    if lin.g_idx is not None:
        return lin.g_idx.astype(np.int32)
    return lin.info.params.group_of(lin.info.n_in, None).astype(np.int32)


def _zeros(lin: IntLinear) -> np.ndarray:
    """Zero points int16 [n_out, groups] (2^(bits-1) for a symmetric weight)."""
    if lin.zero is not None:
        return lin.zero
    return np.full(lin.scale.shape, 1 << (lin.info.params.bits - 1), np.int16)


def _f16_scales(info: LinearInfo, scale: np.ndarray, name: str, layout: str) -> np.ndarray:
    """Scales as fp16, refused when one is not exactly an fp16 value (the layout stores fp16)."""
    s = scale.astype(np.float32) if info.scale_dtype != "BF16" else (scale.astype(np.uint32) << 16).view(np.float32)
    h = s.astype(np.float16)
    bad = ~np.isfinite(h) | (h.astype(np.float32) != s)
    if np.any(bad):
        raise ConvertError(f"tensor {name!r}: {int(bad.sum())} scales are not exact fp16 values; {layout} stores fp16 "
                           "scales (export as compressed-tensors, which keeps them as they are)")
    return h


def _module(hf_weight: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj`."""
    return hf_weight[: -len(".weight")]


class Layout(Protocol):
    """One HF quantized layout."""

    name: str

    def check(self, infos: dict[str, LinearInfo]) -> None:
        """Every linear (HF weight name -> info) fits the layout and its one config; ConvertError otherwise."""

    def entries(self, hf_weight: str, info: LinearInfo) -> list[Entry]:
        """The tensors of one linear, in the order tensors() yields them."""

    def tensors(self, hf_weight: str, lin: Linear) -> list[tuple[str, np.ndarray]]:
        """The arrays of one linear."""

    def config(self, infos: dict[str, LinearInfo], ignore: list[str]) -> dict[str, Any]:
        """quantization_config; ignore: modules written unquantized (lm_head and such)."""


def _uniform(infos: dict[str, LinearInfo], layout: str, key: Callable[[LinearInfo], Any], what: str) -> Any:
    """The one value key() has over every linear; ConvertError naming a linear that differs."""
    first = next(iter(infos.items()))
    for name, info in infos.items():
        if key(info) != key(first[1]):
            raise ConvertError(f"tensor {name!r} ({info.origin}) differs in {what} from {first[0]!r} "
                               f"({first[1].origin}); a {layout} config holds one {what}")
    return key(first[1])


def _only_int(infos: dict[str, LinearInfo], layout: str) -> None:
    """Refuse FP8 weights in an integer layout."""
    for name, info in infos.items():
        if not isinstance(info.params, IntParams):
            raise ConvertError(f"tensor {name!r} is {info.origin}; {layout} holds integer weights (FP8 exports as "
                               "compressed-tensors or fp8)")


# ---------------------------------------------------------------------------------------------- compressed-tensors

def _ct_weights_args(p: IntParams | Fp8Params) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs (as JSON) of one scheme."""
    if isinstance(p, Fp8Params):
        out = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": p.strategy, "group_size": None,
               "dynamic": False}
        if p.strategy == "block":
            out["block_structure"] = [p.block_h, p.block_w]
        return out
    return {"num_bits": p.bits, "type": "int", "symmetric": p.sym, "strategy": "channel" if p.group == -1 else "group",
            "group_size": None if p.group == -1 else p.group, "dynamic": False,
            "actorder": "group" if p.g_idx else None}


STATIC_INPUT = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


class CompressedTensors:
    """compressed-tensors pack-quantized / float-quantized; one config group per scheme."""

    name = "compressed-tensors"

    def check(self, infos: dict[str, LinearInfo]) -> None:
        """Every int and FP8 scheme fits; nothing to refuse."""

    def entries(self, hf_weight: str, info: LinearInfo) -> list[Entry]:
        """pack-quantized or float-quantized members."""
        m, p = _module(hf_weight), info.params
        if isinstance(p, Fp8Params):
            out = [(f"{m}.weight", "F8_E4M3", (info.n_out, info.n_in)), (f"{m}.weight_scale", info.scale_dtype,
                                                                         info.scale_shape)]
            return out + ([(f"{m}.input_scale", "F32", (1,))] if info.input_scale else [])
        groups = p.n_groups(info.n_in)
        out = [(f"{m}.weight_packed", "I32", (info.n_out, -(-info.n_in * p.bits // 32))),
               (f"{m}.weight_scale", info.scale_dtype, (info.n_out, groups)), (f"{m}.weight_shape", "I64", (2,))]
        if not p.sym:
            out.append((f"{m}.weight_zero_point", "I32", (-(-info.n_out * p.bits // 32), groups)))
        if p.g_idx:
            out.append((f"{m}.weight_g_idx", "I32", (info.n_in,)))
        return out

    def tensors(self, hf_weight: str, lin: Linear) -> list[tuple[str, np.ndarray]]:
        """Arrays in entries() order."""
        m = _module(hf_weight)
        if isinstance(lin, Fp8Linear):
            out = [(f"{m}.weight", lin.values), (f"{m}.weight_scale", lin.scale)]
            return out + ([(f"{m}.input_scale", lin.input_scale)] if lin.info.input_scale else [])
        p = lin.info.params
        out = [(f"{m}.weight_packed", _pack_rows(lin.codes, p.bits)), (f"{m}.weight_scale", lin.scale),
               (f"{m}.weight_shape", np.array([lin.info.n_out, lin.info.n_in], np.int64))]
        if not p.sym:
            out.append((f"{m}.weight_zero_point", np.ascontiguousarray(_pack_rows(_zeros(lin).T.astype(np.uint8),
                                                                                  p.bits).T)))
        if p.g_idx:
            out.append((f"{m}.weight_g_idx", _g_idx(lin)))
        return out

    def config(self, infos: dict[str, LinearInfo], ignore: list[str]) -> dict[str, Any]:
        """config_groups by scheme (targets: Linear when one scheme covers every linear, else module names)."""
        by: dict[str, list[str]] = {}
        for name, info in infos.items():
            key = repr((info.params, info.input_scale))
            by.setdefault(key, []).append(_module(name))
        groups, formats = {}, set()
        for i, mods in enumerate(by.values()):
            info = infos[mods[0] + ".weight"]
            fmt = "float-quantized" if isinstance(info.params, Fp8Params) else "pack-quantized"
            formats.add(fmt)
            groups[f"group_{i}"] = {"targets": ["Linear"] if len(by) == 1 else mods, "format": fmt,
                                    "weights": _ct_weights_args(info.params),
                                    "input_activations": dict(STATIC_INPUT) if info.input_scale else None,
                                    "output_activations": None}
        return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
                "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
                "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}


# --------------------------------------------------------------------------------------------------------- gptq

class Gptq:
    """Classic GPTQ (v1 by default: the most widely loadable layout; gptq_v2 on request)."""

    name = "gptq"

    def __init__(self, checkpoint_format: str = "gptq") -> None:
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ConvertError(f"GPTQ checkpoint_format {checkpoint_format!r}: write gptq or gptq_v2")
        self.checkpoint_format = checkpoint_format

    def check(self, infos: dict[str, LinearInfo]) -> None:
        """Integer weights of one bit width and group size."""
        _only_int(infos, self.name)
        _uniform(infos, self.name, lambda i: i.params.bits, "bit width")
        _uniform(infos, self.name, lambda i: i.params.group, "group size")

    def entries(self, hf_weight: str, info: LinearInfo) -> list[Entry]:
        """qweight, qzeros, scales, g_idx."""
        m, p = _module(hf_weight), info.params
        groups = p.n_groups(info.n_in)
        return [(f"{m}.qweight", "I32", (-(-info.n_in * p.bits // 32), info.n_out)),
                (f"{m}.qzeros", "I32", (groups, -(-info.n_out * p.bits // 32))),
                (f"{m}.scales", "F16", (groups, info.n_out)), (f"{m}.g_idx", "I32", (info.n_in,))]

    def tensors(self, hf_weight: str, lin: Linear) -> list[tuple[str, np.ndarray]]:
        """Codes packed along the input, zero points along the output (v1: each word minus 0x11111111 for 4 bits)."""
        m, p = _module(hf_weight), lin.info.params
        zeros = _pack_rows(np.ascontiguousarray(_zeros(lin).T).astype(np.uint8), p.bits).view(np.uint32)
        if self.checkpoint_format == "gptq":
            zeros = (zeros.astype(np.int64) - V1_ZERO_WORD[p.bits]).astype(np.uint32)  # mod 2^32, as v1 stores
        return [(f"{m}.qweight", np.ascontiguousarray(_pack_rows(lin.codes, p.bits).T)),
                (f"{m}.qzeros", zeros.view(np.int32)),
                (f"{m}.scales", np.ascontiguousarray(_f16_scales(lin.info, lin.scale, hf_weight, self.name).T)),
                (f"{m}.g_idx", _g_idx(lin))]

    def config(self, infos: dict[str, LinearInfo], ignore: list[str]) -> dict[str, Any]:
        """GPTQModel's quantize_config fields that loaders read."""
        p = next(iter(infos.values())).params
        return {"quant_method": "gptq", "bits": p.bits, "group_size": p.group,
                "desc_act": any(i.params.g_idx for i in infos.values()),
                "sym": all(i.params.sym for i in infos.values()), "checkpoint_format": self.checkpoint_format,
                "pack_dtype": "int32", "true_sequential": True, "static_groups": False, "lm_head": False}


# ---------------------------------------------------------------------------------------------------------- awq

def _awq_pack(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [rows, n] (n a multiple of 8) in output order -> AWQ GEMM words [rows, n / 8]."""
    inter = np.empty_like(codes)
    inter.reshape(codes.shape[0], -1, 8)[:] = codes.reshape(codes.shape[0], -1, 8)[:, :, AWQ_ORDER]
    return pack_codes(inter, 4)


class Awq:
    """AutoAWQ GEMM: 4-bit, zero points, groups without act-order."""

    name = "awq"

    def check(self, infos: dict[str, LinearInfo]) -> None:
        """4-bit, no group index, one group size, whole words of outputs."""
        _only_int(infos, self.name)
        for name, info in infos.items():
            p = info.params
            why = ("it is not 4-bit" if p.bits != 4 else "it has an act-order group index" if p.g_idx else
                   f"its {info.n_out} outputs are not a multiple of 8" if info.n_out % 8 else "")
            if why:
                raise ConvertError(f"tensor {name!r} ({info.origin}): AWQ GEMM cannot hold it: {why}")
        _uniform(infos, self.name, lambda i: i.params.group, "group size")

    def entries(self, hf_weight: str, info: LinearInfo) -> list[Entry]:
        """qweight, qzeros, scales."""
        m, groups = _module(hf_weight), info.params.n_groups(info.n_in)
        return [(f"{m}.qweight", "I32", (info.n_in, info.n_out // 8)),
                (f"{m}.qzeros", "I32", (groups, info.n_out // 8)), (f"{m}.scales", "F16", (groups, info.n_out))]

    def tensors(self, hf_weight: str, lin: Linear) -> list[tuple[str, np.ndarray]]:
        """Codes and zero points packed along the output in AWQ's nibble order."""
        m = _module(hf_weight)
        return [(f"{m}.qweight", _awq_pack(np.ascontiguousarray(lin.codes.T))),
                (f"{m}.qzeros", _awq_pack(np.ascontiguousarray(_zeros(lin).T).astype(np.uint8))),
                (f"{m}.scales", np.ascontiguousarray(_f16_scales(lin.info, lin.scale, hf_weight, self.name).T))]

    def config(self, infos: dict[str, LinearInfo], ignore: list[str]) -> dict[str, Any]:
        """AwqConfig fields."""
        return {"quant_method": "awq", "bits": 4, "group_size": next(iter(infos.values())).params.group,
                "zero_point": True, "version": "gemm", "modules_to_not_convert": ignore or None}


# ---------------------------------------------------------------------------------------------------------- fp8

def _hf_fp8_scale_shape(info: LinearInfo) -> tuple[int, ...]:
    """weight_scale_inv is 2-D, one value per block; a tensor scale is the one block [1, 1] (as transformers'
    Fp8Quantize writes it)."""
    return (1, 1) if info.params.strategy == "tensor" else info.scale_shape


class HfFp8:
    """transformers' fine-grained FP8 (quant_method fp8): block or tensor scales, multiplied."""

    name = "fp8"

    def check(self, infos: dict[str, LinearInfo]) -> None:
        """FP8 weights, block (or tensor) scales of one shape."""
        for name, info in infos.items():
            if not isinstance(info.params, Fp8Params) or info.params.strategy == "channel":
                raise ConvertError(f"tensor {name!r} is {info.origin}; the fp8 layout holds FP8 weights with block "
                                   "or tensor scales (export it as compressed-tensors)")
            p = info.params
            if p.strategy == "block" and (info.n_out % p.block_h or info.n_in % p.block_w):
                raise ConvertError(f"tensor {name!r} is {info.n_out}x{info.n_in}, not whole {p.block_h}x{p.block_w} "
                                   "blocks: transformers' fp8 layout refuses partial blocks ('not divisible by scale "
                                   "grid'); export it as compressed-tensors, which keeps them")
        _uniform(infos, self.name, lambda i: i.params, "scale scheme")
        _uniform(infos, self.name, lambda i: i.input_scale, "static activation scale")

    def entries(self, hf_weight: str, info: LinearInfo) -> list[Entry]:
        """weight, weight_scale_inv, activation_scale."""
        m = _module(hf_weight)
        out = [(f"{m}.weight", "F8_E4M3", (info.n_out, info.n_in)),
               (f"{m}.weight_scale_inv", info.scale_dtype, _hf_fp8_scale_shape(info))]
        return out + ([(f"{m}.activation_scale", "F32", (1,))] if info.input_scale else [])

    def tensors(self, hf_weight: str, lin: Linear) -> list[tuple[str, np.ndarray]]:
        """Arrays in entries() order."""
        m = _module(hf_weight)
        out = [(f"{m}.weight", lin.values), (f"{m}.weight_scale_inv", lin.scale.reshape(_hf_fp8_scale_shape(lin.info)))]
        return out + ([(f"{m}.activation_scale", lin.input_scale)] if lin.info.input_scale else [])

    def config(self, infos: dict[str, LinearInfo], ignore: list[str]) -> dict[str, Any]:
        """FineGrainedFP8Config fields."""
        info = next(iter(infos.values()))
        p = info.params
        return {"quant_method": "fp8", "activation_scheme": "static" if info.input_scale else "dynamic",
                "weight_block_size": [p.block_h, p.block_w] if p.strategy == "block" else None,
                "modules_to_not_convert": ignore or None}


LAYOUTS: dict[str, Callable[..., Layout]] = {"compressed-tensors": CompressedTensors, "gptq": Gptq, "awq": Awq,
                                             "fp8": HfFp8}
SOURCE_LAYOUT = {"compressed-tensors": "compressed-tensors", "gptq": "gptq", "awq": "awq", "hf-fp8": "fp8"}


def layout(name: str, **options: Any) -> Layout:
    """A layout by --format name; ConvertError listing the known ones."""
    if name not in LAYOUTS:
        raise ConvertError(f"unknown quantized export format {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name](**options)
