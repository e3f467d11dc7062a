"""Cold start: seconds from launching a fresh interpreter to the first and the 16th generated token, with an
empty numba cache (a fresh install) and with the cache filled by that run (every later start).

    python benchmarks/bench_cold_start.py                        # SmolLM2 Q4_K_M, 165-token prompt, 2 threads
    python benchmarks/bench_cold_start.py --no-cold --runs 2     # also Model.load(cold_start=False), alternated
    python benchmarks/bench_cold_start.py --types Q4_0,Q4_K_M -n 32
    python benchmarks/bench_cold_start.py --no-background --qf-base /tmp/qf-old   # also without, and a baseline

Each run is a new Python process (`python -c ...`) timed from its launch: imports, Model.load and a greedy
generation of -n tokens from the prompt; then it waits for its background compile (Model.wait_kernels), so
the "warm" run that follows finds every kernel cached. "cold" points NUMBA_CACHE_DIR at an empty folder;
"warm" reuses the folder the cold run filled. On a cold start the default Model.load runs the prompt on numpy
(qf.runtime.coldstart) while one background process compiles the kernels: "compiled steps from" is when the
first decode step ran on compiled kernels, "all compiled" when every kernel was in the cache (the process
waited for it). With cold_start=False the main process compiles the decode kernels in its warm-up and the
prefill kernels on the first prompt (the integer ones in background processes, cpu.precompile_background).
"cpu s" is the child's CPU time (user + system, all its threads and processes, background compiles
included), "main cpu s" that of the process itself: on a loaded machine the wall time stretches, the
compile work does not; on a quiet one the first token comes about when the main process has had its CPU
seconds to it. --qf-base DIR runs the same from another qf source tree (PYTHONPATH) for a baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_runtime import model_file  # noqa: E402

CHILD = """
import inspect, json, resource, sys, time
launch = float(sys.argv[7])  # the parent's time.time() at launch
t0 = time.perf_counter()
from qf.runtime import Model
t1 = time.perf_counter()
params = inspect.signature(Model.load).parameters
opts = {"precompile": False} if sys.argv[4] == "0" and "precompile" in params else {}
if sys.argv[5] != "auto" and "cold_start" in params:
    opts["cold_start"] = sys.argv[5] == "1"
m = Model.load(sys.argv[1], n_ctx=1024, n_threads=int(sys.argv[3]), **opts)
t2 = time.perf_counter()
ids = m.tokenize("Once upon a time, " * 64)[:int(sys.argv[2])]
g = m.generate(ids, max_tokens=int(sys.argv[6]), temperature=0)
stamps = []
for _ in g:
    stamps.append(time.perf_counter())
    if len(stamps) == 1:
        first_since_launch = time.time() - launch
r = resource.getrusage(resource.RUSAGE_SELF)
wait = getattr(m, "wait_kernels", None)  # a cold start's background compile: the next run finds the cache full
if wait is not None:
    wait()
t4 = time.perf_counter()
gate = getattr(m, "_gate", None)
switched = {k: v - launch for k, v in gate.switched_at.items()} if gate is not None else {}
since_launch = time.time() - launch - (t4 - t0)  # interpreter start-up before t0
m.close()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "prompt": stamps[0] - t2, "n_prompt": len(ids),
                  "first": first_since_launch, "last": stamps[-1] - t0 + since_launch, "n_gen": len(stamps),
                  "all_compiled": t4 - t0 + since_launch, "matvec_compiled": switched.get("matvec"),
                  "main_cpu": r.ru_utime + r.ru_stime}))
"""


def _children_cpu() -> float:
    """CPU seconds of the finished children so far (user + system)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(path: Path, n_prompt: int, threads: int, cache: str, background: bool, source: Path | None,
              cold: str = "auto", n_gen: int = 16) -> dict:
    """One process to its n_gen-th token (greedy; it then waits for its background compile to end): phase
    times, first / last token and "all compiled" times from the interpreter's start, the launch overhead
    added ("wall" is from launch to exit), and its CPU time (children included)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [env.get("PYTHONPATH")])])
    c0, t0 = _children_cpu(), time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(n_prompt), str(threads), str(int(background)),
                          cold, str(n_gen), repr(time.time())],
                         env=env, capture_output=True, text=True, check=True, cwd=cache)  # not a source tree's root
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall"], res["cpu"] = wall, _children_cpu() - c0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K_M", help="SmolLM2 file types (comma-separated)")
    ap.add_argument("-p", "--n-prompt", type=int, default=165)
    ap.add_argument("-n", "--n-gen", type=int, default=16, help="tokens generated (greedy) per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="cold + warm pairs per type and mode")
    ap.add_argument("--no-cold", action="store_true",
                    help="also runs with Model.load(cold_start=False): kernels compiled in-process, as before")
    ap.add_argument("--no-background", action="store_true",
                    help="also runs with Model.load(precompile=False, cold_start=False): one process compiles all")
    ap.add_argument("--qf-base", type=Path, help="also from this qf source tree (a baseline), alternated")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs\n")
    n = args.n_gen
    print(f"| model | qf | mode | run | 1st token s | {n}th token s | compiled steps from s | all compiled s | cpu s "
          f"| main cpu s | import s | load s | prompt ({args.n_prompt} tok) s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    trees = ([("base", args.qf_base)] if args.qf_base is not None else []) + [("this", None)]
    modes = [("default", True, "auto")] + ([("cold_start=False", True, "0")] if args.no_cold else []) \
        + ([("precompile=False", False, "0")] if args.no_background else [])
    for t in (x.strip() for x in args.types.split(",") if x.strip()):
        path = model_file(t)
        for _ in range(args.runs):
            for tree, source in trees:
                for mode, bg, cold in modes:
                    with tempfile.TemporaryDirectory(prefix="qf-numba-") as cache:
                        for label in ("cold", "warm"):
                            r = run_child(path, args.n_prompt, args.threads, cache, bg, source, cold, n)
                            dec = "-" if r.get("matvec_compiled") is None else f"{r['matvec_compiled']:.1f}"
                            print(f"| SmolLM2 {t} | {tree} | {mode} | {label} | {r['first']:.1f} | {r['last']:.1f} | "
                                  f"{dec} | {r['all_compiled']:.1f} | {r['cpu']:.1f} | {r['main_cpu']:.1f} | "
                                  f"{r['import']:.1f} | {r['load']:.1f} | {r['prompt']:.1f} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
