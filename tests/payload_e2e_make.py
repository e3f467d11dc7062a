"""Make SmolLM2 checkpoints with llm-compressor (run by tests/test_payload_e2e.py in a Python that has it).

    python tests/payload_e2e_make.py SRC OUT RECIPE [--samples 16] [--seq 512] [--windows FILE.npy]

RECIPE: w4a16_rtn_g64 (round to nearest, 4 bits, group 64, symmetric), w4a16_gptq_g64 (GPTQ, the same grid),
w4a16_gptq_g64_actorder (the same with actorder=weight: columns in Hessian order with static groups;
llm-compressor 0.14 removed actorder=group, the variant that stored a weight_g_idx, and its GPTQ default is
actorder=static, the same thing: both recipes write identical bytes), w4a16_awq_g64 (AWQModifier with its
defaults, duo scaling and a grid of 20, then round to nearest, 4 bits, group 64, asymmetric: AWQ's own grid),
fp8_dynamic (FP8 channel weights, dynamic per-token activations), fp8_block (FP8 128x128 block weights).
Calibration (GPTQ and AWQ): the Jargon File calibration slice (qf.eval.text), cut into `samples` evenly strided
windows of `seq` tokens, or the windows of --windows (int64 [N, L] .npy, e.g. the ones `qconvert --calib`
samples, so that both tools see the same tokens). The folder is written next to OUT and renamed into place at
the end; the wall time and CPU seconds of oneshot() go to OUT/llmc_timing.json.

llm-compressor 0.14's AWQModifier pins its cached activations (`IntermediatesCache.pin_memory` ->
`torch.Tensor.pin_memory`, "for faster onloading during grid search"), which raises on a torch without CUDA;
without an accelerator `_cpu_pin_memory` makes it the identity in this process (pinning only speeds
host-to-device copies, which do not happen here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

RECIPES = ("w4a16_rtn_g64", "w4a16_gptq_g64", "w4a16_gptq_g64_actorder", "w4a16_awq_g64", "fp8_dynamic",
           "fp8_block")
CALIBRATED = ("w4a16_gptq", "w4a16_awq")


def _w4_group(actorder: bool) -> Any:
    """GPTQModifier for 4-bit symmetric group-64 weights (lm_head left alone)."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    if actorder:
        weights["actorder"] = "weight"
    return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                        ignore=["lm_head"], dampening_frac=0.01)


def _awq() -> list[Any]:
    """AWQModifier (its defaults) then round to nearest on AWQ's grid: 4-bit asymmetric groups of 64."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}
    return [AWQModifier(), QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                                ignore=["lm_head"])]


def _cpu_pin_memory() -> None:
    """Without CUDA, torch.Tensor.pin_memory returns the tensor itself (AWQModifier pins its activation cache)."""
    import torch

    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]


def _recipe(name: str) -> Any:
    """The llm-compressor modifier(s) of a recipe name."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if name.startswith("w4a16_gptq_g64"):
        return _w4_group(name.endswith("actorder"))
    if name == "w4a16_awq_g64":
        return _awq()
    if name == "w4a16_rtn_g64":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
        return QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                    ignore=["lm_head"])
    scheme = {"fp8_dynamic": "FP8_DYNAMIC", "fp8_block": "FP8_BLOCK"}[name]
    return QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])


def _calibration(tok: Any, samples: int, seq: int, windows: Path | None) -> Any:
    """A datasets.Dataset of `samples` windows of `seq` tokens from the calibration slice (or --windows')."""
    from datasets import Dataset

    if windows is not None:
        import numpy as np

        rows = np.load(windows).astype(np.int64).tolist()  # rows: [N][L]
    else:
        from qf.eval.text import calibration_text

        ids = tok(calibration_text(), add_special_tokens=False)["input_ids"]
        step = max(seq, (len(ids) - seq) // max(1, samples - 1))
        rows = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, step)][:samples]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def main() -> None:
    """Quantize SRC with RECIPE into OUT."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("recipe", choices=RECIPES)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--windows", type=Path, default=None, help="calibration token windows, int64 [N, L] .npy")
    args = ap.parse_args()
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _cpu_pin_memory()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.src)
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    kw: dict[str, Any] = {}
    if args.recipe.startswith(CALIBRATED):
        data = _calibration(tok, args.samples, args.seq, args.windows)
        kw = dict(dataset=data, max_seq_length=len(data[0]["input_ids"]), num_calibration_samples=len(data))
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, recipe=_recipe(args.recipe), **kw)
    timing = {"oneshot_s": time.perf_counter() - t0, "oneshot_cpu_s": time.process_time() - c0}
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tok.save_pretrained(tmp)
    (tmp / "llmc_timing.json").write_text(json.dumps(timing))
    tmp.rename(args.out)


if __name__ == "__main__":
    main()
