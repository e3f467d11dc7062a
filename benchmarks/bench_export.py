"""qexport on SmolLM2: the exported folder's perplexity in transformers vs our runtime's on the same .qf.

    nice -n 5 python benchmarks/bench_export.py [--out bench-export] [--chunks 4] [--ctx 512] [--hf DIR]

Sources (from SmolLM2 exported to an HF folder, or --hf): Q4_0 (ggml blocks: symmetric groups of 32), RTN-W4G64-ASYM
(the int payload) and FP8-CHANNEL (the fp8 payload). Each is exported with qexport to the layouts that hold it and
scored on the same chunks of the Jargon File evaluation slice: ours with qf.eval.perplexity over Model.logits;
theirs with transformers' own loss. compressed-tensors folders load with transformers (decompressed on load);
GPTQ folders go through GPTQModel's TorchLinear.dequantize_weight and AWQ folders through its AutoAWQ GEMM
dequantize_gemm (transformers loads neither on CPU without optimum / a CUDA build), the weights then put into
transformers' float model. Prints the table (PPL ours, PPL transformers, ratio, export seconds). Not a test.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROWS = (("Q4_0", ("compressed-tensors", "gptq", "awq")), ("RTN-W4G64-ASYM", ("compressed-tensors", "awq")),
        ("FP8-CHANNEL", ("compressed-tensors",)))


def make_qf(hf: Path, out: Path, qtype: str) -> Path:
    """The .qf of one source row."""
    from qf.calib.driver import convert_calibrated
    from qf.convert.pipeline import convert
    from qf.quant.methods import get_spec
    path = out / f"smollm2-{qtype}.qf"
    if not path.exists():
        spec = get_spec(qtype)
        if spec is None:
            convert(hf, path, qtype)
        else:
            convert_calibrated(hf, path, spec, None, log=lambda line: None)
    return path


def ours(path: Path, text: str, args: argparse.Namespace) -> tuple[float, list[int], object]:
    """Our runtime's PPL; the tokens and chunk plan for transformers."""
    from qf.eval.perplexity import perplexity, plan_chunks
    from qf.runtime import Model
    with Model.load(path, n_ctx=args.ctx, n_batch=args.ctx, n_threads=args.threads) as m:
        tokens = m.tokenize(text)
        plan = plan_chunks(len(tokens), args.ctx, max_chunks=args.chunks, bos_id=m.bos_id if m.add_bos else None)
        res = perplexity(lambda c: m.logits(c.tolist()), tokens, plan)
    return res.ppl, tokens, plan


def hf_ppl(model, tokens, plan) -> float:
    """transformers' loss on the same scored tokens."""
    import torch
    from qf.eval.perplexity import chunk_input
    nll = 0.0
    for i in range(plan.n_chunks):
        x = torch.tensor(chunk_input(np.asarray(tokens), plan, i)[None].astype(np.int64))
        labels = x.clone()
        labels[:, :plan.first + 1] = -100
        with torch.no_grad():
            nll += float(model(input_ids=x, labels=labels).loss) * plan.n_scored
    return math.exp(nll / (plan.n_chunks * plan.n_scored))


def _gptq_weight(c, m: str, qc: dict):
    """GPTQModel's dequantization of one exported module, [out, in]."""
    import torch
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    t = {s: torch.from_numpy(np.array(c.raw(f"{m}.{s}"))) for s in ("qweight", "qzeros", "scales", "g_idx")}
    ql = TorchLinear(bits=qc["bits"], group_size=qc["group_size"], sym=qc["sym"], desc_act=qc["desc_act"],
                     in_features=t["g_idx"].shape[0], out_features=t["scales"].shape[1], bias=False,
                     pack_dtype=torch.int32, register_buffers=True)
    for s, v in t.items():
        getattr(ql, s).copy_(v.view(getattr(ql, s).dtype))
    if qc["checkpoint_format"] == "gptq":
        convert_gptq_v1_to_v2_format_module(ql, qc["bits"], torch.int32)
    ql.post_init()
    ql.scales = ql.scales.float()
    return ql.dequantize_weight().T.float()


def _awq_weight(c, m: str, qc: dict):
    """AutoAWQ GEMM unpacking (GPTQModel's copy) of one exported module, [out, in]."""
    import torch
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    t = [torch.from_numpy(np.array(c.raw(f"{m}.{s}"))) for s in ("qweight", "qzeros", "scales")]
    return dequantize_gemm(t[0], t[1], t[2].float(), 4, qc["group_size"]).T.float()


def load_export(folder: Path, base_hf: Path):
    """transformers' model of an exported folder (f32)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qf.convert.checkpoint import Checkpoint
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    if qc["quant_method"] == "compressed-tensors":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    quantization_config=CompressedTensorsConfig(run_compressed=False))
    model = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32).eval()
    unpack = {"gptq": _gptq_weight, "awq": _awq_weight}[qc["quant_method"]]
    c = Checkpoint(folder)
    sd = model.state_dict()
    with torch.no_grad():
        for n in c.names():
            if n.endswith(".qweight"):
                m = n[: -len(".qweight")]
                sd[m + ".weight"].copy_(unpack(c, m, qc))
            elif n in sd:
                sd[n].copy_(torch.from_numpy(c.to_f32(n)))
    return model


def main() -> None:
    """Make the sources, export, score, print."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-export"))
    p.add_argument("--hf", type=Path, default=None, help="an HF folder of SmolLM2 (default: exported from the GGUF)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    from qf.convert.export import export_hf
    from qf.convert.export_quant import export_quantized
    from qf.eval.text import evaluation_text
    from qf.tools.fetch import fetch_model
    hf = args.hf or args.out / "hf"
    if not (hf / "config.json").is_file():
        export_hf(fetch_model(), hf, dtype="float32", overwrite=True)
    text = evaluation_text()
    lines = [f"SmolLM2-135M, Jargon File evaluation slice, {args.chunks} chunks of {args.ctx}.", "",
             "| source | export | export s | PPL ours (.qf) | PPL transformers (export) | ratio |", "|---|---|---|---|---|---|"]
    for qtype, formats in ROWS:
        qf = make_qf(hf, args.out, qtype)
        mine, tokens, plan = ours(qf, text, args)
        for fmt in formats:
            folder = args.out / f"export-{qtype}-{fmt}"
            t0 = time.perf_counter()
            export_quantized(qf, folder, fmt, dtype="float32", overwrite=True)
            secs = time.perf_counter() - t0
            theirs = hf_ppl(load_export(folder, hf), tokens, plan)
            lines.append(f"| {qtype} | {fmt} | {secs:.1f} | {mine:.4f} | {theirs:.4f} | {mine / theirs:.5f} |")
            print(lines[-1], file=sys.stderr)
    out = "\n".join(lines) + "\n"
    print(out)
    (args.out / "export.md").write_text(out)


if __name__ == "__main__":
    main()
