"""qf against llama.cpp on the same files: llama.cpp's `llama-bench` and our `qbench`, alternated, median ratios.

Opt-in: it needs a llama-bench binary, e.g. built from the llama-cpp-python sdist (llama.cpp's full source):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        && cmake --build build -j2 --target llama-bench
    python benchmarks/bench_prefill_llama.py .../build/bin/llama-bench            # SmolLM2 set, pp512 + tg128, -t 2
    python benchmarks/bench_prefill_llama.py LLAMA_BENCH --types Q4_0 --gguf gemma-3-270m-q4_k_m.gguf --rounds 5

Each round runs, per model, llama-bench once (-r 1, JSON output) and then qbench once (-r 1, --json), in
separate processes, one after the other: load that drifts over minutes hits both sides of a ratio alike.
The sides run in one order in odd rounds and in the reverse order in even ones (a run measured faster right
after another: the order would otherwise favour one side). The table gives each side's median tokens/s and
the median of the per-round ratios qf / llama.cpp; use an even number of rounds.

--base-env VAR=VALUE instead makes the third side this tree under those variables (e.g. --repack --base-env
QF_AMX=0: AMX tiles against VNNI only, in the same rounds).

--llama-alt LLAMA_BENCH adds another llama.cpp build as a side of its own (e.g. one with GGML_AMX_INT8=ON, whose
AMX backend repacks Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K for tile products), with its own ratio column.

--qf-base DIR adds a third side in every round: qbench run from another qf source tree (e.g. `git archive
<commit> | tar -x -C DIR`, imported first through PYTHONPATH), so a change is measured against its baseline
and llama.cpp under the same load. Each round prints the 1-minute load average (a shared machine's load
shows up in the spread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_runtime import model_file  # noqa: E402

DEFAULT_TYPES = "F16,Q8_0,Q4_0,Q4_K_M,Q6_K"


def llama_bench(binary: Path, model: Path, n_prompt: int, n_gen: int, threads: int) -> dict[str, float]:
    """{"pp512": t/s, "tg128": t/s} from one llama-bench run."""
    out = subprocess.run([str(binary), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
    res = {}
    for row in json.loads(out):
        name = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        res[name] = float(row["avg_ts"])
    return res


def qbench(model: Path, n_prompt: int, n_gen: int, threads: int, source: Path | None = None,
           repack: bool = False, extra_env: dict[str, str] | None = None) -> dict[str, float]:
    """{"pp512": t/s, "tg128": t/s} from one qbench run (of the qf source tree `source` when given; repack:
    `qbench --repack`; extra_env: variables set for the run)."""
    env = dict(os.environ) | (extra_env or {})
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "q.json"
        subprocess.run([sys.executable, "-m", "qf.tools.qbench", str(model), "-p", str(n_prompt), "-n", str(n_gen),
                        "-t", str(threads), "-r", "1", "--json", str(js)] + (["--repack"] if repack else []),
                       capture_output=True, text=True, check=True,
                       env=env, cwd=source)  # not this tree: `python -m` puts the working folder first on sys.path
        return {r["test"]: float(r["median_tps"]) for r in json.loads(js.read_text())["results"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llama_bench", type=Path, help="path of llama.cpp's llama-bench")
    ap.add_argument("--types", default=DEFAULT_TYPES, help="SmolLM2 file types (comma-separated; '' for none)")
    ap.add_argument("--gguf", action="append", default=[], help="also this model file (repeatable)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-alt", type=Path, help="also this llama-bench every round (another build of llama.cpp, "
                    "e.g. with its AMX backend), with its own ratio column")
    ap.add_argument("--qf-base", type=Path, help="also qbench from this qf source tree (a baseline), every round")
    ap.add_argument("--repack", action="store_true",
                    help="run our side as `qbench --repack` (llama-bench repacks by default; the baseline never does: "
                         "--qf-base . then measures repacking against no repacking in the same rounds)")
    ap.add_argument("--base-env", action="append", default=[], metavar="VAR=VALUE",
                    help="the baseline is this tree (with --repack as given) under these variables (repeatable), "
                         "e.g. QF_AMX=0: a switch measured on and off in the same rounds")
    args = ap.parse_args()
    base_env = dict(e.split("=", 1) for e in args.base_env if "=" in e)
    if len(base_env) != len(args.base_env):
        sys.exit("--base-env takes VAR=VALUE")
    if base_env and args.qf_base is not None:
        sys.exit("--base-env and --qf-base are two kinds of baseline: give one")
    if not args.llama_bench.is_file():
        sys.exit(f"no llama-bench at {args.llama_bench}")
    if args.qf_base is not None and not (args.qf_base / "qf" / "__init__.py").is_file():
        sys.exit(f"no qf source tree at {args.qf_base}")
    models = {f"SmolLM2 {t.strip()}": model_file(t.strip()) for t in args.types.split(",") if t.strip()}
    models.update({Path(g).name: Path(g) for g in args.gguf})
    if args.llama_alt is not None and not args.llama_alt.is_file():
        sys.exit(f"no llama-bench at {args.llama_alt}")
    sides = {"llama.cpp": lambda p: llama_bench(args.llama_bench, p, args.n_prompt, args.n_gen, args.threads)}
    if args.llama_alt is not None:
        sides["llama.cpp alt"] = lambda p: llama_bench(args.llama_alt, p, args.n_prompt, args.n_gen, args.threads)
    if args.qf_base is not None:
        sides["qf base"] = lambda p: qbench(p, args.n_prompt, args.n_gen, args.threads, args.qf_base)
    elif base_env:
        sides["qf base"] = lambda p: qbench(p, args.n_prompt, args.n_gen, args.threads, repack=args.repack,
                                            extra_env=base_env)
    sides["qf"] = lambda p: qbench(p, args.n_prompt, args.n_gen, args.threads, repack=args.repack)
    runs: dict[tuple[str, str, str], list[float]] = {}
    for k in range(args.rounds):
        print(f"round {k + 1}: load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        order = list(sides.items()) if k % 2 == 0 else list(sides.items())[::-1]  # even out who runs first
        for name, path in models.items():
            for side, fn in order:
                for test, tps in fn(path).items():
                    runs.setdefault((name, test, side), []).append(tps)
                    print(f"  {name} {test} {side}: {tps:.1f} t/s", file=sys.stderr, flush=True)
    print(f"\n{args.rounds} alternated rounds, {args.threads} threads; load average at the end "
          f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    base = args.qf_base is not None or bool(base_env)
    alt = args.llama_alt is not None
    print("| model | test | llama.cpp t/s |" + (" qf base t/s |" if base else "") + " qf t/s | qf / llama.cpp (median of "
          "rounds) | min - max |" + (" qf base / llama.cpp | qf / qf base |" if base else "")
          + (" llama.cpp alt t/s | qf / llama.cpp alt |" if alt else "") + "\n"
          "|---|---|---|---|---|---|" + ("---|---|---|" if base else "") + ("---|---|" if alt else ""))
    for name in models:
        for test in (f"pp{args.n_prompt}", f"tg{args.n_gen}"):
            a, b = runs.get((name, test, "llama.cpp"), []), runs.get((name, test, "qf"), [])
            if not a or not b:
                continue
            r = [y / x for x, y in zip(a, b)]
            row = f"| {name} | {test} | {statistics.median(a):.1f} | "
            if base:
                c = runs[(name, test, "qf base")]
                row += f"{statistics.median(c):.1f} | "
            row += f"{statistics.median(b):.1f} | {statistics.median(r):.2f}x | {min(r):.2f} - {max(r):.2f} |"
            if base:
                row += (f" {statistics.median([y / x for x, y in zip(a, c)]):.2f}x |"
                        f" {statistics.median([y / x for x, y in zip(c, b)]):.2f}x |")
            if alt:
                d = runs[(name, test, "llama.cpp alt")]
                row += f" {statistics.median(d):.1f} | {statistics.median([y / x for x, y in zip(d, b)]):.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
