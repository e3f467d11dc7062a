"""Several sessions on one loaded model: aggregate decode tokens/s against one session, and the time to first
token of a new request while others decode. SmolLM2-135M (Q4_0 by default, made as bench_runtime.py does).

    python benchmarks/bench_sessions.py [--type Q4_0] [--threads 2] [--sessions 1,2,4,8] [-n 64] [-r 3]

Each round runs every session count once (1, 2, 4, ... interleaved, so that drifting machine load hits
all alike) on one model loaded with n_seq = the largest count: B greedy generations of -n tokens each are
queued together, and "aggregate" is B * n / the wall time from the first decode step to the last token
(prompts are evaluated before the timer starts). The table gives medians over rounds and each count's
ratio to one session, taken per round. Then, for TTFT, 3 sessions decode while a 4th request with a
128-token prompt arrives: its time to first token, against the same request on an idle model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from bench_runtime import model_file

PROMPTS = ["The capital of France is", "List three colours:", "def fibonacci(n):",
           "Once upon a time, in a small village,", "The best way to learn a language is",
           "Water boils at", "My favourite book is", "In 1969, the first"]


def decode_round(model: Any, b: int, n_gen: int) -> float:
    """Aggregate decode tokens/s of b greedy sessions of n_gen tokens each, decoded together: the decode rows
    the scheduler evaluated from the moment every session had its first token until the last one ended."""
    sched = model.scheduler
    with sched.paused():
        gens = [model.generate(PROMPTS[i % len(PROMPTS)], max_tokens=n_gen, temperature=0).start() for i in range(b)]
    while not all(g.tokens or g.done for g in gens):
        time.sleep(0.0005)
    n0, t0 = sched.n_decoded, time.perf_counter()
    for g in gens:
        g.wait()
    return (sched.n_decoded - n0) / (time.perf_counter() - t0)


def ttft(model: Any, prompt_ids: list[int], busy: int, n_gen: int) -> float:
    """Seconds from a new request to its first text while `busy` other sessions decode."""
    others = [model.generate(PROMPTS[i], max_tokens=n_gen * 4, temperature=0).start() for i in range(busy)]
    for g in others:
        next(g)  # all decoding
    t0 = time.perf_counter()
    g = model.generate(prompt_ids, max_tokens=4, temperature=0)
    next(g)
    dt = time.perf_counter() - t0
    g.cancel()
    for o in others:
        o.cancel()
        o.wait()
    g.wait()
    return dt


def long_prompt(model: Any, seed: int) -> list[int]:
    """128 tokens of text that no earlier prompt shares beyond its first token."""
    words = ["river", "stone", "lamp", "orbit", "maple", "copper", "signal", "harbor", "velvet", "quartz"]
    text = f"Note {seed}: " + " ".join(words[(seed * 7 + i * 3) % len(words)] for i in range(400))
    return model.tokenize(text)[:128]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sessions", default="1,2,4,8")
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    args = ap.parse_args()
    from qf.runtime import Model

    counts = [int(x) for x in args.sessions.split(",")]
    path: Path = model_file(args.type)
    with Model.load(path, n_ctx=512, n_threads=args.threads, n_seq=max(max(counts), 4)) as m:
        decode_round(m, max(counts), 8)  # warm-up: compiles the batched kernels
        tps: dict[int, list[float]] = {b: [] for b in counts}
        ratios: dict[int, list[float]] = {b: [] for b in counts}
        for _ in range(args.rounds):
            got = {b: decode_round(m, b, args.n_gen) for b in counts}
            for b in counts:
                tps[b].append(got[b])
                ratios[b].append(got[b] / got[counts[0]])
        print(f"{path.name}, {args.threads} threads, {args.n_gen} tokens per session, {args.rounds} rounds\n")
        print("| sessions | aggregate decode tok/s (median) | per session tok/s | vs 1 session (median ratio) |")
        print("|---|---|---|---|")
        for b in counts:
            med = statistics.median(tps[b])
            print(f"| {b} | {med:.1f} | {med / b:.1f} | {statistics.median(ratios[b]):.2f}x |")
        idle, busy = [], []
        for r in range(args.rounds):  # a fresh prompt each time: nothing to reuse from the prompt cache
            idle.append(ttft(m, long_prompt(m, 2 * r), 0, args.n_gen))
            busy.append(ttft(m, long_prompt(m, 2 * r + 1), 3, args.n_gen))
        print(f"\nTTFT of a 128-token prompt: idle model {statistics.median(idle) * 1000:.0f} ms, "
              f"while 3 sessions decode {statistics.median(busy) * 1000:.0f} ms (medians of {args.rounds})")


if __name__ == "__main__":
    main()
