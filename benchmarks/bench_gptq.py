"""GPTQ vs round-to-nearest on the rotated SmolLM2 reference: PPL, KLD vs F16, gap recovered, time and peak RSS.

    nice -n 5 python benchmarks/bench_gptq.py [--out bench-gptq] [--samples 128] [--seqlen 512] [--chunks 6]
    python benchmarks/bench_gptq.py --llmc /path/to/venv/bin/python --samples 16 --seqlen 512 --chunks 3 \
        [--rounds 2] [--reference-dir DIR]

--llmc: instead, the head-to-head against llm-compressor 0.14's GPTQModifier (benchmarks/calib_compare.py):
F16, RTN-W4G64, our GPTQ-W4G64 and llm-compressor's w4a16_gptq_g64 recipe (its defaults: static act-order,
dampening 0.01, block 128, lm_head left alone, as ours) on the same calibration windows, in alternating rounds.

The reference is bench_quality's (SmolLM2 exported to an HF folder, residual stream rotated by a seeded random
orthogonal matrix: weights on no grid). Calibration: the Jargon File calibration slice (qf.eval.text); scoring:
the disjoint evaluation slice, qperplexity with KLD against the F16 logits. Rows: F16; RTN-W4G64 and
GPTQ-W4G64 (sym), the same -ASYM; Q4_K_M with an importance matrix (qimatrix over the calibration slice) and
Q4_K_M --method gptq. gap recovered = (PPL_rtn - PPL_method) / (PPL_rtn - PPL_f16). Each qconvert is a child
process: its wall time and peak RSS (os.wait4) are in the table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (the reference export, child runs and scoring are shared)
import calib_compare as cc  # noqa: E402

PAIRS = (("RTN-W4G64", "GPTQ-W4G64"), ("RTN-W4G64-ASYM", "GPTQ-W4G64-ASYM"), ("Q4_K_M+imatrix", "Q4_K_M+gptq"))


def convert(hf: Path, out: Path, row: str, args: argparse.Namespace, calib: Path, imatrix: Path | None) -> dict:
    """qconvert one row in a child process: path, seconds, peak RSS, size."""
    path = out / f"smollm2-{row}.qf"
    cmd = [sys.executable, "-m", "qf.tools.qconvert", str(hf), str(path)]
    if row.endswith("+imatrix"):
        cmd += ["--type", row.split("+")[0], "--imatrix", str(imatrix)]
    elif row.endswith("+gptq"):
        cmd += ["--type", row.split("+")[0], "--method", "gptq"]
    else:
        cmd += ["--type", row]
    if row.startswith("GPTQ") or row.endswith("+gptq"):
        cmd += ["--calib", str(calib), "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen),
                "--act-order", args.act_order]
    rc, secs, rss = bq.run_child(cmd, out / f"convert-{row}.log")
    if rc != 0:
        raise SystemExit(f"qconvert failed for {row} (exit {rc}); see {out / f'convert-{row}.log'}")
    print(f"converted {row}: {secs:.1f} s, peak RSS {rss / 2**20:.0f} MiB", file=sys.stderr)
    return {"path": path, "convert_s": secs, "convert_rss": rss, "file_bytes": path.stat().st_size}


def table(rows: dict[str, dict], args: argparse.Namespace) -> str:
    """The markdown table with the gap recovered per pair."""
    f16 = rows[bq.REFERENCE]["ppl"]
    head = "| type | size MiB | quantize s | peak RSS MiB | PPL | KLD vs F16 | top-1 % | gap recovered vs RTN |"
    lines = [f"SmolLM2-135M (rotated reference), Jargon File evaluation slice, n_ctx {args.ctx}, {args.chunks} "
             f"chunks; calibration {args.samples} x {args.seqlen} tokens of the calibration slice, act-order "
             f"{args.act_order}.", "", head, "|" + "---|" * (head.count("|") - 1)]
    recovered = {}
    for base, method in PAIRS:
        if base in rows and method in rows:
            gap = rows[base]["ppl"] - f16
            recovered[method] = (rows[base]["ppl"] - rows[method]["ppl"]) / gap if gap > 0 else float("nan")
            recovered[method + " KLD ratio"] = rows[method]["kld"] / rows[base]["kld"]
    for name, r in rows.items():
        ref = name == bq.REFERENCE
        kld = "0 (reference)" if ref else f"{r['kld']:.4g} ± {r['kld_err']:.2g}"
        top = "100" if ref else f"{100 * r['same_top']:.2f}"
        rec = (f"{100 * recovered[name]:.1f}% (KLD x{recovered[name + ' KLD ratio']:.2f})" if name in recovered
               else "")
        lines.append(f"| {name} | {r['file_bytes'] / 2**20:.1f} | {r['convert_s']:.1f} | "
                     f"{r['convert_rss'] / 2**20:.0f} | {r['ppl']:.4f} ± {r['ppl_err']:.4f} | {kld} | {top} | {rec} |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-gptq"))
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--act-order", default="static", choices=("none", "static", "g_idx"))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--imatrix-chunks", type=int, default=32)
    p.add_argument("--resume", action="store_true", help="reuse the F16 score, imatrix and rows of results.json")
    p.add_argument("--rows", default=",".join(r for pair in PAIRS for r in pair),
                   help="comma-separated rows to run besides F16")
    p.add_argument("--reference-dir", type=Path, default=None,
                   help="a folder holding hf-rotated from an earlier bench_quality/bench_gptq/bench_awq run")
    cc.add_args(p)
    return p.parse_args()


def main() -> None:
    """Export, convert, score, print and save the table."""
    args = parse_args()
    if args.llmc is not None:
        print(cc.contest(cc.GPTQ, args))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    args.reference = "rotated"
    from qf.eval.text import calibration_text, evaluation_text
    calib, text = args.out / "calibration.txt", args.out / "evaluation.txt"
    calib.write_text(calibration_text(), encoding="utf-8")
    text.write_text(evaluation_text(), encoding="utf-8")
    hf = (args.reference_dir or args.out) / "hf-rotated"
    if not (hf / "config.json").is_file():
        hf, _, secs = bq.export_reference(args.out, "rotated")
        print(f"reference exported in {secs:.1f} s", file=sys.stderr)
    want = [r for r in args.rows.split(",") if r]
    saved = json.loads((args.out / "results.json").read_text()) if args.resume and (args.out / "results.json"
                                                                                     ).is_file() else {}
    if bq.REFERENCE in saved:
        f16 = saved[bq.REFERENCE]
    else:
        f16 = convert(hf, args.out, bq.REFERENCE, args, calib, None)
        f16.update(**bq.score(Path(f16["path"]), bq.REFERENCE, args.out, args, text))
    rows = {bq.REFERENCE: f16}
    imx = args.out / "imatrix.gguf"
    need_imatrix = any(r.endswith("+imatrix") and r not in saved for r in want)
    imatrix = (imx if args.resume and imx.is_file() else bq.make_imatrix(args.out, args)) if need_imatrix else None
    for row in want:
        if row in saved:
            rows[row] = saved[row]
            continue
        r = convert(hf, args.out, row, args, calib, imatrix)
        r.update(bq.score(r["path"], row, args.out, args, text))
        rows[row] = r
        _save(args.out, rows)
        print(table(rows, args), file=sys.stderr)
    out = table(rows, args)
    print(out)
    (args.out / "gptq.md").write_text(out)
    _save(args.out, rows)


def _save(out: Path, rows: dict[str, dict]) -> None:
    """results.json: every row measured so far (--resume reuses them)."""
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
