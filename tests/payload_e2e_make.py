"""Make SmolLM2 checkpoints with llm-compressor (run by tests/test_payload_e2e.py in a Python that has it).

    python tests/payload_e2e_make.py SRC OUT RECIPE [--samples 16] [--seq 512]

RECIPE: w4a16_rtn_g64 (round to nearest, 4 bits, group 64, symmetric), w4a16_gptq_g64 (GPTQ, the same grid),
w4a16_gptq_g64_actorder (the same with actorder=weight: columns in Hessian order with static groups;
llm-compressor 0.14 removed actorder=group, the variant that stored a weight_g_idx, and its GPTQ default is
actorder=static, the same thing: both recipes write identical bytes), fp8_dynamic (FP8 channel weights,
dynamic per-token activations), fp8_block (FP8 128x128 block weights). Calibration (GPTQ only): the Jargon
File calibration slice (qf.eval.text), cut into `samples` windows of `seq` tokens. The folder is written
next to OUT and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

RECIPES = ("w4a16_rtn_g64", "w4a16_gptq_g64", "w4a16_gptq_g64_actorder", "fp8_dynamic", "fp8_block")


def _w4_group(actorder: bool) -> Any:
    """GPTQModifier for 4-bit symmetric group-64 weights (lm_head left alone)."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    if actorder:
        weights["actorder"] = "weight"
    return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                        ignore=["lm_head"], dampening_frac=0.01)


def _recipe(name: str) -> Any:
    """The llm-compressor modifier of a recipe name."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if name.startswith("w4a16_gptq_g64"):
        return _w4_group(name.endswith("actorder"))
    if name == "w4a16_rtn_g64":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
        return QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                    ignore=["lm_head"])
    scheme = {"fp8_dynamic": "FP8_DYNAMIC", "fp8_block": "FP8_BLOCK"}[name]
    return QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])


def _calibration(tok: Any, samples: int, seq: int) -> Any:
    """A datasets.Dataset of `samples` windows of `seq` tokens from the calibration slice."""
    from datasets import Dataset

    from qf.eval.text import calibration_text

    ids = tok(calibration_text(), add_special_tokens=False)["input_ids"]
    step = max(seq, (len(ids) - seq) // max(1, samples - 1))
    rows = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, step)][:samples]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq for _ in rows]})


def main() -> None:
    """Quantize SRC with RECIPE into OUT."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("recipe", choices=RECIPES)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.src)
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    kw: dict[str, Any] = {}
    if args.recipe.startswith("w4a16_gptq"):
        kw = dict(dataset=_calibration(tok, args.samples, args.seq), max_seq_length=args.seq,
                  num_calibration_samples=args.samples)
    oneshot(model=model, recipe=_recipe(args.recipe), **kw)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tok.save_pretrained(tmp)
    tmp.rename(args.out)


if __name__ == "__main__":
    main()
