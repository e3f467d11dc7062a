"""Where a prefill batch and a decode step spend their time: per backend operation, wall and process CPU.

    python benchmarks/bench_step_profile.py ~/.cache/qf/bench/smollm2-135m-q4_0.qf --repack -p 512 -n 128

Every CpuBackend method a block calls (linear / linears by role, rms_norm, rope, swiglu, add_, embed) and the
KV cache's store / attend are wrapped in timers; the rest of the step (Python in the blocks, the engine,
the sampler-free logits) is "other". Printed per phase (ppN: one prefill of N random ids; tgN: N decode
steps), as ms per phase and share of its wall time, with the process CPU seconds (both threads) beside.
On a shared machine read the shares, not the absolute times.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qf.runtime import Model
from qf.runtime.backend import CpuBackend, CpuKV

WALL: dict[str, float] = defaultdict(float)
CPU: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def cpu_s() -> float:
    """Process CPU seconds (user + system, every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn with its wall and CPU time added to the named bucket (name may be a function of the arguments)."""
    def wrapper(*args: Any, **kw: Any) -> Any:
        key = name(*args, **kw) if callable(name) else name
        w0, c0 = time.perf_counter(), cpu_s()
        try:
            return fn(*args, **kw)
        finally:
            WALL[key] += time.perf_counter() - w0
            CPU[key] += cpu_s() - c0
            CALLS[key] += 1
    return wrapper


def role(n_vocab: int) -> Callable[..., str]:
    """Bucket name of a linear call: output head, FFN down or attention output."""
    def name(self: Any, w: Any, *a: Any, **k: Any) -> str:
        if w.shape[0] == n_vocab:
            return "linear output"
        return "linear down" if w.shape[1] > 2 * w.shape[0] else "linear wo"
    return name


def install(n_vocab: int) -> None:
    """Wrap the backend's and the KV cache's methods (class level)."""
    CpuBackend.linear = timed(role(n_vocab), CpuBackend.linear)
    CpuBackend.linears = timed(lambda self, ws, *a, **k: "linears qkv" if len(ws) == 3 else "linears gate/up",
                               CpuBackend.linears)
    for m in ("rms_norm", "rope", "swiglu", "geglu", "add_", "embed"):
        setattr(CpuBackend, m, timed(m, getattr(CpuBackend, m)))
    for m in ("store", "attend"):
        setattr(CpuKV, m, timed(f"kv {m}", getattr(CpuKV, m)))


def report(phase: str, wall: float, cpu: float) -> None:
    """One phase's table, then reset the buckets."""
    print(f"\n{phase}: wall {wall * 1e3:.1f} ms, process CPU {cpu:.2f} s")
    inner = 0.0
    for k in sorted(WALL, key=WALL.get, reverse=True):
        inner += WALL[k]
        print(f"  {k:18s} {WALL[k] * 1e3:9.1f} ms {100 * WALL[k] / wall:5.1f}%  cpu {CPU[k]:6.2f} s  calls {CALLS[k]}")
    print(f"  {'other':18s} {(wall - inner) * 1e3:9.1f} ms {100 * (wall - inner) / wall:5.1f}%")
    WALL.clear()
    CPU.clear()
    CALLS.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("--repack", action="store_true")
    a = ap.parse_args()
    be = CpuBackend(a.t, repack=a.repack)
    with Model.load(a.model, n_ctx=max(a.p, a.n), n_threads=a.t, cpu_backend=be) as m:
        eng = m.engine
        rng = np.random.default_rng(0)
        eng.prefill(rng.integers(0, m.n_vocab, a.p).tolist())  # warm-up: compiles (the prompt's own kernels), repacks
        eng.cache.clear()
        eng.step(1)
        install(m.n_vocab)
        WALL.clear()
        CPU.clear()
        CALLS.clear()
        eng.cache.clear()
        ids = rng.integers(0, m.n_vocab, a.p).tolist()
        w0, c0 = time.perf_counter(), cpu_s()
        eng.prefill(ids)
        report(f"pp{a.p}", time.perf_counter() - w0, cpu_s() - c0)
        eng.cache.clear()
        eng.bind_threads()
        w0, c0 = time.perf_counter(), cpu_s()
        for t in rng.integers(0, m.n_vocab, a.n).tolist():
            eng.step(t)
        report(f"tg{a.n}", time.perf_counter() - w0, cpu_s() - c0)


if __name__ == "__main__":
    main()
