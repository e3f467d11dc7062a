"""Cold start: seconds from a fresh interpreter to the first generated token, with an empty numba cache
(a fresh install) and with the cache filled by that run (every later start).

    python benchmarks/bench_cold_start.py                        # SmolLM2 Q4_K_M, 165-token prompt, 2 threads
    python benchmarks/bench_cold_start.py --types Q4_0,Q4_K_M --runs 2
    python benchmarks/bench_cold_start.py --no-background --qf-base /tmp/qf-old   # also without, and a baseline

Each run is a new Python process (`python -c ...`) timed from its launch: imports, Model.load (weights
mapped, hyperparameters checked, the warm-up batch and step that compile the decode kernels) and the prompt
(which compiles the prefill kernels on first use, or loads those that Model.load's background processes
compiled meanwhile, cpu.precompile_background), until the first token is out. "cold" points NUMBA_CACHE_DIR
at an empty folder; "warm" reuses the folder the cold run filled. "cpu s" is the child's CPU time (user +
system, all its threads and processes), "main cpu s" that of the process itself (the rest: its background
compiles): on a loaded machine the wall time stretches, the compile work does not; on a quiet one the wall
time is about the larger of the main process's and a background process's share. --no-background also
runs Model.load(precompile=False) (one process compiles all); --qf-base DIR runs the same from another qf
source tree (PYTHONPATH) for a baseline.
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
t0 = time.perf_counter()
from qf.runtime import Model
t1 = time.perf_counter()
opts = {"precompile": False} if sys.argv[4] == "0" and "precompile" in inspect.signature(Model.load).parameters else {}
m = Model.load(sys.argv[1], n_ctx=1024, n_threads=int(sys.argv[3]), **opts)
t2 = time.perf_counter()
ids = m.tokenize("Once upon a time, " * 64)[:int(sys.argv[2])]
g = m.generate(ids, max_tokens=1, temperature=0)
first = next(iter(g))
t3 = time.perf_counter()
r = resource.getrusage(resource.RUSAGE_SELF)
m.close()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "prompt": t3 - t2, "n_prompt": len(ids),
                  "main_cpu": r.ru_utime + r.ru_stime}))
"""


def _children_cpu() -> float:
    """CPU seconds of the finished children so far (user + system)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(path: Path, n_prompt: int, threads: int, cache: str, background: bool, source: Path | None) -> dict:
    """One process to the first token; its phase times, the wall time from launch and its CPU time."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [env.get("PYTHONPATH")])])
    c0, t0 = _children_cpu(), time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(n_prompt), str(threads), str(int(background))],
                         env=env, capture_output=True, text=True, check=True, cwd=cache)  # not a source tree's root
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall"], res["cpu"] = wall, _children_cpu() - c0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K_M", help="SmolLM2 file types (comma-separated)")
    ap.add_argument("-p", "--n-prompt", type=int, default=165)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="cold + warm pairs per type")
    ap.add_argument("--no-background", action="store_true",
                    help="also runs with Model.load(precompile=False): no background compile processes")
    ap.add_argument("--qf-base", type=Path, help="also from this qf source tree (a baseline), alternated")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}\n")
    print("| model | qf | run | to first token s | cpu s | main cpu s | import s | load s | "
          f"prompt ({args.n_prompt} tok) s |\n|---|---|---|---|---|---|---|---|---|")
    trees = ([("base", args.qf_base)] if args.qf_base is not None else []) + [("this", None)]
    modes = (True, False) if args.no_background else (True,)
    for t in (x.strip() for x in args.types.split(",") if x.strip()):
        path = model_file(t)
        for _ in range(args.runs):
            for tree, source in trees:
                for bg in modes:
                    with tempfile.TemporaryDirectory(prefix="qf-numba-") as cache:
                        for label in ("cold", "warm"):
                            r = run_child(path, args.n_prompt, args.threads, cache, bg, source)
                            name = label + ("" if bg else ", precompile=False")
                            print(f"| SmolLM2 {t} | {tree} | {name} | {r['wall']:.1f} | {r['cpu']:.1f} | "
                                  f"{r['main_cpu']:.1f} | {r['import']:.1f} | {r['load']:.1f} | {r['prompt']:.1f} |",
                                  flush=True)


if __name__ == "__main__":
    main()
