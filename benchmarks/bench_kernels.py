"""CPU kernel throughput: matvec (decode) GB/s and us per call, matmul (prefill) GFLOP/s, vs numpy baselines.

    python benchmarks/bench_kernels.py                      # all supported types, 2 threads
    python benchmarks/bench_kernels.py --types Q4_0 Q8_0 --threads 1 --compile

Shapes are SmolLM2-135M's: ffn_down 576x1536, ffn_up 1536x576 and the output head 49152x576 (n_out x n_in);
for the K-quants (256-element blocks) n_in 576 becomes 768.
The prefill table times the matmul paths: "fused" (blocks decoded in registers, blas=False), "tiles"
(rows decoded into an f32 tile, then BLAS sgemm per thread; float types from M >= BLAS_MIN_TOKENS) and
"int8" (activations quantized per call, integer dot products; quantized types from M >= INT8_MIN_TOKENS) and
"amx" (AMX-BF16 tiles, kernels/cpu_amx_bf16.py: hosts that have them, from M >= its MIN_TOKENS, else nan).
Baselines run in the same process on the same data: "np deq+mv" dequantizes with the codec and multiplies
on every call (what a runtime without fused kernels does), "np f32" multiplies pre-dequantized f32 weights
(BLAS; 4 bytes per weight). Timings are the fastest single call of many; on a shared machine compare ratios.
`--compile` also times the first call of one type's kernels with a cold and with a warm numba cache
(each in a fresh interpreter, the cold one with an empty NUMBA_CACHE_DIR).

`--paired BASE` (e.g. Q4_K) instead times matvec of each type against BASE in interleaved rounds on the same
shapes (256-aligned), with weights of random valid bytes (normal f16 scales; no quantizer needed, so the
IQ types that need an importance matrix are covered) and prints the median per-round speed ratio
(BASE time / type time: >= 1 means the type decodes a matrix at least as fast as BASE):

    python benchmarks/bench_kernels.py --paired Q4_K --types IQ4_XS IQ3_S IQ2_XS --rounds 7
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

MATVEC_SHAPES = ((576, 1536), (1536, 576), (49152, 576))  # (n_out, n_in)
PREFILL_SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))
PREFILL_M = (128, 256)


def best_time(fn: Callable[[], object], budget: float = 0.25, min_calls: int = 3) -> float:
    """Fastest single call, over as many calls as fit in `budget` seconds (at least min_calls).

    The minimum, not the mean: on a shared machine a call that lost its core says nothing about the kernel.
    """
    fn()
    best = float("inf")
    calls = 0
    t_end = time.perf_counter() + budget
    while calls < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


def fit_shape(t, n_out: int, n_in: int) -> tuple[int, int]:
    """(n_out, n_in) with n_in rounded up to whole blocks of t (576 -> 768 for the K-quants)."""
    from qf.format.ggml_types import block_size

    bs = block_size(t)
    return n_out, -(-n_in // bs) * bs


def make_weight(t, n_out: int, n_in: int, rng: np.random.Generator):
    """Random weight quantized with the codec: (packed u8 [n_out, row_bytes], f32 dequantized)."""
    from qf.quant.codecs import get_codec

    codec = get_codec(t)
    w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32)
    data = codec.quantize(w)
    return data, codec.dequantize(data)


def bench_matvec(types, rng) -> None:
    """Table: per type and shape, kernel us / GB/s and the two numpy baselines."""
    from qf.quant.codecs import get_codec
    from qf.runtime.kernels import cpu

    print(f"\nmatvec (decode), {cpu.get_threads()} threads; GB/s = packed weight bytes / time")
    print(f"{'type':6} {'n_out x n_in':>12} {'MB':>6} {'kernel us':>10} {'GB/s':>6} "
          f"{'np deq+mv us':>13} {'np f32 us':>10} {'x deq+mv':>9} {'x f32':>7}")
    for t in types:
        for n_out, n_in in (fit_shape(t, *s) for s in MATVEC_SHAPES):
            data, wf = make_weight(t, n_out, n_in, rng)
            w = cpu.QMatrix(t, data, n_in, n_out)
            x = rng.standard_normal(n_in).astype(np.float32)
            out = np.empty(n_out, np.float32)
            tk = best_time(lambda: cpu.matvec(w, x, out))
            codec = get_codec(t)
            tn = best_time(lambda: codec.dequantize(data) @ x, budget=0.1)
            tf = best_time(lambda: wf @ x)
            print(f"{t.name:6} {f'{n_out}x{n_in}':>12} {data.nbytes / 1e6:6.2f} {tk * 1e6:10.1f} "
                  f"{data.nbytes / tk / 1e9:6.2f} {tn * 1e6:13.0f} {tf * 1e6:10.1f} {tn / tk:9.1f} {tf / tk:7.2f}")


def bench_matmul(types, rng) -> None:
    """Table: prefill GFLOP/s per M, fused kernel and decoded tiles + BLAS vs numpy dequantize+matmul, f32 BLAS."""
    from qf.quant.codecs import get_codec
    from qf.runtime.kernels import cpu

    print(f"\nmatmul (prefill), {cpu.get_threads()} threads; GFLOP/s = 2*M*n_in*n_out / time "
          f"(auto path: tiles from M={cpu.BLAS_MIN_TOKENS})")
    print(f"{'type':6} {'n_out x n_in':>12} {'M':>4} {'fused GF':>9} {'tiles GF':>9} {'int8 GF':>8} {'np deq+mm':>10} "
          f"{'np f32':>8} {'tiles/fused':>12} {'int8/tiles':>11} {'x f32':>7} {'amx GF':>8} {'amx/int8':>9}")
    for t in types:
        for n_out, n_in in (fit_shape(t, *s) for s in PREFILL_SHAPES):
            data, wf = make_weight(t, n_out, n_in, rng)
            w = cpu.QMatrix(t, data, n_in, n_out)
            codec = get_codec(t)
            for m in PREFILL_M:
                x = rng.standard_normal((m, n_in)).astype(np.float32)
                out = np.empty((m, n_out), np.float32)
                flop = 2.0 * m * n_in * n_out
                tk = best_time(lambda: cpu.matmul(w, x, out, blas=False))
                tt = best_time(lambda: cpu.matmul(w, x, out, blas=True, int8=False))
                has_int8 = t in cpu.int8_types()
                ti = best_time(lambda: cpu.matmul(w, x, out, int8=True)) if has_int8 else float("nan")
                has_amx = cpu.tiles_bf16(w, m)
                ta = best_time(lambda: cpu.matmul(w, x, out)) if has_amx else float("nan")  # default path: tiles
                tn = best_time(lambda: x @ codec.dequantize(data).T, budget=0.1)
                tf = best_time(lambda: x @ wf.T)
                print(f"{t.name:6} {f'{n_out}x{n_in}':>12} {m:4} {flop / tk / 1e9:9.1f} {flop / tt / 1e9:9.1f} "
                      f"{flop / ti / 1e9:8.1f} {flop / tn / 1e9:10.1f} {flop / tf / 1e9:8.1f} {tk / tt:12.2f} "
                      f"{tt / ti:11.2f} {tf / tt:7.2f} {flop / ta / 1e9:8.1f} {ti / ta:9.2f}")


def random_weight(t, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Packed rows u8 [n_out, row_bytes] of random valid bytes with normal f16 scales (no NaN, no subnormals)."""
    from qf.runtime.kernels.torch_dequant import random_packed

    return random_packed(t, n_out, n_in, rng)


def bench_paired(base, types, rng, rounds: int) -> None:
    """Table: matvec us per type and shape, and the median over interleaved rounds of t(base) / t(type)."""
    from qf.runtime.kernels import cpu

    print(f"\nmatvec (decode) paired with {base.name}, {cpu.get_threads()} threads, {rounds} interleaved rounds; "
          f"ratio = {base.name} time / type time (median of rounds)")
    print(f"{'type':8} {'n_out x n_in':>12} {'MB':>6} {'us':>8} {'GB/s':>6} {base.name + ' us':>9} {'ratio':>6}")
    for n_out, n_in in ((576, 1536), (1536, 768), (49152, 768)):
        x = rng.standard_normal(n_in).astype(np.float32)
        mats = {t: cpu.QMatrix(t, random_weight(t, n_out, n_in, rng), n_in, n_out) for t in [base, *types]}
        out = np.empty(n_out, np.float32)
        times: dict = {t: [] for t in mats}
        for _ in range(rounds):
            for t, w in mats.items():
                times[t].append(best_time(lambda: cpu.matvec(w, x, out), budget=0.05))
        tb = np.array(times[base])
        for t in types:
            tt = np.array(times[t])
            nbytes = mats[t].data.nbytes
            print(f"{t.name:8} {f'{n_out}x{n_in}':>12} {nbytes / 1e6:6.2f} {np.median(tt) * 1e6:8.1f} "
                  f"{nbytes / np.median(tt) / 1e9:6.2f} {np.median(tb) * 1e6:9.1f} {np.median(tb / tt):6.2f}")


_FIRST_CALL = """
import time, numpy as np
t0 = time.perf_counter()
from qf.runtime.kernels import cpu
from qf.format.ggml_types import GGMLType, row_bytes
t = GGMLType[{name!r}]
w = cpu.QMatrix(t, np.zeros((64, row_bytes(t, 256)), np.uint8), 256, 64)
t1 = time.perf_counter()
cpu.matvec(w, np.ones(256, np.float32)); t2 = time.perf_counter()
cpu.matmul(w, np.ones((5, 256), np.float32)); t3 = time.perf_counter()
cpu.get_rows(w, np.arange(3)); t4 = time.perf_counter()
print(f"{{t1 - t0:.2f}} {{t2 - t1:.2f}} {{t3 - t2:.2f}} {{t4 - t3:.2f}}")
"""


def bench_compile(type_name: str) -> None:
    """First-call seconds (import, matvec, matmul, get_rows) with a cold, then a warm numba cache."""
    print(f"\nfirst call of the {type_name} kernels (fresh interpreter each): import / matvec / matmul / get_rows s")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold cache", "warm cache"):
            res = subprocess.run([sys.executable, "-c", _FIRST_CALL.format(name=type_name)], env=env,
                                 capture_output=True, text=True, check=True)
            print(f"  {label}: {res.stdout.strip()}")


def main(argv: list[str] | None = None) -> None:
    """Parse options, run the tables."""
    from qf.format.ggml_types import GGMLType
    from qf.runtime.kernels import cpu

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", help="ggml type names (default: all supported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-matmul", action="store_true", help="skip the prefill table")
    ap.add_argument("--paired", metavar="BASE", help="only the interleaved matvec table against BASE (e.g. Q4_K)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of --paired")
    ap.add_argument("--compile", metavar="TYPE", nargs="?", const="Q4_0",
                    help="also time cold/warm-cache first calls for TYPE (default Q4_0)")
    a = ap.parse_args(argv)
    types = [GGMLType[n] for n in a.types] if a.types else cpu.supported_types()
    cpu.set_threads(a.threads)
    rng = np.random.default_rng(0)
    if a.paired:
        bench_paired(GGMLType[a.paired], [t for t in types if t != GGMLType[a.paired]], rng, a.rounds)
        return
    bench_matvec(types, rng)
    if not a.no_matmul:
        bench_matmul(types, rng)
    if a.compile:
        bench_compile(a.compile)


if __name__ == "__main__":
    main()
