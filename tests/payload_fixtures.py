"""Quantized checkpoints made by the ecosystem's own code (compressed-tensors), with their reference weights.

`ct_checkpoint(src, out, weights)` loads a tiny HF checkpoint into transformers, quantizes every linear but
lm_head with compressed-tensors' own qparams (calculate_qparams over min/max of each group, channel, block or
tensor: round-to-nearest), compresses it with ModelCompressor and saves it with save_pretrained; the reference
weights are compressed-tensors' own decompression of the saved state.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

SCHEMES: dict[str, tuple[dict[str, Any], str]] = {  # name -> (compressed-tensors weights args, format)
    "w4a16_g32_sym": ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
                      "pack-quantized"),
    "w4a16_g64_sym": ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64},
                      "pack-quantized"),
    "w4a16_g32_asym": ({"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
                       "pack-quantized"),
    "w8a16_channel_sym": ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, "pack-quantized"),
    "w2_g16_asym": ({"num_bits": 2, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16},
                    "pack-quantized"),
    "w8a16_g64_asym": ({"num_bits": 8, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64},
                       "pack-quantized"),
    "fp8_tensor": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}, "float-quantized"),
    "fp8_channel": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}, "float-quantized"),
    "fp8_block": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                   "block_structure": [32, 32]}, "float-quantized"),
}


def _minmax(w: Any, a: Any) -> tuple[Any, Any]:
    """Observed min/max over the unit a scale covers (RTN observer)."""
    if a.strategy == "group":
        x = w.unflatten(-1, (-1, a.group_size))
        return x.amin(-1), x.amax(-1)
    if a.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if a.strategy == "block":
        bh, bw = a.block_structure
        x = w.unflatten(0, (-1, bh)).unflatten(-1, (-1, bw))
        return x.amin((1, 3)), x.amax((1, 3))
    return w.amin().reshape(1), w.amax().reshape(1)


def ct_checkpoint(src: Path, out: Path, scheme: str, f16_scales: bool = False) -> dict[str, np.ndarray]:
    """Quantize the checkpoint at src with compressed-tensors into out (tokenizer files copied); returns the
    reference: every quantized module's weight as compressed-tensors decompresses it (f32 numpy). f16_scales:
    each scale rounded to an fp16 value (still stored as f32) before compression, as GPTQ's fp16 scales are."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import AutoModelForCausalLM

    args_d, fmt = SCHEMES[scheme]
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    args = QuantizationArgs(**args_d)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                            ignore=["lm_head"])
    apply_quantization_config(m, qc)
    with torch.no_grad():
        for _, mod in m.named_modules():
            if hasattr(mod, "weight_scale"):
                s, z = calculate_qparams(*_minmax(mod.weight, args), args)
                s = s.half().float() if f16_scales else s
                mod.weight_scale.data = s.to(mod.weight_scale.dtype).reshape(mod.weight_scale.shape)
                if hasattr(mod, "weight_zero_point"):
                    mod.weight_zero_point.data = z.to(mod.weight_zero_point.dtype).reshape(mod.weight_zero_point.shape)
    comp = ModelCompressor.from_pretrained_model(m, fmt)
    comp.compress_model(m)
    out.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(out)
    comp.update_config(out)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    comp.decompress_model(m)
    return {n + ".weight": mod.weight.detach().float().numpy().copy() for n, mod in m.named_modules()
            if hasattr(mod, "weight_scale")}


def reference_logits(src: Path, weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """transformers' logits of the unquantized checkpoint at src with the given weights put in (f32)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    sd = m.state_dict()
    with torch.no_grad():
        for n, w in weights.items():
            sd[n].copy_(torch.from_numpy(w))
        return m(torch.tensor([ids])).logits[0].numpy()


def _quantized_folder(src: Path, out: Path, model: Any, tensors: dict[str, Any], qc: dict[str, Any]) -> None:
    """out: src's config with quantization_config, the model's other tensors plus `tensors`, tokenizer files."""
    import json

    from safetensors.torch import save_file

    quantized = {n.rsplit(".", 1)[0] for n in tensors}
    sd = {n: v.detach().contiguous() for n, v in model.state_dict().items() if n.rsplit(".", 1)[0] not in quantized}
    out.mkdir(parents=True, exist_ok=True)
    save_file({**sd, **{n: v.contiguous() for n, v in tensors.items()}}, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"quantization_config": qc}))
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)


def _linears(model: Any) -> list[tuple[str, Any]]:
    """Every decoder linear (lm_head stays unquantized, as the quantizers leave it by default)."""
    import torch

    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def gptq_checkpoint(src: Path, out: Path, bits: int, group: int, sym: bool, desc_act: bool,
                    fmt: str = "gptq") -> dict[str, np.ndarray]:
    """A classic GPTQ checkpoint of src made by GPTQModel's own code: its Quantizer's min/max parameters per group
    (columns in a random order when desc_act, as act-order makes them), packed by its TorchLinear.pack_original,
    zero points turned into checkpoint_format `gptq` (v1) by its convert_gptq_v2_to_v1_format_module. Returns the
    reference weights [out, in]: GPTQModel's dequantize_weight of each packed module, scales upcast to f32 (exact)."""
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    import torch
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
    from transformers import AutoModelForCausalLM

    cfg = QuantizeConfig(bits=bits, group_size=group, sym=sym, desc_act=desc_act, act_group_aware=False)
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    tensors, ref = {}, {}
    for name, lin in _linears(m):
        n_out, n_in = lin.weight.shape
        g = group if group > 0 else n_in
        order = torch.randperm(n_in, generator=gen) if desc_act else torch.arange(n_in)
        g_idx = torch.empty(n_in, dtype=torch.int32)
        g_idx[order] = (torch.arange(n_in) // g).to(torch.int32)
        scales, zeros = [], []
        for k in range(n_in // g):
            q = Quantizer(cfg)
            q.configure(perchannel=True)
            q.find_params(lin.weight.data[:, g_idx == k], weight=True)
            scales.append(q.scale.reshape(-1, 1))
            zeros.append(q.zero.reshape(-1, 1))
        ql = TorchLinear(bits=bits, group_size=group, sym=sym, desc_act=desc_act, in_features=n_in,
                         out_features=n_out, bias=False, pack_dtype=torch.int32, register_buffers=True)
        ql.pack_original(lin, torch.cat(scales, 1), torch.cat(zeros, 1), g_idx)
        ql.post_init()
        f16 = ql.scales
        ql.scales = f16.float()
        ref[name + ".weight"] = ql.dequantize_weight().T.float().numpy().copy()
        ql.scales = f16
        if fmt == "gptq":
            convert_gptq_v2_to_v1_format_module(ql, cfg)
        for s in ("qweight", "qzeros", "scales", "g_idx"):
            tensors[f"{name}.{s}"] = getattr(ql, s)
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
          "checkpoint_format": fmt, "pack_dtype": "int32"}
    _quantized_folder(src, out, m, tensors, qc)
    return ref


def awq_checkpoint(src: Path, out: Path, group: int) -> dict[str, np.ndarray]:
    """An AWQ GEMM checkpoint of src made by GPTQModel's AWQ code: asymmetric min/max parameters from its
    Quantizer, packed by AwqTorchLinear.pack (the GEMM format: pack_awq, AutoAWQ's [0, 2, 4, 6, 1, 3, 5, 7] interleave). Returns the reference
    weights [out, in]: its dequantize_gemm (AutoAWQ's unpacking) with the scales upcast to f32 (exact)."""
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    import torch
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer
    from transformers import AutoModelForCausalLM

    cfg = QuantizeConfig(bits=4, group_size=group, sym=False, desc_act=False)
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tensors, ref = {}, {}
    for name, lin in _linears(m):
        n_out, n_in = lin.weight.shape
        scales, zeros, wq = [], [], lin.weight.data.clone()
        for k in range(n_in // group):
            cols = slice(k * group, (k + 1) * group)
            q = Quantizer(cfg)
            q.configure(perchannel=True)
            q.find_params(lin.weight.data[:, cols], weight=True)
            s, z = q.scale.reshape(-1, 1).half().float(), q.zero.reshape(-1, 1)
            wq[:, cols] = (torch.clamp(torch.round(lin.weight.data[:, cols] / s) + z, 0, 15) - z) * s  # on the grid
            scales.append(s)
            zeros.append(z)
        ql = AwqTorchLinear(bits=4, group_size=group, sym=False, desc_act=False, in_features=n_in, out_features=n_out,
                           bias=False, register_buffers=True)
        ql.pack(_with_weight(n_in, n_out, wq), torch.cat(scales, 1), torch.cat(zeros, 1))
        ref[name + ".weight"] = dequantize_gemm(ql.qweight, ql.qzeros, ql.scales.float(), 4, group).T.numpy().copy()
        for s in ("qweight", "qzeros", "scales"):
            tensors[f"{name}.{s}"] = getattr(ql, s)
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    _quantized_folder(src, out, m, tensors, qc)
    return ref


def _with_weight(n_in: int, n_out: int, w: Any) -> Any:
    """A bias-free torch Linear holding w."""
    import torch

    lin = torch.nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def hf_fp8_checkpoint(src: Path, out: Path, block: list[int] | None) -> dict[str, np.ndarray]:
    """A Hugging Face `fp8` checkpoint of src made by transformers' own FP8 quantizer (Fp8Quantize, the op its
    FineGrainedFP8 integration saves with), config from FineGrainedFP8Config. Returns the reference weights: its
    Fp8Dequantize of each (weight, weight_scale_inv) in f32."""
    import torch
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    qcfg = FineGrainedFP8Config(weight_block_size=block)
    holder = type("Q", (), {"quantization_config": qcfg})()
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tensors, ref = {}, {}
    for name, lin in _linears(m):
        got = Fp8Quantize(holder)._quantize_one(name + ".weight", lin.weight.data)
        w, s = got[name + ".weight"], got[name + ".weight_scale_inv"]
        tensors[name + ".weight"], tensors[name + ".weight_scale_inv"] = w, s
        ref[name + ".weight"] = Fp8Dequantize(holder)._dequantize_one(w, s, torch.float32).numpy().copy()
    qc = qcfg.to_dict()
    _quantized_folder(src, out, m, tensors, qc)
    return ref
