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
--imatrix-all converts every quantized type with an importance matrix (the IQ1/IQ2/IQ3_XXS/XS and Q2_K_S mixes
refuse to run without one, as llama.cpp does): qimatrix's on the reference F16 over the calibration slice
(disjoint from the evaluation slice; --imatrix-chunks), or --imatrix FILE (e.g. llama-imatrix's). The README's
table of every mix on the widened reference comes from

    python benchmarks/bench_quality.py --reference widened --imatrix-all --no-speed --threads 2 \\
        --imatrix-chunks 16 --out /tmp/iqq/widened

--imatrix-types Q4_K_M,Q2_K adds `T+imatrix` rows for those types quantized with that importance matrix. --seed
changes the rotation (for the spread across rotations). Writes into --out: `results.json`, `quality.md` (the
table, also printed) and `kld_vs_bpw.svg` (benchmarks/plot_quality.py, which also prints the README's short
table). Each type's row is saved as row-T.json as soon as it is measured, and a run started again with the same
--out reuses those rows (delete them to measure again); the quantized .qf files are deleted once scored unless
--keep-models. Not part of the test suite. At the defaults (6 chunks of 512, qbench pp256/tg16 x2) the 16
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


def export_reference(out: Path, reference: str, seed: int = 0) -> tuple[Path, Path, float]:
    """SmolLM2 GGUF -> HF folder (f32 weights), rotated or widened (seeded) unless 'raw'; (hf, raw hf, s)."""
    from qf.convert.export import export_hf
    from qf.eval.rotate import rotate_checkpoint
    from qf.eval.widen import widen_checkpoint
    from qf.tools.fetch import fetch_model
    t0 = time.perf_counter()
    raw = export_hf(fetch_model(), out / "hf-raw", dtype="float32", overwrite=True)
    make = {"raw": lambda: raw,
            "rotated": lambda: rotate_checkpoint(raw, out / "hf-rotated", seed=seed, overwrite=True),
            "widened": lambda: widen_checkpoint(raw, out / "hf-widened", width=768, seed=seed, overwrite=True)}
    return make[reference](), raw, time.perf_counter() - t0


def make_imatrix(out: Path, args: argparse.Namespace) -> Path:
    """--imatrix, else qimatrix on the reference F16 over the calibration slice (disjoint from the evaluation
    slice); an imatrix.gguf left in --out by an earlier run is reused."""
    if args.imatrix is not None:
        return args.imatrix
    path = out / "imatrix.gguf"
    if path.is_file():
        return path
    cmd = [sys.executable, "-m", "qf.tools.qimatrix", str(out / f"smollm2-{REFERENCE}.qf"), "--slice", "calibration",
           "-o", str(path), "-c", str(args.ctx), "--chunks", str(args.imatrix_chunks), "-t", str(args.threads)]
    rc, secs, _ = run_child(cmd, out / "imatrix.log")
    if rc != 0:
        raise SystemExit(f"qimatrix failed (exit {rc}); see {out / 'imatrix.log'}")
    print(f"imatrix: {args.imatrix_chunks} chunks of {args.ctx} in {secs:.1f} s", file=sys.stderr)
    return path


def conversion_jobs(hf: Path, types: list[str], raw: Path | None, imatrix: Path | None,
                    imatrix_types: list[str], every: bool) -> list[tuple[str, Path, str, Path | None]]:
    """(row name, source folder, --type, importance file or None): `types` (with the importance matrix when
    `every`), the unrotated F16 when `raw` is given, and `T+imatrix` rows for `imatrix_types`."""
    jobs = [(t, hf, t, imatrix if every and t != REFERENCE else None) for t in types]
    jobs += [(UNROTATED, raw, REFERENCE, None)] if raw is not None else []
    return jobs + [(f"{t}+imatrix", hf, t, imatrix) for t in imatrix_types]


def convert_one(name: str, src: Path, qtype: str, imatrix: Path | None, out: Path) -> dict:
    """Convert in-process; size, bits/weight, convert wall and CPU seconds and tensor types of the file."""
    from qf.convert.pipeline import convert
    from qf.quant.imatrix import load_imatrix
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    s = convert(src, out / f"smollm2-{name.replace(' ', '-')}.qf", qtype,
                imatrix=None if imatrix is None else load_imatrix(imatrix))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime  # robust to a loaded machine
    print(f"converted {name}: {s.file_bytes / 2**20:.1f} MiB, {s.bits_per_weight:.2f} bpw, {s.seconds:.1f} s",
          file=sys.stderr)
    return {"path": str(s.path), "file_bytes": s.file_bytes, "bpw": s.bits_per_weight, "convert_s": s.seconds,
            "convert_cpu_s": cpu,
            "types": dict(s.types), "imatrix": None if imatrix is None else str(imatrix)}


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


def _convert_s(r: dict) -> str:
    """Convert wall seconds, and CPU seconds where measured: '12.3 (20.1 CPU)'."""
    cpu = r.get("convert_cpu_s")
    return f"{r['convert_s']:.1f}" + ("" if cpu is None else f" ({cpu:.0f} CPU)")


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
        lines.append(f"| {r['type']} | {r['file_bytes'] / 2**20:.1f} | {r['bpw']:.2f} | {_convert_s(r)} | "
                     f"{r['ppl']:.4f} ± {r['ppl_err']:.4f} | {lnr} | {kld} | {top} | "
                     f"{_num(r['prefill_tps'], '.1f')} | {_num(r['decode_tps'], '.1f')} | "
                     f"{_num(r['rss'] / 2**20, '.0f')} | "
                     f"{_type_counts(r['types'])} |")
    lines += ["", CAVEAT[args.reference]]
    if args.imatrix_all:
        src = (f"the importance matrix {args.imatrix}" if args.imatrix else
               f"the qimatrix importance matrix ({args.imatrix_chunks} chunks of {args.ctx} from the calibration "
               "slice)")
        lines += ["", f"Every quantized type used {src}."]
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--imatrix", type=Path, default=None,
                    help="use this importance matrix (e.g. llama-imatrix's on the reference F16) instead of qimatrix")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rotation (rotated and widened references)")
    ap.add_argument("--keep-models", action="store_true", help="keep each quantized .qf (deleted once scored)")
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


def measure(job: tuple[str, Path, str, Path | None], out: Path, args: argparse.Namespace, text: Path) -> dict:
    """One table row: convert, score and time one type; cached in --out as row-T.json so that a run resumes."""
    name = job[0]
    cache = out / f"row-{name.replace(' ', '-')}.json"
    if cache.is_file():
        print(f"{name}: reusing {cache}", file=sys.stderr)
        return json.loads(cache.read_text())
    conv = convert_one(*job, out)
    model = Path(conv["path"])
    row = {"type": name, **conv, **score(model, name, out, args, text), **speed(model, name, out, args)}
    if name != REFERENCE and not args.keep_models:
        model.unlink()
    cache.write_text(json.dumps(row, default=str))
    return row


def write_outputs(rows: list[dict], out: Path, args: argparse.Namespace) -> str:
    """quality.md, results.json and kld_vs_bpw.svg (benchmarks/plot_quality.py) from the rows so far."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plot_quality import write_svg
    md = table(rows, args)
    (out / "quality.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "rows": rows}, indent=2, default=str))
    write_svg(rows, out / "kld_vs_bpw.svg", title=f"SmolLM2-135M ({args.reference} reference): KLD vs F16")
    return md


def main() -> None:
    """Export, convert, score and time every type (resuming from row-*.json); write the table, JSON and plot."""
    from qf.eval.text import write_slice
    args, t_start = parse_args(), time.perf_counter()
    types, out = select_types(args.types), args.out
    out.mkdir(parents=True, exist_ok=True)
    text = write_slice("evaluation", out / "eval.txt")
    hf, raw, export_s = export_reference(out, args.reference, args.seed)
    print(f"exported HF folder in {export_s:.1f} s; types: {', '.join(types)}", file=sys.stderr)
    rows = [measure((REFERENCE, hf, REFERENCE, None), out, args, text)]
    imx_types = [t.strip().upper() for t in args.imatrix_types.split(",") if t.strip()]
    imx = make_imatrix(out, args) if imx_types or args.imatrix_all else None
    for job in conversion_jobs(hf, types[1:], None if args.reference == "raw" else raw, imx, imx_types,
                               args.imatrix_all):
        rows.append(measure(job, out, args, text))
        print(f"{job[0]}: PPL {rows[-1]['ppl']:.4f}, KLD {rows[-1]['kld']:.5f}"
              f" ({time.perf_counter() - t_start:.0f} s so far)", file=sys.stderr)
        write_outputs(rows, out, args)
    md = write_outputs(rows, out, args)
    print(md)
    print(f"total {time.perf_counter() - t_start:.0f} s wall, {cpu_seconds():.0f} s CPU (all processes); wrote "
          f"{out / 'quality.md'}, {out / 'results.json'}, {out / 'kld_vs_bpw.svg'}", file=sys.stderr)


if __name__ == "__main__":
    main()
