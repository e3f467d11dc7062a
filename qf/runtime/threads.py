"""Decode thread count chosen by measurement: all cores, or half of them when another process holds one.

The CPU kernels are fork-join: every matrix product waits for its slowest thread. When another process
keeps a core busy, the thread sharing it is descheduled for whole time slices and each of a decode
step's ~200 barriers waits for it: SmolLM2 Q4_0 decoded at 28 tok/s on 2 threads against 75 on 1 with
one core busy (and 110-125 on 2 when quiet). So when the thread count was not pinned by the user, decode
steps alternate between the candidates until each has a few timings, then run the faster one and time
the other again every `probe_every` steps (load comes and goes on a desktop).
"""

from __future__ import annotations

import statistics
from collections import deque

SAMPLES = 3  # recent step times kept per candidate; their median is its estimate
PROBE_EVERY = 64  # steps between timings of a candidate that is not the current best


class DecodeThreads:
    """Chooses between n and n // 2 threads for each decode step from recent step times."""

    def __init__(self, n: int, probe_every: int = PROBE_EVERY) -> None:
        self.candidates = (n,) if n <= 1 else (n, max(1, n // 2))
        self.probe_every = probe_every
        self.times: dict[int, deque[float]] = {c: deque(maxlen=SAMPLES) for c in self.candidates}
        self.steps = 0

    def estimate(self, n: int) -> float:
        """Median recent seconds per step with n threads (inf before the first timing)."""
        t = self.times[n]
        return statistics.median(t) if t else float("inf")

    @property
    def best(self) -> int:
        """The candidate with the lowest estimate (the first one until both are timed)."""
        return min(self.candidates, key=self.estimate)

    def choose(self) -> int:
        """Thread count for the next decode step."""
        self.steps += 1
        short = [c for c in self.candidates if len(self.times[c]) < 2]
        if short:  # warming up: alternate until every candidate has two timings
            return short[self.steps % len(short)]
        if self.steps % self.probe_every == 0:
            others = [c for c in self.candidates if c != self.best]
            return others[(self.steps // self.probe_every) % len(others)]
        return self.best

    def reset(self) -> None:
        """Forget every timing (e.g. those of a warm-up, which include compiling and paging in)."""
        for t in self.times.values():
            t.clear()
        self.steps = 0

    def record(self, n: int, seconds: float) -> None:
        """Time of a step that ran with n threads."""
        self.times[n].append(seconds)
