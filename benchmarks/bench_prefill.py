"""Prefill (prompt processing) speed: the integer path (8-bit activations, integer dot products) against the
f32 paths it replaced, on whole models, in interleaved rounds.

    python benchmarks/bench_prefill.py                          # SmolLM2 Q4_0, Q8_0, Q4_K_M, Q6_K; pp512, 2 threads
    python benchmarks/bench_prefill.py --types Q4_0 -p 128 --rounds 7 --threads 1
    python benchmarks/bench_prefill.py --gguf gemma-3-270m-q4_k_m.gguf
    python benchmarks/bench_prefill.py --parts 1          # ggml's Q8_0 activations (llama.cpp's precision)

Each round times ppN once per model and path: "int8" (the default from cpu.INT8_MIN_TOKENS on) and "f32"
(the same model with INT8_MIN_TOKENS = None: decoded tiles + BLAS from BLAS_MIN_TOKENS, the fused kernel
below), A B A B ..., and the table gives the median tokens/s of each side and the median of the per-round
ratios: on a shared machine, load that drifts over minutes hits both sides of each ratio alike.
--kernels adds a table of the matrix-product shapes alone (each path's fastest call), per type.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench_runtime import model_file  # noqa: E402

PATHS = ("int8", "f32")


def set_path(name: str, default_min: int | None) -> None:
    """Select a prefill path for the following matmuls (int8: the module default; f32: int8 off)."""
    from qf.runtime.kernels import cpu

    cpu.INT8_MIN_TOKENS = default_min if name == "int8" else None


def time_prefill(model, ids: list[int]) -> float:
    """Seconds to evaluate ids from an empty cache (logits of the last token only, as llama-bench)."""
    from qf.tools.qbench import time_prompt

    return time_prompt(model.engine, ids)


def run_models(paths: dict[str, Path], n_prompt: int, rounds: int, threads: int) -> None:
    """Interleaved rounds over every model and path; prints a markdown table."""
    from qf.runtime import Model
    from qf.runtime.kernels import cpu

    default_min = cpu.INT8_MIN_TOKENS
    if default_min is None:
        print(f"no native integer dot product on this host (ISA {cpu.ISA.name}): int8 is not the default")
        default_min = 1
    rng = np.random.default_rng(0)
    models = {k: Model.load(p, n_ctx=max(n_prompt, 64), n_threads=threads, n_batch=n_prompt) for k, p in paths.items()}
    tps: dict[tuple[str, str], list[float]] = {}
    try:
        ids = {k: rng.integers(0, m.n_vocab, size=n_prompt).tolist() for k, m in models.items()}
        for k, m in models.items():
            for path in PATHS:  # warm-up: compiles every kernel, faults the weights in
                set_path(path, default_min)
                time_prefill(m, ids[k])
        for _ in range(rounds):
            for k, m in models.items():
                for path in PATHS:
                    set_path(path, default_min)
                    tps.setdefault((k, path), []).append(n_prompt / time_prefill(m, ids[k]))
    finally:
        set_path("int8", default_min)
        for m in models.values():
            m.close()
    print(f"\npp{n_prompt}, {threads} threads, {rounds} interleaved rounds, integer dot: {cpu.ISA.name}, "
          f"{cpu.INT8_PARTS} part(s)\n")
    print("| model | int8 t/s | f32 t/s | int8 / f32 (median of rounds) | min - max |\n|---|---|---|---|---|")
    for k in models:
        a, b = tps[(k, "int8")], tps[(k, "f32")]
        r = [x / y for x, y in zip(a, b)]
        print(f"| {k} | {statistics.median(a):.0f} | {statistics.median(b):.0f} | {statistics.median(r):.2f}x | "
              f"{min(r):.2f} - {max(r):.2f} |")


KERNEL_SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))  # SmolLM2 (n_out, n_in)


def best_call(fn, reps: int = 5) -> float:
    """Fastest of reps calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_kernels(types: list[str], n_tok: int, rounds: int) -> None:
    """GFLOP/s of one matmul per shape: int8 (quantization included), tiles + BLAS, fused; interleaved."""
    from qf.format.ggml_types import GGMLType, block_size
    from qf.quant.codecs import get_codec
    from qf.runtime.kernels import cpu

    rng = np.random.default_rng(1)
    print(f"\nmatmul M={n_tok}, {cpu.get_threads()} threads, GFLOP/s (best call, {rounds} interleaved rounds)\n")
    print("| type | n_out x n_in | int8 | tiles+BLAS | fused | int8 / best f32 |\n|---|---|---|---|---|---|")
    for name in types:
        t = GGMLType[name]
        for n_out, n_in in KERNEL_SHAPES:
            n_in = -(-n_in // block_size(t)) * block_size(t)
            data = get_codec(t).quantize((rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32))
            w = cpu.QMatrix(t, data, n_in, n_out)
            x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
            out = np.empty((n_tok, n_out), np.float32)
            calls = {"int8": lambda: cpu.matmul(w, x, out, int8=True),
                     "tiles": lambda: cpu.matmul(w, x, out, blas=True, int8=False),
                     "fused": lambda: cpu.matmul(w, x, out, blas=False)}
            best = {k: float("inf") for k in calls}
            for _ in range(rounds):
                for k, fn in calls.items():
                    best[k] = min(best[k], best_call(fn))
            gf = {k: 2.0 * n_tok * n_in * n_out / v / 1e9 for k, v in best.items()}
            print(f"| {name} | {n_out}x{n_in} | {gf['int8']:.0f} | {gf['tiles']:.0f} | {gf['fused']:.0f} | "
                  f"{gf['int8'] / max(gf['tiles'], gf['fused']):.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_K_M,Q6_K", help="SmolLM2 file types (comma-separated)")
    ap.add_argument("--gguf", action="append", default=[], help="also run this model file (repeatable)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", type=int, choices=(1, 2), help="8-bit parts per activation (default: cpu.INT8_PARTS)")
    ap.add_argument("--kernels", action="store_true", help="also time the matmul shapes alone")
    ap.add_argument("--kernel-types", default="Q4_0,Q8_0,Q5_0,Q4_K,Q6_K")
    args = ap.parse_args()
    from qf.runtime.kernels import cpu

    cpu.set_threads(args.threads)
    if args.parts:
        cpu.INT8_PARTS = args.parts
    if args.kernels:
        run_kernels([t.strip() for t in args.kernel_types.split(",") if t.strip()], args.n_prompt, args.rounds)
    paths = {f"SmolLM2 {t.strip()}": model_file(t.strip()) for t in args.types.split(",") if t.strip()}
    paths.update({Path(g).name: Path(g) for g in args.gguf})
    if paths:
        run_models(paths, args.n_prompt, args.rounds, args.threads)


if __name__ == "__main__":
    main()
