"""GPTQModel's side of tests/test_payload_gptqmodel.py (run in a Python that imports gptqmodel).

    python tests/payload_gptqmodel_make.py make SRC OUT [--samples 16] [--seq 512]
    python tests/payload_gptqmodel_make.py reference QDIR TOKENS.npy OUT.json --prompt-ids 1,2,3 --n-gen 24 \
        --n-ctx 512 --n-chunks 3 [--bos ID]

make: GPTQModel 7.7 quantizes SRC as classic GPTQ (4 bits, group 64, symmetric, desc_act=True, so the g_idx is
the Hessian order's and not monotonic; act_group_aware off, which desc_act requires; checkpoint_format gptq)
on `samples` windows of `seq` tokens of the Jargon File calibration slice (qf.eval.text), and saves it to OUT
(written next to OUT, renamed into place at the end).

reference: GPTQModel loads QDIR on the CPU (BACKEND.TORCH); each of its TorchLinear modules unpacks its
qweight/qzeros/scales/g_idx with its own dequantize_weight into a float32 linear of the transformers model it
wraps, which gives the greedy tokens after the prompt and the perplexity of TOKENS on the chunks
qf.eval.perplexity.plan_chunks picks; both go to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel sizes its CPU pool from this (its loader pool wants 2)


def _calibration(tok: Any, samples: int, seq: int) -> list[dict[str, list[int]]]:
    """`samples` windows of `seq` tokens spread over the calibration slice, as GPTQModel takes them."""
    from qf.eval.text import calibration_text

    ids = tok(calibration_text(), add_special_tokens=False)["input_ids"]
    step = max(seq, (len(ids) - seq) // max(1, samples - 1))
    rows = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, step)][:samples]
    return [{"input_ids": r, "attention_mask": [1] * seq} for r in rows]


def make(src: Path, out: Path, samples: int, seq: int) -> None:
    """Quantize src with GPTQModel (desc_act GPTQ W4 g64 sym) into out."""
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    cfg = QuantizeConfig(bits=4, group_size=64, sym=True, desc_act=True, act_group_aware=False,
                         static_groups=False, offload_to_disk=False)
    model = GPTQModel.load(str(src), cfg, device="cpu", dtype=torch.float32)
    model.quantize(_calibration(tok, samples, seq), batch_size=1, tokenizer=tok)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    tok.save_pretrained(tmp)
    tmp.rename(out)


def _f32_model(qdir: Path) -> Any:
    """The transformers model GPTQModel loads from qdir (BACKEND.TORCH: its TorchLinear modules; that kernel
    takes fp16/bf16 only), with every quantized linear replaced by a float32 nn.Linear holding TorchLinear's own
    dequantize_weight (scales[g_idx] * (q - zeros[g_idx]), scales upcast to f32: exact) and the unquantized
    tensors read again in f32 from the checkpoint: the checkpoint's weights with f32 arithmetic, as our
    runtime computes. Returns (model, names of the replaced kernels)."""
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import load_file

    hf = GPTQModel.load(str(qdir), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    kernels = set()
    for name, mod in list(hf.named_modules()):
        if not hasattr(mod, "qweight"):
            continue
        kernels.add(type(mod).__name__)
        f16 = mod.scales
        mod.scales = f16.float()
        w = mod.dequantize_weight().T.float().contiguous()
        mod.scales = f16
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=getattr(mod, "bias", None) is not None)
        lin.weight.data = w
        if lin.bias is not None:
            lin.bias.data = mod.bias.float()
        parent, _, leaf = name.rpartition(".")
        setattr(hf.get_submodule(parent), leaf, lin)
    hf = hf.float().eval()
    sd = {}
    for f in sorted(qdir.glob("*.safetensors")):
        sd.update(load_file(f))
    own = hf.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape == v.shape:
            own[k].copy_(v.float())
    return hf, sorted(kernels)


def reference(qdir: Path, tokens: Path, out: Path, prompt: list[int], n_gen: int, n_ctx: int, n_chunks: int,
              bos: int | None) -> None:
    """Greedy tokens and chunked perplexity of the checkpoint as GPTQModel unpacks it (_f32_model), to JSON."""
    import numpy as np
    import torch

    from qf.eval.perplexity import perplexity, plan_chunks

    hf, kernels = _f32_model(qdir)
    with torch.no_grad():
        g = hf.generate(torch.as_tensor([prompt]), max_new_tokens=n_gen, do_sample=False,
                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long))

        def logits(chunk: np.ndarray) -> np.ndarray:
            return hf(torch.as_tensor(chunk[None], dtype=torch.long)).logits[0].float().numpy()
        ids = np.load(tokens)
        plan = plan_chunks(ids.size, n_ctx, n_chunks, bos)
        ppl = perplexity(logits, ids, plan).ppl
    out.write_text(json.dumps({"greedy": g[0, len(prompt):].tolist(), "ppl": ppl, "kernels": kernels,
                               "n_chunks": plan.n_chunks}))


def main() -> None:
    """Dispatch the subcommand."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("src", type=Path)
    mk.add_argument("out", type=Path)
    mk.add_argument("--samples", type=int, default=16)
    mk.add_argument("--seq", type=int, default=512)
    rf = sub.add_parser("reference")
    rf.add_argument("qdir", type=Path)
    rf.add_argument("tokens", type=Path)
    rf.add_argument("out", type=Path)
    rf.add_argument("--prompt-ids", required=True)
    rf.add_argument("--n-gen", type=int, default=24)
    rf.add_argument("--n-ctx", type=int, default=512)
    rf.add_argument("--n-chunks", type=int, default=3)
    rf.add_argument("--bos", type=int, default=None)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.src, a.out, a.samples, a.seq)
    else:
        reference(a.qdir, a.tokens, a.out, [int(t) for t in a.prompt_ids.split(",")], a.n_gen, a.n_ctx,
                  a.n_chunks, a.bos)


if __name__ == "__main__":
    main()
