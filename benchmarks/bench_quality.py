"""Quality of every supported quant type on SmolLM2-135M: size, bits/weight, convert time, PPL, KLD, speed, RSS.

    python benchmarks/bench_quality.py [--out bench-out] [--chunks 6] [--ctx 512] [--threads 2] [--types Q8_0,Q4_0]

One run: the SmolLM2 GGUF is exported to a Hugging Face folder (qf.convert.export.export_hf), its residual
stream is rotated by a seeded random orthogonal matrix (qf.eval.rotate; the same logits, weights on no grid;
--reference raw skips this), converted to every type qconvert supports today (mixes whose codec is
registered), scored with qperplexity on the evaluation slice of the Jargon File (F16 is the KLD reference:
its logits are saved, every other type is compared with them), and timed for prefill/decode (--no-speed skips
the timing). With the rotated reference, the unrotated F16 is scored too: its KLD shows what the rotation
itself changes. --reference widened widens the residual stream from 576 to 768 instead (qf.eval.widen: zero-pad
and random rotation, the same function), so that every matrix reading the residual stream has 256-aligned rows
and the 256-block types (K, IQ) apply where SmolLM2's own width sends them to 32-block fallbacks.
--imatrix-all converts every quantized type with the qimatrix importance matrix (the IQ1/IQ2/IQ3_XXS/XS and
Q2_K_S mixes refuse to run without one, as llama.cpp does); the IQ rows of the README come from
`--reference widened --imatrix-all --types IQ4_XS,IQ4_NL,IQ3_M,IQ3_S,...`. --imatrix-types Q4_K_M,Q2_K adds rows for those types quantized with an importance matrix
that qimatrix computes from the F16 over the calibration slice (disjoint from the evaluation slice). Writes into --out: the .qf files, `results.json`, `quality.md` (the table, also printed) and
`kld_vs_bpw.png` (needs matplotlib, an optional benchmark dependency: `pip install matplotlib`; without it the
plot is skipped). Not part of the test suite. At the defaults (6 chunks of 512, qbench pp256/tg16 x2) the 16
types took 506 s wall (673 s CPU) on 2 cores; fewer --chunks or --types make it shorter.
Each qperplexity and qbench run is a child process so that its peak RSS is its own (os.wait4); the table's
RSS column is qbench's (model loaded, prefill + decode), the evaluation's own peak is in results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REFERENCE = "F16"
UNROTATED = "F16 unrotated"
FALLBACKS = ("SmolLM2's n_embd (576) is not a multiple of 256, so K types apply only to ffn_down (and, untied, "
             "nothing else); the other matrices take llama.cpp's fallbacks (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, "
             "Q5_K -> Q5_1, Q6_K -> Q8_0), see the last column.")
CAVEAT = {
    "raw": ("Notes: (1) the only SmolLM2 weights at hand are the Q4_1 GGUF, so the F16 reference is that model "
            "dequantized; re-quantizing to Q4_1 reproduces it almost exactly, which makes Q4_1's KLD ~0 and "
            "not comparable with the other types' (which pay for both roundings), and Q5_1's 31-step grid beats "
            "against the 15-step one (worse than Q5_0). (2) " + FALLBACKS),
    "widened": ("Notes: (1) the reference is SmolLM2 (dequantized from its Q4_1 GGUF) with its residual stream "
                "widened from 576 to 768 and randomly rotated (qf.eval.widen, seed 0): the same function (see the "
                f"'{UNROTATED}' row, the original scored against it), weights on no quantization grid, an untied "
                "lm_head. q/k/v/gate/up, token_embd and lm_head read 768 (256-aligned), ffn_down 1536; "
                "attn_output still reads 576 (9 heads x 64) and takes llama.cpp's fallbacks."),
    "rotated": ("Notes: (1) the reference is SmolLM2 (dequantized from its Q4_1 GGUF) with its residual stream "
                "rotated by a random orthogonal matrix (qf.eval.rotate, seed 0): the same function (see the "
                f"'{UNROTATED}' row, scored against it) with weights on no quantization grid, and an untied "
                "lm_head (the final norm is folded into it), hence the larger files. (2) " + FALLBACKS),
}
# Skipped unless named in --types: F32 is the unquantized upcast, twice the reference's size.
SKIP_BY_DEFAULT = ("F32",)


def supported_types() -> list[str]:
    """--type names whose default ggml type has a codec, in qf.quant.mixes table order."""
    from qf.quant.codecs import registered_types
    from qf.quant.mixes import get_mix, mix_names
    have = set(registered_types())
    return [n for n in mix_names() if get_mix(n).default in have]


def run_child(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """Run cmd with stdout+stderr to `log`; returns (exit code, seconds, peak RSS bytes of that child)."""
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024


def export_reference(out: Path, reference: str) -> tuple[Path, Path, float]:
    """SmolLM2 GGUF -> HF folder (f32 weights), rotated or widened unless reference is 'raw'; (hf, raw hf, s)."""
    from qf.convert.export import export_hf
    from qf.eval.rotate import rotate_checkpoint
    from qf.eval.widen import widen_checkpoint
    from qf.tools.fetch import fetch_model
    t0 = time.perf_counter()
    raw = export_hf(fetch_model(), out / "hf-raw", dtype="float32", overwrite=True)
    make = {"raw": lambda: raw,
            "rotated": lambda: rotate_checkpoint(raw, out / "hf-rotated", seed=0, overwrite=True),
            "widened": lambda: widen_checkpoint(raw, out / "hf-widened", width=768, seed=0, overwrite=True)}
    return make[reference](), raw, time.perf_counter() - t0


def make_imatrix(out: Path, args: argparse.Namespace) -> Path:
    """qimatrix on the reference F16 over the calibration slice (disjoint from the evaluation slice)."""
    path = out / "imatrix.gguf"
    cmd = [sys.executable, "-m", "qf.tools.qimatrix", str(out / f"smollm2-{REFERENCE}.qf"), "--slice", "calibration",
           "-o", str(path), "-c", str(args.ctx), "--chunks", str(args.imatrix_chunks), "-t", str(args.threads)]
    rc, secs, _ = run_child(cmd, out / "imatrix.log")
    if rc != 0:
        raise SystemExit(f"qimatrix failed (exit {rc}); see {out / 'imatrix.log'}")
    print(f"imatrix: {args.imatrix_chunks} chunks of {args.ctx} in {secs:.1f} s", file=sys.stderr)
    return path


def convert_all(hf: Path, out: Path, types: list[str], raw: Path | None,
                imatrix: tuple[Path, list[str]] | None = None, every: Path | None = None) -> dict[str, dict]:
    """Convert to each type in-process (raw to F16 as UNROTATED, and `T+imatrix` rows; with `every`, each of
    `types` with that importance matrix); size, bits/weight, convert seconds."""
    from qf.convert.pipeline import convert
    from qf.quant.imatrix import load_imatrix
    rows = {}
    imx_all = None if every is None else load_imatrix(every)
    jobs = [(t, hf, t, imx_all) for t in types] + ([(UNROTATED, raw, REFERENCE, None)] if raw is not None else [])
    if imatrix is not None:
        jobs += [(f"{t}+imatrix", hf, t, load_imatrix(imatrix[0])) for t in imatrix[1]]
    for t, src, qtype, imx in jobs:
        s = convert(src, out / f"smollm2-{t.replace(' ', '-')}.qf", qtype, imatrix=imx)
        rows[t] = {"path": str(s.path), "file_bytes": s.file_bytes, "bpw": s.bits_per_weight,
                   "convert_s": s.seconds, "types": dict(s.types)}
        print(f"converted {t}: {s.file_bytes / 2**20:.1f} MiB, {s.bits_per_weight:.2f} bpw, {s.seconds:.1f} s",
              file=sys.stderr)
    return rows


def score(model: Path, t: str, out: Path, args: argparse.Namespace, text: Path) -> dict:
    """qperplexity on one model: saves the reference logits (F16) or compares against them."""
    ref_logits = out / "reference.logits"
    js = out / f"ppl-{t.replace(' ', '-')}.json"
    cmd = [sys.executable, "-m", "qf.tools.qperplexity", str(model), "-f", str(text), "-c", str(args.ctx),
           "--chunks", str(args.chunks), "-t", str(args.threads), "--json", str(js)]
    cmd += ["--save-logits", str(ref_logits)] if t == REFERENCE else ["--kl-divergence", str(ref_logits)]
    log = out / f"ppl-{t.replace(' ', '-')}.log"
    rc, secs, rss = run_child(cmd, log)
    if rc != 0:
        raise SystemExit(f"qperplexity failed for {t} (exit {rc}); see {log}")
    res = json.loads(js.read_text())
    res.update(eval_s=secs, eval_rss=rss)
    return res


def speed(model: Path, t: str, out: Path, args: argparse.Namespace) -> dict:
    """Prefill (ppN) and decode (tgN) tokens/s from qbench, and that child's peak RSS (loaded model + run)."""
    if not args.speed:
        return {"prefill_tps": float("nan"), "decode_tps": float("nan"), "rss": float("nan")}
    t = t.replace(" ", "-")
    js = out / f"speed-{t}.json"
    cmd = [sys.executable, "-m", "qf.tools.qbench", str(model), "-p", str(args.prefill), "-n", str(args.decode),
           "-r", str(args.reps), "-t", str(args.threads), "-b", str(args.prefill), "--json", str(js)]
    rc, _, rss = run_child(cmd, out / f"speed-{t}.log")
    if rc != 0:
        raise SystemExit(f"qbench failed for {t} (exit {rc}); see {out / f'speed-{t}.log'}")
    res = {r["test"][:2]: r["median_tps"] for r in json.loads(js.read_text())["results"]}
    return {"prefill_tps": res["pp"], "decode_tps": res["tg"], "rss": rss}


def _type_counts(types: dict[str, int]) -> str:
    """'Q5_0 x180, Q4_K x30' for the 2-D tensors (1-D norms are F32 in every type)."""
    return ", ".join(f"{t} x{n}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]) if t != "F32")


def _num(v: float, fmt: str) -> str:
    """A formatted figure, or '-' when it was not measured (NaN)."""
    return "-" if v != v else format(v, fmt)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """The markdown table."""
    head = ("| type | size MiB | bits/weight | convert s | PPL | ln(PPL/PPL_F16) | KLD vs F16 | top-1 % | "
            "prefill tok/s | decode tok/s | peak RSS MiB | matrices by type |")
    lines = [f"SmolLM2-135M-Instruct, Jargon File evaluation slice, n_ctx {args.ctx}, {args.chunks} chunks "
             f"({rows[0].get('n_tokens', '?')} scored tokens), {args.threads} threads.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["type"] != REFERENCE, -r["bpw"])):
        ref = r["type"] == REFERENCE
        kld = "0 (reference)" if ref else f"{r['kld']:.4g} ± {r['kld_err']:.2g}"
        top = "100 (reference)" if ref else f"{100 * r['same_top']:.2f}"
        lnr = "0" if ref else f"{r['ln_ppl_ratio']:+.5f}"
        lines.append(f"| {r['type']} | {r['file_bytes'] / 2**20:.1f} | {r['bpw']:.2f} | {r['convert_s']:.1f} | "
                     f"{r['ppl']:.4f} ± {r['ppl_err']:.4f} | {lnr} | {kld} | {top} | "
                     f"{_num(r['prefill_tps'], '.1f')} | {_num(r['decode_tps'], '.1f')} | "
                     f"{_num(r['rss'] / 2**20, '.0f')} | "
                     f"{_type_counts(r['types'])} |")
    lines += ["", CAVEAT[args.reference]]
    if args.imatrix_all:
        lines += ["", f"Every quantized type used the qimatrix importance matrix ({args.imatrix_chunks} chunks of "
                      f"{args.ctx} from the calibration slice)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    """KLD vs bits per weight (log y); False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pts = sorted((r for r in rows if r["type"] != REFERENCE and r["kld"] > 0), key=lambda r: -r["bpw"])
    fig, ax = plt.subplots(figsize=(8, 5))
    colors, markers = plt.get_cmap("tab20").colors, "osD^v<>p"
    for i, r in enumerate(pts):  # one legend entry per type: the low-bit types cluster too tightly for labels
        ax.errorbar([r["bpw"]], [r["kld"]], yerr=[r["kld_err"]], fmt=markers[i % len(markers)],
                    color=colors[i % len(colors)], label=f"{r['type']} ({r['bpw']:.2f})")
    ax.legend(fontsize=7, title="type (bits/weight)", title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(f"mean KLD vs {REFERENCE}")
    ax.set_title("SmolLM2-135M: KL divergence vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--chunks", type=int, default=6, help="evaluation chunks (255 scored tokens each at -c 512)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--types", default=None,
                    help=f"comma-separated subset (default: every supported type but {', '.join(SKIP_BY_DEFAULT)})")
    ap.add_argument("--prefill", type=int, default=256, help="qbench prompt tokens (ppN)")
    ap.add_argument("--decode", type=int, default=16, help="qbench generated tokens (tgN)")
    ap.add_argument("--reps", type=int, default=2, help="qbench repetitions (median)")
    ap.add_argument("--reference", choices=sorted(CAVEAT), default="rotated",
                    help="rotated (default): the SmolLM2 weights rotated off their Q4_1 grid; raw: as dequantized; "
                         "widened: residual stream widened to 768 and rotated (256-aligned rows)")
    ap.add_argument("--imatrix-all", action="store_true",
                    help="convert every quantized type with the importance matrix (needed by the IQ1/IQ2 mixes)")
    ap.add_argument("--no-speed", dest="speed", action="store_false", help="skip the qbench timing")
    ap.add_argument("--imatrix-types", default="",
                    help="comma-separated types to convert again with an importance matrix (qimatrix on the F16 "
                         "over the calibration slice), as extra 'T+imatrix' rows")
    ap.add_argument("--imatrix-chunks", type=int, default=40, help="qimatrix chunks (of --ctx tokens)")
    return ap.parse_args()


def select_types(spec: str | None) -> list[str]:
    """The types to run, the reference first (it must be scored before the others)."""
    types = supported_types()
    if spec:
        wanted = [t.strip().upper() for t in spec.split(",")]
        bad = [t for t in wanted if t not in types]
        if bad:
            raise SystemExit(f"unsupported types {bad}; supported: {types}")
        types = [t for t in types if t in wanted]
    else:
        types = [t for t in types if t not in SKIP_BY_DEFAULT]
    return [REFERENCE] + [t for t in types if t != REFERENCE]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def main() -> None:
    """Export, convert, score and time every type; print and write the table, JSON and plot."""
    from qf.eval.text import write_slice
    args, t_start = parse_args(), time.perf_counter()
    types, out = select_types(args.types), args.out
    out.mkdir(parents=True, exist_ok=True)
    text = write_slice("evaluation", out / "eval.txt")
    hf, raw, export_s = export_reference(out, args.reference)
    print(f"exported HF folder in {export_s:.1f} s; types: {', '.join(types)}", file=sys.stderr)
    conv = convert_all(hf, out, [REFERENCE], None if args.reference == "raw" else raw)
    imx_types = [t.strip().upper() for t in args.imatrix_types.split(",") if t.strip()]
    imx = make_imatrix(out, args) if imx_types or args.imatrix_all else None
    conv |= convert_all(hf, out, types[1:], None, (imx, imx_types) if imx_types else None,
                        imx if args.imatrix_all else None)
    rows = []
    for t in conv:
        model = Path(conv[t]["path"])
        rows.append({"type": t, **conv[t], **score(model, t, out, args, text), **speed(model, t, out, args)})
        print(f"{t}: PPL {rows[-1]['ppl']:.4f}" + ("" if t == REFERENCE else f", KLD {rows[-1]['kld']:.5f}")
              + f" ({time.perf_counter() - t_start:.0f} s so far)", file=sys.stderr)
    md = table(rows, args)
    (out / "quality.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "rows": rows}, indent=2, default=str))
    plotted = plot(rows, out / "kld_vs_bpw.png")
    print(md)
    print(f"total {time.perf_counter() - t_start:.0f} s wall, {cpu_seconds():.0f} s CPU (all processes); wrote "
          f"{out / 'quality.md'}, {out / 'results.json'}"
          + (f", {out / 'kld_vs_bpw.png'}" if plotted else " (no plot: pip install matplotlib)"), file=sys.stderr)


if __name__ == "__main__":
    main()
