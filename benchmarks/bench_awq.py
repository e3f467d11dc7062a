"""AWQ vs round-to-nearest on the rotated SmolLM2 reference: PPL, KLD vs F16, gap recovered, time and peak RSS.

    nice -n 5 python benchmarks/bench_awq.py [--out bench-awq] [--samples 32] [--seqlen 512] [--chunks 6]
        [--rows RTN-W4G64-ASYM,AWQ-W4G64] [--reference-dir DIR]
    python benchmarks/bench_awq.py --llmc /path/to/venv/bin/python --samples 8 --seqlen 512 --chunks 3 \
        [--rounds 2] [--reference-dir DIR]

--llmc: instead, the head-to-head against llm-compressor 0.14's AWQModifier (benchmarks/calib_compare.py):
F16, RTN-W4G64-ASYM, our AWQ-W4G64 and llm-compressor's w4a16_awq_g64 recipe (AWQModifier's defaults, then
round to nearest on 4-bit asymmetric groups of 64) on the same calibration windows, in alternating rounds.

The reference is bench_quality's (SmolLM2 exported to an HF folder, residual stream rotated by a seeded random
orthogonal matrix: weights on no grid; --reference-dir reuses an earlier run's hf-rotated folder). Calibration:
the Jargon File calibration slice (qf.eval.text); scoring: the disjoint evaluation slice, qperplexity with KLD
against the F16 logits. gap recovered = (PPL_rtn - PPL_awq) / (PPL_rtn - PPL_f16), RTN on the same grid (asym
for asym, sym for sym). Each qconvert is a child process: its wall time and peak RSS (os.wait4) are in the
table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (the reference export, child runs and scoring are shared)
import calib_compare as cc  # noqa: E402

BASELINE = {"AWQ-W4G64": "RTN-W4G64-ASYM", "AWQ-W4G64-SYM": "RTN-W4G64", "AWQ-W4G32": "RTN-W4G32-ASYM"}


def convert(hf: Path, out: Path, row: str, args: argparse.Namespace, calib: Path) -> dict:
    """qconvert one row in a child process: path, seconds, peak RSS, size."""
    path = out / f"smollm2-{row}.qf"
    cmd = [sys.executable, "-m", "qf.tools.qconvert", str(hf), str(path), "--type", row]
    if row.startswith("AWQ"):
        cmd += ["--calib", str(calib), "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen)]
    rc, secs, rss = bq.run_child(cmd, out / f"convert-{row}.log")
    if rc != 0:
        raise SystemExit(f"qconvert failed for {row} (exit {rc}); see {out / f'convert-{row}.log'}")
    print(f"converted {row}: {secs:.1f} s, peak RSS {rss / 2**20:.0f} MiB", file=sys.stderr)
    return {"path": path, "convert_s": secs, "convert_rss": rss, "file_bytes": path.stat().st_size}


def table(rows: dict[str, dict], args: argparse.Namespace) -> str:
    """The markdown table with the gap recovered per AWQ row."""
    f16 = rows[bq.REFERENCE]["ppl"]
    head = "| type | size MiB | quantize s | peak RSS MiB | PPL | KLD vs F16 | top-1 % | gap recovered vs RTN |"
    lines = [f"SmolLM2-135M (rotated reference), Jargon File evaluation slice, n_ctx {args.ctx}, {args.chunks} "
             f"chunks; calibration {args.samples} x {args.seqlen} tokens of the calibration slice.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        ref = name == bq.REFERENCE
        base = rows.get(BASELINE.get(name, ""))
        rec = ""
        if base is not None and base["ppl"] > f16:
            rec = (f"{100 * (base['ppl'] - r['ppl']) / (base['ppl'] - f16):.1f}% of {BASELINE[name]}'s "
                   f"(KLD x{r['kld'] / base['kld']:.2f})")
        kld = "0 (reference)" if ref else f"{r['kld']:.4g} ± {r['kld_err']:.2g}"
        top = "100" if ref else f"{100 * r['same_top']:.2f}"
        lines.append(f"| {name} | {r['file_bytes'] / 2**20:.1f} | {r['convert_s']:.1f} | "
                     f"{r['convert_rss'] / 2**20:.0f} | {r['ppl']:.4f} ± {r['ppl_err']:.4f} | {kld} | {top} | {rec} |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-awq"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="RTN-W4G64-ASYM,AWQ-W4G64", help="comma-separated rows besides F16")
    p.add_argument("--reference-dir", type=Path, default=None,
                   help="a folder holding hf-rotated from an earlier bench_quality/bench_gptq/bench_awq run")
    cc.add_args(p)
    return p.parse_args()


def main() -> None:
    """Export, convert, score, print and save the table."""
    args = parse_args()
    if args.llmc is not None:
        print(cc.contest(cc.AWQ, args))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    from qf.eval.text import calibration_text, evaluation_text
    calib, text = args.out / "calibration.txt", args.out / "evaluation.txt"
    calib.write_text(calibration_text(), encoding="utf-8")
    text.write_text(evaluation_text(), encoding="utf-8")
    hf = (args.reference_dir or args.out) / "hf-rotated"
    if not (hf / "config.json").is_file():
        hf, _, secs = bq.export_reference(args.out, "rotated")
        print(f"reference exported in {secs:.1f} s", file=sys.stderr)
    f16 = convert(hf, args.out, bq.REFERENCE, args, calib)
    f16.update(**bq.score(Path(f16["path"]), bq.REFERENCE, args.out, args, text))
    rows = {bq.REFERENCE: f16}
    for row in [r for r in args.rows.split(",") if r]:
        r = convert(hf, args.out, row, args, calib)
        r.update(bq.score(r["path"], row, args.out, args, text))
        rows[row] = r
        print(table(rows, args), file=sys.stderr)
    out = table(rows, args)
    print(out)
    (args.out / "awq.md").write_text(out)
    (args.out / "results.json").write_text(json.dumps({k: {kk: (str(vv) if isinstance(vv, Path) else vv)
                                                           for kk, vv in v.items()} for k, v in rows.items()},
                                                      indent=1, default=str))


if __name__ == "__main__":
    main()
