"""Our calibrated quantizer against llm-compressor's on the same weights and the same calibration tokens, in
alternating rounds (ours, theirs, ours, theirs, ...) so that a shared machine's load falls on both alike.

Used by bench_gptq.py --llmc PYTHON and bench_awq.py --llmc PYTHON (PYTHON: a venv with llmcompressor 0.14).
The windows are the ones `qconvert --calib` samples (qf.calib.driver.calibration_windows, seed 0), saved as
an .npy that tests/payload_e2e_make.py --windows feeds to oneshot(); llm-compressor's checkpoint is imported with
`qconvert` (its payload kept) and scored like ours. Wall, CPU seconds (user + system of the child) and peak RSS
are each child process's own (os.wait4); the load average is read before each run. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (scoring and the reference export are shared)

ROOT = Path(__file__).resolve().parent.parent
MAKER = ROOT / "tests" / "payload_e2e_make.py"


@dataclass(frozen=True)
class Contest:
    """One head-to-head: our --type, llm-compressor's recipe (payload_e2e_make.py), the RTN row on the same grid."""

    ours: str
    recipe: str
    rtn: str


GPTQ = Contest("GPTQ-W4G64", "w4a16_gptq_g64", "RTN-W4G64")
AWQ = Contest("AWQ-W4G64", "w4a16_awq_g64", "RTN-W4G64-ASYM")


def _env(threads: int) -> dict[str, str]:
    """Children's environment: `threads` for numba, OpenMP (torch) and BLAS; the repository importable."""
    n = str(threads)
    return {**os.environ, "NUMBA_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n,
            "OPENBLAS_NUM_THREADS": n, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(cmd: list[str], log: Path, threads: int) -> dict:
    """Run a child with output to `log`: wall s, CPU s, peak RSS bytes, load average at start; exit on failure."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(["nice", "-n", "5", *cmd], stdout=f, stderr=subprocess.STDOUT, env=_env(threads))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}; see {log}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024, "load": load}


def _digest(path: Path) -> str:
    """sha256 of a file (rounds of a deterministic quantizer write the same bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def windows(hf: Path, calib: Path, samples: int, seqlen: int, out: Path) -> Path:
    """The windows our qconvert calibrates on, as int64 [N, L] .npy for llm-compressor."""
    from qf.calib.data import CalibOptions
    from qf.calib.driver import calibration_windows

    path = out / f"windows-{samples}x{seqlen}.npy"
    np.save(path, calibration_windows(hf, CalibOptions(calib, samples, seqlen)))
    return path


def ours(hf: Path, out: Path, c: Contest, args: argparse.Namespace, calib: Path, k: int) -> dict:
    """Round k of our qconvert --calib."""
    path = out / f"ours-{c.ours}-{k}.qf"
    cmd = [sys.executable, "-m", "qf.tools.qconvert", str(hf), str(path), "--type", c.ours, "--calib", str(calib),
           "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen), "-q"]
    r = run(cmd, out / f"ours-{c.ours}-{k}.log", args.threads)
    return {**r, "path": str(path), "digest": _digest(path)}


def theirs(hf: Path, out: Path, c: Contest, args: argparse.Namespace, win: Path, k: int) -> dict:
    """Round k of llm-compressor (payload_e2e_make.py in --llmc's Python), then its checkpoint imported."""
    ckpt = out / f"llmc-{c.recipe}-{k}"
    if ckpt.exists():
        import shutil
        shutil.rmtree(ckpt)
    cmd = [str(args.llmc), str(MAKER), str(hf), str(ckpt), c.recipe, "--windows", str(win)]
    r = run(cmd, out / f"llmc-{c.recipe}-{k}.log", args.threads)
    r.update(json.loads((ckpt / "llmc_timing.json").read_text()))
    path = out / f"llmc-{c.recipe}-{k}.qf"
    run([sys.executable, "-m", "qf.tools.qconvert", str(ckpt), str(path), "--type", "F16", "-q"],
        out / f"llmc-{c.recipe}-{k}-import.log", args.threads)
    return {**r, "path": str(path), "digest": _digest(path)}


def baseline(hf: Path, out: Path, qtype: str, threads: int) -> dict:
    """F16 or RTN on our side, no calibration."""
    path = out / f"smollm2-{qtype}.qf"
    if not path.is_file():
        run([sys.executable, "-m", "qf.tools.qconvert", str(hf), str(path), "--type", qtype, "-q"],
            out / f"convert-{qtype}.log", threads)
    return {"path": str(path)}


def contest(c: Contest, args: argparse.Namespace) -> str:
    """F16, RTN, then `rounds` alternating rounds of ours and theirs; score round 0 of each; the table."""
    from qf.eval.text import calibration_text, evaluation_text

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    calib, text = out / "calibration.txt", out / "evaluation.txt"
    calib.write_text(calibration_text(), encoding="utf-8")
    text.write_text(evaluation_text(), encoding="utf-8")
    hf = (args.reference_dir or out) / "hf-rotated"
    if not (hf / "config.json").is_file():
        hf, _, secs = bq.export_reference(out, "rotated")
        print(f"reference exported in {secs:.1f} s", file=sys.stderr)
    win = windows(hf, calib, args.samples, args.seqlen, out)
    rows: dict[str, dict] = {}
    for name in (bq.REFERENCE, c.rtn):
        rows[name] = baseline(hf, out, name, args.threads)
        rows[name].update(bq.score(Path(rows[name]["path"]), name, out, args, text))
    runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
    names = {"ours": f"{c.ours} (ours)", "theirs": f"llm-compressor {c.recipe}"}
    md = ""
    for k in range(args.rounds):
        for side, go in (("ours", lambda: ours(hf, out, c, args, calib, k)),
                         ("theirs", lambda: theirs(hf, out, c, args, win, k))):
            runs[side].append(go())
            print(f"round {k} {names[side]}: {_fmt(runs[side][-1])}", file=sys.stderr)
            if k == 0:  # round 0's file is scored; later rounds only time (a deterministic run repeats its bytes)
                rows[names[side]] = {**runs[side][0], **bq.score(Path(runs[side][0]["path"]), names[side], out,
                                                                  args, text)}
            rows[names[side]]["rounds"] = runs[side]
        md = table(rows, c, args)  # rewritten after every round: an interrupted run still leaves a table
        (out / f"h2h-{c.ours}.md").write_text(md)
        (out / f"h2h-{c.ours}.json").write_text(json.dumps(rows, indent=1, default=str))
        print(md, file=sys.stderr)
    return md


def _fmt(r: dict) -> str:
    """One run's wall, CPU, RSS and load."""
    return f"{r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, {r['rss'] / 2**20:.0f} MiB, load {r['load']:.1f}"


def table(rows: dict[str, dict], c: Contest, args: argparse.Namespace) -> str:
    """PPL, KLD, gap recovered, median wall / CPU / peak RSS per side, and theirs/ours per round."""
    f16, rtn = rows[bq.REFERENCE]["ppl"], rows[c.rtn]["ppl"]
    lines = [f"SmolLM2-135M (rotated reference), W4 g64 ({'asym' if 'ASYM' in c.rtn else 'sym'}), calibration "
             f"{args.samples} x {args.seqlen} tokens of the Jargon File calibration slice (the same windows for "
             f"both), {args.chunks} x {args.ctx} evaluation tokens, {args.threads} threads, {args.rounds} "
             "alternating rounds (median shown).", "",
             "| row | PPL | KLD vs F16 | gap recovered | wall s | CPU s | peak RSS MiB | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        rec = "" if name in (bq.REFERENCE, c.rtn) else f"**{100 * (rtn - r['ppl']) / (rtn - f16):.1f}%**"
        kld = "0" if name == bq.REFERENCE else f"{r['kld']:.4f}"
        rs = r.get("rounds")
        t = ("| | | | |" if not rs else
             f"| {np.median([x['wall_s'] for x in rs]):.1f} | {np.median([x['cpu_s'] for x in rs]):.1f} | "
             f"{max(x['rss'] for x in rs) / 2**20:.0f} | {np.mean([x['load'] for x in rs]):.1f} |")
        lines.append(f"| {name} | {r['ppl']:.4f} | {kld} | {rec} {t}")
    o, t = rows[f"{c.ours} (ours)"]["rounds"], rows[f"llm-compressor {c.recipe}"]["rounds"]
    ratio = [b["wall_s"] / a["wall_s"] for a, b in zip(o, t)]
    cpu = [b["cpu_s"] / a["cpu_s"] for a, b in zip(o, t)]
    one = [b["oneshot_s"] for b in t]
    lines += ["", f"llm-compressor / ours, per round: wall {', '.join(f'{x:.2f}x' for x in ratio)}; CPU "
              f"{', '.join(f'{x:.2f}x' for x in cpu)} (llm-compressor's oneshot() alone: "
              f"{', '.join(f'{x:.1f}' for x in one)} s). Same bytes across rounds: ours "
              f"{len({x['digest'] for x in o}) == 1}, llm-compressor {len({x['digest'] for x in t}) == 1}."]
    return "\n".join(lines) + "\n"


def add_args(p: argparse.ArgumentParser) -> None:
    """The options a head-to-head adds to a bench script."""
    p.add_argument("--llmc", type=Path, default=None, metavar="PYTHON",
                   help="a Python with llmcompressor 0.14: run the head-to-head against it instead of the table")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and llm-compressor's")
