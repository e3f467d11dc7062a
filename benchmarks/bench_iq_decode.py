"""Decode (one-token matvec) of the IQ types: the f32 matvec and the integer one (cpu_iq_dot.py) against
Q4_K's f32 matvec, in interleaved rounds on the same shapes (random valid bytes, as bench_kernels --paired).

    python benchmarks/bench_iq_decode.py --threads 1 --rounds 7
    python benchmarks/bench_iq_decode.py --types IQ3_S IQ2_XS --shapes 576x1536 1536x768
    python benchmarks/bench_iq_decode.py --models Q4_K_M=a.qf IQ3_S=b.qf IQ2_XS=c.qf --threads 2 -n 32 --rounds 5

Columns: us per call (median of rounds; each round's figure the fastest call in its budget) of the f32
matvec (cpu.matvec), of the integer matvec with one and two 8-bit activation parts (the activation
quantization included: `matvec_int` quantizes per call), and each one's ratio to Q4_K (BASE time / time,
median over rounds: >= 1 means at least as fast as Q4_K).

--models times whole-model decode (tokens/s of N generated tokens, qbench's time_generation) of each file,
interleaved round by round, and for the files holding IQ matrices a second time with their matvecs routed to
the integer kernel ("int": cpu.matvec replaced, in this process only, by matvec_int for the IQ types; what the
runtime would do with the dispatch change the report proposes); ratios are to the first file, per round.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qf.format.ggml_types import GGMLType
from qf.runtime.kernels import cpu
from qf.runtime.kernels.cpu_iq_dot import TYPES, matvec_int
from qf.runtime.kernels.torch_dequant import random_packed


def best_time(fn, budget: float) -> float:
    """Fastest single call over `budget` seconds (at least 3 calls)."""
    fn()
    best, calls, end = float("inf"), 0, time.perf_counter() + budget
    while calls < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


def bench(base: GGMLType, types: list[GGMLType], shapes: list[tuple[int, int]], rounds: int, budget: float) -> None:
    """Print the table (see the module docstring)."""
    rng = np.random.default_rng(0)
    print(f"decode matvec, {cpu.get_threads()} threads, {rounds} interleaved rounds; "
          f"ratio = {base.name} f32 time / time")
    print(f"{'type':8} {'shape':>10} {'f32 us':>8} {'int1 us':>8} {'int2 us':>8} {base.name + ' us':>8}"
          f" {'f32':>5} {'int1':>5} {'int2':>5}")
    for n_out, n_in in shapes:
        x = rng.standard_normal(n_in).astype(np.float32)
        out = np.empty(n_out, np.float32)
        mats = {t: cpu.QMatrix(t, random_packed(t, n_out, n_in, rng), n_in, n_out) for t in [base, *types]}
        calls = {(base, "f32"): lambda w=mats[base]: cpu.matvec(w, x, out)}
        for t in types:
            w = mats[t]
            calls[(t, "f32")] = lambda w=w: cpu.matvec(w, x, out)
            calls[(t, "int1")] = lambda w=w: matvec_int(w, x, out, parts=1)
            calls[(t, "int2")] = lambda w=w: matvec_int(w, x, out, parts=2)
        times = {k: [] for k in calls}
        for _ in range(rounds):
            for k, fn in calls.items():
                times[k].append(best_time(fn, budget))
        tb = np.array(times[(base, "f32")])
        for t in types:
            med = [np.median(times[(t, p)]) * 1e6 for p in ("f32", "int1", "int2")]
            ratio = [np.median(tb / np.array(times[(t, p)])) for p in ("f32", "int1", "int2")]
            print(f"{t.name:8} {f'{n_out}x{n_in}':>10} {med[0]:8.1f} {med[1]:8.1f} {med[2]:8.1f} "
                  f"{np.median(tb) * 1e6:8.1f} {ratio[0]:5.2f} {ratio[1]:5.2f} {ratio[2]:5.2f}", flush=True)


def bench_models(files: dict[str, str], threads: int, n_gen: int, rounds: int) -> None:
    """Print decode tokens/s per file (and per path for IQ files), interleaved; ratios to the first file."""
    import statistics

    from qf.runtime import Model
    from qf.tools.qbench import time_generation

    f32_matvec = cpu.matvec
    state = {"int": False}

    def routed(w, x, out=None):
        if state["int"] and w.type in TYPES:
            return matvec_int(w, x, out)
        return f32_matvec(w, x, out)

    models = {k: Model.load(v, n_ctx=max(n_gen, 64), n_threads=threads) for k, v in files.items()}
    cpu.matvec = routed
    try:
        ids = np.random.default_rng(0).integers(0, next(iter(models.values())).n_vocab, size=n_gen).tolist()
        runs = []
        for k, m in models.items():
            has_iq = any(getattr(w, "type", None) in TYPES for w in _matrices(m))
            runs += [(k, m, False)] + ([(k, m, True)] if has_iq else [])
        for k, m, use_int in runs:  # warm-up: compiles, faults the weights in
            state["int"] = use_int
            time_generation(m.engine, ids[:8])
        tps: dict[str, list[float]] = {}
        for _ in range(rounds):
            for k, m, use_int in runs:
                state["int"] = use_int
                tps.setdefault(f"{k} {'int' if use_int else 'f32'}", []).append(n_gen / time_generation(m.engine, ids))
    finally:
        cpu.matvec = f32_matvec
        for m in models.values():
            m.close()
    base = next(iter(tps.values()))
    print(f"decode tg{n_gen}, {threads} threads, {rounds} interleaved rounds")
    print(f"| file / path | t/s (median) | vs {next(iter(tps))} (median of per-round ratios) | min - max |")
    print("|---|---|---|---|")
    for k, v in tps.items():
        r = [a / b for a, b in zip(v, base)]
        print(f"| {k} | {statistics.median(v):.1f} | {statistics.median(r):.3f}x | {min(r):.3f} - {max(r):.3f} |",
              flush=True)


def _matrices(model) -> list:
    """The weight matrices a loaded model holds (its engine's QMatrix objects, found by attribute walk)."""
    out, seen, todo = [], set(), [model.engine]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, cpu.QMatrix):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif hasattr(o, "__dict__") and type(o).__module__.startswith("qf."):
            todo.extend(vars(o).values())
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", nargs="*", default=[t.name for t in TYPES])
    ap.add_argument("--base", default="Q4_K")
    ap.add_argument("--shapes", nargs="*", default=["576x1536", "1536x768"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget", type=float, default=0.05, help="seconds per measurement")
    ap.add_argument("--models", nargs="*", metavar="LABEL=FILE", help="whole-model decode of these files instead")
    ap.add_argument("-n", type=int, default=32, help="tokens generated per --models measurement")
    a = ap.parse_args(argv)
    if a.models:
        bench_models(dict(m.split("=", 1) for m in a.models), a.threads, a.n, a.rounds)
        return
    cpu.set_threads(a.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes]
    bench(GGMLType[a.base], [GGMLType[t] for t in a.types], shapes, a.rounds, a.budget)


if __name__ == "__main__":
    main()
