"""Decode speed with the thread count chosen automatically vs pinned, on a quiet and on a busy machine.

    python benchmarks/bench_threads.py [--type Q4_0] [-n 128] [-r 3]

For each condition (quiet; one core kept busy by a spinning child process) it loads SmolLM2 three ways,
automatic (`n_threads=None`: qf.runtime.threads picks all physical cores or half of them by timing),
pinned to all cores and pinned to half, and prints the median decode tokens/s of -r runs of -n steps.
Each load runs in a child process so that all three see the same machine state in turn.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time


def _spin() -> None:
    """Keep one core busy until terminated."""
    while True:
        pass


def _decode(model: str, threads: int | None, n: int, reps: int) -> dict:
    """Median decode tok/s of one load (run in a child: prints JSON)."""
    code = f"""
import json, numpy as np
from qf.runtime.api import Model
from qf.tools.qbench import time_generation
m = Model.load({model!r}, n_ctx={max(n, 64)}, n_threads={threads!r})
ids = np.random.default_rng(0).integers(0, m.n_vocab, {n}).tolist()
tps = [{n} / time_generation(m.engine, ids) for _ in range({reps})]
t = m.engine.threads
print(json.dumps({{"tps": tps, "chose": t.best if t else None}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    """Both conditions, three thread settings each; a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("-n", type=int, default=128, help="decode steps per run")
    ap.add_argument("-r", type=int, default=3, help="runs per setting (median)")
    args = ap.parse_args()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_runtime import model_file
    from qf.runtime.api import default_threads

    model, n_all = str(model_file(args.type)), default_threads()
    settings = [("automatic", None), (f"pinned {n_all}", n_all), (f"pinned {max(1, n_all // 2)}", max(1, n_all // 2))]
    print(f"| machine | {' | '.join(s for s, _ in settings)} |\n|---|---|---|---|")
    for busy in (False, True):
        spinner = mp.Process(target=_spin, daemon=True) if busy else None
        if spinner:
            spinner.start()
            time.sleep(0.5)
        try:
            cells = []
            for _, threads in settings:
                r = _decode(model, threads, args.n, args.r)
                chose = f" (chose {r['chose']})" if r["chose"] is not None else ""
                cells.append(f"{statistics.median(r['tps']):.1f}{chose}")
        finally:
            if spinner:
                spinner.terminate()
        print(f"| {'one core busy' if busy else 'quiet'} | {' | '.join(cells)} |")
    print(f"\nSmolLM2-135M {args.type}, decode tok/s, median of {args.r} x {args.n} steps")


if __name__ == "__main__":
    main()
