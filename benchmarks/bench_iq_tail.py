"""Which per-tensor rules decide the low-bit mixes' quality on the widened SmolLM2: KLD with rules swapped.

    python benchmarks/bench_iq_tail.py /tmp/iqq/widened [--threads 2] [--cases "Q8_0:attn_v=Q2_K,IQ2_XS:attn_v=Q4_K"]

A case is MIX[:PATTERN=TYPE[;PATTERN=TYPE...]]: the F16 reference of a `bench_quality.py --reference widened
--imatrix-all` run (its --out folder: smollm2-F16.qf, reference.logits, imatrix.gguf, eval.txt) requantized under
MIX with those tensors at TYPE (llama-quantize --tensor-type; the pattern token_embd is
--token-embedding-type), with the folder's importance matrix, and scored against the reference logits with as
many chunks as that run saved. Rows are cached as tail-<case>.json in the folder.

Why: llama.cpp's IQ2_XXS, IQ2_XS, IQ1_S and IQ1_M mixes write attn_v at Q4_K when n_head / n_head_kv >= 4
(Llama-3-8B, the model of llama.cpp's published KLD table) and at Q2_K below that (SmolLM2: 9 / 3), and the
first eighth of ffn_down and token_embd at Q2_K; IQ2_S and IQ2_M use IQ3_S there. The default cases measure
token_embd and attn_v at Q2_K alone (on F16 and Q8_0 models), and the four tail mixes with the n_gqa >= 4 rule
(attn_v=Q4_K).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

DEFAULT_CASES = ("F16:token_embd=Q2_K,Q8_0:attn_v=Q2_K,IQ2_XS:attn_v=Q4_K,IQ2_XXS:attn_v=Q4_K,IQ1_M:attn_v=Q4_K,"
                 "IQ1_S:attn_v=Q4_K")


def parse_case(case: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """'MIX:pat=TYPE;pat=TYPE' -> (MIX, ((pat, TYPE), ...))."""
    mix, _, rest = case.strip().partition(":")
    pairs = tuple(tuple(x.rsplit("=", 1)) for x in rest.split(";") if x)
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"bad case {case!r}: expected MIX[:PATTERN=TYPE[;PATTERN=TYPE...]]")
    return mix.upper(), tuple((p, t.upper()) for p, t in pairs)


def overrides(pairs: tuple[tuple[str, str], ...]):
    """llama-quantize's --token-embedding-type (pattern 'token_embd') and --tensor-type options."""
    from qf.format.ggml_types import GGMLType
    from qf.quant.mixes import Overrides
    embd = next((GGMLType[t] for p, t in pairs if p == "token_embd"), None)
    return Overrides(tensor_types=tuple((p, GGMLType[t]) for p, t in pairs if p != "token_embd"),
                     token_embd_type=embd)


def chunks_of(folder: Path) -> int:
    """The evaluation chunks the reference logits hold (from the F16 row's JSON)."""
    return int(json.loads((folder / "ppl-F16.json").read_text())["n_chunks"])


def run_case(folder: Path, case: str, threads: int) -> dict:
    """Requantize the reference under one case and score it; the row."""
    from qf.quant.imatrix import load_imatrix
    from qf.quant.requantize import requantize

    mix, pairs = parse_case(case)
    name = "tail-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", case)
    cache = folder / f"{name}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    model = folder / f"{name}.qf"
    imx = None if mix == "F16" else load_imatrix(folder / "imatrix.gguf")
    s = requantize(folder / "smollm2-F16.qf", model, mix, overrides(pairs), imatrix=imx)
    js = folder / f"{name}.ppl.json"
    cmd = [sys.executable, "-m", "qf.tools.qperplexity", str(model), "-f", str(folder / "eval.txt"), "-c", "512",
           "--chunks", str(chunks_of(folder)), "-t", str(threads), "--json", str(js),
           "--kl-divergence", str(folder / "reference.logits")]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model.unlink()
    row = {"case": case, "mix": mix, "overrides": pairs, "bpw": s.bits_per_weight, "convert_s": s.seconds,
           "types": dict(s.types), **json.loads(js.read_text())}
    cache.write_text(json.dumps(row))
    return row


def main() -> None:
    """Run the cases and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a bench_quality.py --reference widened --imatrix-all --out folder")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated MIX:TOKEN_EMBD_TYPE")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("| mix | changed tensors | bits/weight | KLD vs F16 | top-1 % | PPL |\n|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        r = run_case(args.folder, case, args.threads)
        mix, pairs = parse_case(case)
        changed = ", ".join(f"{p} {t}" for p, t in pairs) or "-"
        print(f"| {mix} | {changed} | {r['bpw']:.2f} | {r['kld']:.3g} ± {r['kld_err']:.1g} | "
              f"{100 * r['same_top']:.1f} | {r['ppl']:.4g} |", flush=True)


if __name__ == "__main__":
    main()
