"""CPU runtime speed on SmolLM2-135M: prompt (pp) and generation (tg) tokens/s, and the Python overhead.

    python benchmarks/bench_runtime.py [--threads 1,2] [-p 128] [-n 64] [-r 3] [--types Q4_0,Q4_1] [--baseline]
    python benchmarks/bench_runtime.py --paired 15 --types Q4_0,Q4_K_M --threads 2 -n 64

--paired R times decode (tgN) only, all models loaded at once, in R rounds that run every type once each
(A B A B ...), and prints each type's decode speed over the first type's as the median of the R per-round
ratios: on a shared machine, load that drifts over minutes then hits both sides of each ratio alike.

--baseline adds, in the same run, a plain-numpy baseline for each type: the same model with every matrix
product done as "dequantize the weight with the codec, then x @ W.T" (numpy/OpenBLAS) on every call.

Q4_1 is the PyPI file as shipped; Q4_0 (and any other --types) is made once by exporting it to an HF folder
and converting back with qf.convert (cached under the qf cache). "overhead" is the share of a decode step
spent outside the matrix kernels (norms, RoPE, attention, Python), measured by timing the kernel calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from qf.tools.fetch import cache_dir, fetch_model
from qf.tools.qbench import format_table, model_facts, run_bench

SHIPPED = "Q4_1"


def numpy_baseline_backend() -> type:
    """A CpuBackend whose matrix products dequantize the whole weight on every call, then use numpy."""
    import numpy as np

    from qf.quant.codecs import get_codec
    from qf.runtime.backend import CpuBackend

    class NumpyBackend(CpuBackend):
        name = "numpy"

        def linear(self, w: Any, x: np.ndarray, bias: np.ndarray | None = None, exact_rows: bool = False) -> np.ndarray:
            """x [M, n_in] @ dequantize(w).T -> [M, n_out]."""
            y = x @ get_codec(w.type).dequantize(w.data).T  # w: [n_out, n_in] f32, made anew per call
            return y + bias if bias is not None else y

    return NumpyBackend


def load_baseline(path: Path, n_threads: int | None = None, **kw: Any) -> Any:
    """Model.load with the numpy baseline in place of the numba CPU backend."""
    from qf.runtime import Model

    return Model.load(path, cpu_backend=numpy_baseline_backend()(n_threads), **kw)


def model_file(qtype: str) -> Path:
    """The SmolLM2 file of a given type: the shipped one, or converted once from its HF export."""
    src = fetch_model()
    if qtype == SHIPPED:
        return src
    out = cache_dir() / "bench" / f"smollm2-135m-{qtype.lower()}.qf"
    if not out.exists():
        from qf.convert.export import export_hf
        from qf.convert.pipeline import convert

        hf = cache_dir() / "bench" / "smollm2-135m-hf"
        if not (hf / "config.json").exists():
            export_hf(src, hf, overwrite=True)
        convert(hf, out, qtype=qtype)
    return out


class KernelTimer:
    """Wraps the CPU kernel entry points to add up the seconds spent inside them."""

    NAMES = ("matvec", "matmul", "get_rows")

    def __init__(self) -> None:
        from qf.runtime.kernels import cpu

        self.cpu, self.seconds, self.saved = cpu, 0.0, {}

    def __enter__(self) -> "KernelTimer":
        for name in self.NAMES:
            fn = self.saved[name] = getattr(self.cpu, name)
            setattr(self.cpu, name, self._timed(fn))
        return self

    def _timed(self, fn: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
        return call

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self.saved.items():
            setattr(self.cpu, name, fn)


def decode_overhead(model: Any, n: int = 32) -> tuple[float, float]:
    """(ms per decode step, share of it outside the matrix kernels)."""
    eng = model.engine
    eng.cache.clear()
    eng.bind_threads()
    eng.step(1)
    with KernelTimer() as kt:
        t0 = time.perf_counter()
        for i in range(n):
            eng.step(100 + i)
        total = time.perf_counter() - t0
    eng.cache.clear()
    return 1000 * total / n, 1.0 - kt.seconds / total


def paired_decode(types: list[str], threads: int, n_gen: int, rounds: int) -> None:
    """Decode tokens/s of each type, interleaved round by round; ratios to the first type per round."""
    import numpy as np

    from qf.runtime import Model
    from qf.tools.qbench import time_generation

    rng = np.random.default_rng(0)
    models = {t: Model.load(model_file(t), n_ctx=max(n_gen, 64), n_threads=threads) for t in types}
    try:
        ids = [rng.integers(0, m.n_vocab, size=n_gen).tolist() for m in models.values()][0]
        for m in models.values():
            time_generation(m.engine, ids[:8])  # warm-up (compiles, faults the weights in)
        tps: dict[str, list[float]] = {t: [] for t in types}
        for _ in range(rounds):
            for t, m in models.items():
                tps[t].append(n_gen / time_generation(m.engine, ids))
    finally:
        for m in models.values():
            m.close()
    base = tps[types[0]]
    print(f"| type | decode tg{n_gen} t/s (median of {rounds}) | vs {types[0]} (median of per-round ratios) "
          f"| min - max ratio |\n|---|---|---|---|")
    for t in types:
        r = [a / b for a, b in zip(tps[t], base)]
        print(f"| {t} | {statistics.median(tps[t]):.1f} | {statistics.median(r):.3f}x | "
              f"{min(r):.3f} - {max(r):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_0,Q4_1", help="comma-separated model types")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-b", "--batch-size", type=int, default=128)
    ap.add_argument("--baseline", action="store_true", help="also time the plain-numpy baseline")
    ap.add_argument("--paired", type=int, metavar="R", default=0,
                    help="decode only, R interleaved rounds; ratios to the first --types entry")
    args = ap.parse_args()
    if args.paired:
        for threads in (int(t) for t in args.threads.split(",")):
            paired_decode([t.strip() for t in args.types.split(",")], threads, args.n_gen, args.paired)
        return

    from qf.runtime import Model

    for qtype in args.types.split(","):
        path = model_file(qtype.strip())
        size, params = model_facts(path)
        for threads in (int(t) for t in args.threads.split(",")):
            n_ctx = max(args.n_prompt, args.n_gen, 64)
            with Model.load(path, n_ctx=n_ctx, n_threads=threads, n_batch=args.batch_size) as m:
                results = run_bench(m, args.n_prompt, args.n_gen, args.repetitions)
                ms, share = decode_overhead(m)
            print(format_table(f"SmolLM2-135M {qtype}", size, params, threads, results))
            print(f"decode step {ms:.2f} ms, {100 * share:.1f}% outside the matrix kernels "
                  f"(pp runs: {', '.join(f'{x:.1f}' for x in results[0].tps)} t/s; "
                  f"median tg {statistics.median(results[-1].tps):.1f} t/s)\n")
            if args.baseline:
                with load_baseline(path, n_ctx=n_ctx, n_threads=threads, n_batch=args.batch_size) as m:
                    base = run_bench(m, args.n_prompt, min(args.n_gen, 16), args.repetitions)
                print(format_table(f"numpy baseline {qtype}", size, params, threads, base))
                for ours, theirs in zip(results, base):
                    print(f"{ours.test}: qf / numpy = {statistics.median(ours.tps) / statistics.median(theirs.tps):.1f}x")
                print()


if __name__ == "__main__":
    main()
