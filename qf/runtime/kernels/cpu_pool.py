"""Python worker threads for kernels that release the GIL: the calls are long, so a pool's hand-off costs
nothing measurable, and no numba parallel driver has to be compiled (a parfor around a kernel's loops adds
2-4 s of compiling per specialisation to a fresh install)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least n worker threads (grown by replacement, never shrunk)."""
    with _POOL_LOCK:
        if not _POOL or _POOL[0]._max_workers < n:
            old = _POOL[:]
            _POOL[:] = [ThreadPoolExecutor(max_workers=n, thread_name_prefix="qf-kernels")]
            for p in old:
                p.shutdown(wait=False)
        return _POOL[0]


def run_shares(fn: Callable[..., Any], args: tuple, n_par: int) -> None:
    """fn(*args, c, n_par) for c in 0 .. n_par - 1: share 0 in this thread, the others on the pool (fn must
    release the GIL to run in parallel); waits for all and re-raises the first error."""
    if n_par <= 1:
        fn(*args, 0, 1)
        return
    futures = [pool(n_par - 1).submit(fn, *args, c, n_par) for c in range(1, n_par)]
    try:
        fn(*args, 0, n_par)
    finally:
        for f in futures:
            f.result()
