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
