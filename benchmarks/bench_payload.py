"""Decode speed of native payloads against the ggml type that holds the same grid, on one model's linear shapes.

    python benchmarks/bench_payload.py                 # SmolLM2-135M's layer, 2 threads, 15 rounds
    python benchmarks/bench_payload.py --rounds 30 --threads 1
    python benchmarks/bench_payload.py --threads 1 --cpu-time --reps 100   # on a loaded machine

Pairs (same weights on both sides where the grid allows):
  int W4 g64 sym payload  vs  Q4_0 (the payload transcoded exactly: fp16 scales)
  int W4 g64 asym payload vs  Q4_0 of the same shape
  fp8 channel payload     vs  Q8_0 (the fp8 weights requantized)
  fp8 block 128x128       vs  Q8_0
  fp8 channel, random bytes vs Q8_0 (the worst case: every row holds subnormal bytes, the f16 decode)
The fp8 weights are Gaussian, cast to e4m3 by torch after dividing by their channel's or block's absmax / 448
(as checkpoints are made: about 6% of the rows then hold a subnormal byte; llm-compressor's SmolLM2 FP8
checkpoints have 0.2% (channel) and 3% (block)), except in the random-bytes pair.
  int W4 g64 act-order    vs  the same payload without a group index (what sorting inputs by group costs)
One "token" is one matvec through every linear of a decoder layer (q, k, v, o, gate, up, down), as decode
runs them, through CpuBackend.linear. Rounds interleave the two sides and the table gives the median of the
per-round ratios (load that drifts on a shared machine hits both sides of a round alike).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import numpy as np

LAYER_SHAPES = {"smollm2-135m": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
                "llama-1b": [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048),
                             (2048, 8192)]}  # (n_out, n_in)


def _payload(scheme: str, arrays: dict[str, np.ndarray], n_in: int, n_out: int) -> Any:
    """A PayloadRef over in-memory members."""
    from qf.quant.formats import PayloadDecl, format_of
    from qf.runtime.weights import PayloadRef

    fmt, p = format_of(scheme)
    decl = PayloadDecl("w.weight", fmt.scheme(p), fmt, p, {k: k for k in arrays}, n_in, n_out)
    return PayloadRef("w.weight", decl, arrays, n_out)


def _int4(n_out: int, n_in: int, sym: bool, rng: np.random.Generator) -> tuple[Any, Any]:
    """(W4 g64 payload, Q4_0 TensorRef) of one shape; the same weights when symmetric."""
    from qf.format.ggml_types import GGMLType
    from qf.quant.formats.transcode import RULES, encode_rows
    from qf.runtime.weights import TensorRef

    scheme = f"int;bits=4;group=64;sym={int(sym)};g_idx=0"
    a = {"weight_packed": rng.integers(-2**31, 2**31, (n_out, n_in // 8), dtype=np.int64).astype(np.int32),
         "weight_scale": (rng.random((n_out, n_in // 64)) * 0.01 + 1e-3).astype(np.float16)}
    if not sym:
        a["weight_zero"] = rng.integers(0, 16, (n_out, n_in // 64)).astype(np.int16)
    q = encode_rows(RULES[0], scheme.replace("sym=0", "sym=1"), a, n_in)
    return _payload(scheme, a, n_in, n_out), TensorRef("w.weight", GGMLType.Q4_0, (n_in, n_out), q)


def _int4_actorder(n_out: int, n_in: int, rng: np.random.Generator) -> tuple[Any, Any]:
    """(W4 g64 sym payload with a GPTQ act-order group index, the same codes and scales without one)."""
    a = {"weight_packed": rng.integers(-2**31, 2**31, (n_out, n_in // 8), dtype=np.int64).astype(np.int32),
         "weight_scale": (rng.random((n_out, n_in // 64)) * 0.01 + 1e-3).astype(np.float16)}
    plain = _payload("int;bits=4;group=64;sym=1;g_idx=0", a, n_in, n_out)
    g = {**a, "weight_g_idx": (rng.permutation(n_in) // 64).astype(np.int32)}
    return _payload("int;bits=4;group=64;sym=1;g_idx=1", g, n_in, n_out), plain


def _fp8_bytes(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """e4m3fn bytes of w / s (s broadcast over w), rounded by torch's float8_e4m3fn cast as checkpoints are."""
    import torch

    q = torch.from_numpy(np.clip(w / s, -448.0, 448.0).astype(np.float32)).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).numpy()


def _fp8(n_out: int, n_in: int, block: bool, rng: np.random.Generator, random_bytes: bool = False) -> tuple[Any, Any]:
    """(fp8 payload, Q8_0 TensorRef of its dequantized weights) of one shape: Gaussian weights scaled by their
    channel's or 128x128 block's absmax / 448 (a few rows then hold subnormal bytes, as checkpoints do), or
    uniformly random bytes (every row holds subnormals: the f16 decode)."""
    from qf.format.ggml_types import GGMLType
    from qf.quant.codecs import get_codec
    from qf.runtime.weights import TensorRef

    scheme = "fp8;scale=block;block=128x128" if block else "fp8;scale=channel"
    shape = (-(-n_out // 128), -(-n_in // 128)) if block else (n_out, 1)
    if random_bytes:
        v = rng.integers(0, 256, (n_out, n_in), dtype=np.int64).astype(np.uint8)
        v[(v & 0x7F) == 0x7F] = 0  # no NaN patterns
        s = (rng.random(shape) * 0.01 + 1e-3).astype(np.float32)
    else:
        w = rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.02
        if block:
            pad = np.zeros((shape[0] * 128, shape[1] * 128), np.float32)
            pad[:n_out, :n_in] = np.abs(w)
            s = (pad.reshape(shape[0], 128, shape[1], 128).max((1, 3)) / 448.0).astype(np.float32)
            full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:n_out, :n_in]
        else:
            s = (np.abs(w).max(1, keepdims=True) / 448.0).astype(np.float32)
            full = s
        v = _fp8_bytes(w, full)
    a = {"weight_fp8": v.view(np.int8), "weight_scale": s}
    ref = _payload(scheme, a, n_in, n_out)
    q = get_codec(GGMLType.Q8_0).quantize(ref.dequantize())
    return ref, TensorRef("w.weight", GGMLType.Q8_0, (n_in, n_out), q)


PAIRS: dict[str, tuple[str, str, Callable[..., tuple[Any, Any]]]] = {
    "int4 g64 sym": ("payload W4 g64 sym", "Q4_0", lambda o, i, r: _int4(o, i, True, r)),
    "int4 g64 asym": ("payload W4 g64 asym", "Q4_0", lambda o, i, r: _int4(o, i, False, r)),
    "int4 g64 act-order": ("payload W4 g64 act-order", "W4 g64 payload", lambda o, i, r: _int4_actorder(o, i, r)),
    "fp8 channel": ("payload FP8 channel", "Q8_0", lambda o, i, r: _fp8(o, i, False, r)),
    "fp8 block": ("payload FP8 block 128", "Q8_0", lambda o, i, r: _fp8(o, i, True, r)),
    "fp8 channel random bytes": ("payload FP8 channel, random bytes", "Q8_0",
                                 lambda o, i, r: _fp8(o, i, False, r, True)),
}


def _token(backend: Any, mats: list[Any], xs: list[np.ndarray]) -> float:
    """Seconds for one matvec through every matrix."""
    t0 = time.perf_counter()
    for m, x in zip(mats, xs):
        backend.linear(m, x)
    return time.perf_counter() - t0


def _best(backend: Any, mats: list[Any], xs: list[np.ndarray], reps: int, cpu: bool = False) -> float:
    """Fastest of reps tokens (wall clock), or with cpu the process CPU seconds of reps tokens over reps."""
    if not cpu:
        return min(_token(backend, mats, xs) for _ in range(reps))
    t0 = time.process_time()
    for _ in range(reps):
        _token(backend, mats, xs)
    return (time.process_time() - t0) / reps


def main() -> None:
    """Parse arguments, run the interleaved rounds, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(LAYER_SHAPES), default="smollm2-135m")
    ap.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=list(PAIRS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=20, help="tokens per side per round (the fastest counts)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU seconds (mean of the reps tokens) instead of the fastest wall time: "
                    "steadier on a loaded machine with --threads 1 (idle OpenMP workers spin, so not with more)")
    args = ap.parse_args()
    import numba

    from qf.runtime.backend import CpuBackend

    numba.set_num_threads(args.threads)
    be, rng = CpuBackend(), np.random.default_rng(0)
    shapes = LAYER_SHAPES[args.model]
    xs = [rng.standard_normal((1, i)).astype(np.float32) for _, i in shapes]
    print(f"{args.model} layer ({len(shapes)} linears), {args.threads} threads, {args.rounds} rounds: "
          "us per layer-token (median of rounds), payload / baseline speed ratio (median of per-round ratios)")
    print("| payload | us | baseline | us | speed vs baseline | rounds min-max |")
    print("|---|---|---|---|---|---|")
    for key in args.pairs:
        pname, gname, make = PAIRS[key]
        built = [make(o, i, rng) for o, i in shapes]
        pm, gm = [be.matrix(p) for p, _ in built], [be.matrix(g) for _, g in built]
        _best(be, pm, xs, args.reps), _best(be, gm, xs, args.reps)  # compile, warm the threads
        tp, tg, ratio = [], [], []
        for _ in range(args.rounds):
            a, b = _best(be, pm, xs, args.reps, args.cpu_time), _best(be, gm, xs, args.reps, args.cpu_time)
            tp.append(a), tg.append(b), ratio.append(b / a)
        print(f"| {pname} | {statistics.median(tp) * 1e6:.0f} | {gname} | {statistics.median(tg) * 1e6:.0f} | "
              f"{statistics.median(ratio):.2f}x | {min(ratio):.2f}-{max(ratio):.2f} |")


if __name__ == "__main__":
    main()
