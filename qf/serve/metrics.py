"""Prometheus text metrics of a qserve process: requests, tokens, queue depth, decode speed."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

PREFIX = "qf"


class Metrics:
    """Counters updated by the request handlers (thread-safe), rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (path, status) -> count
        self.request_seconds: dict[str, float] = defaultdict(float)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generations_started = 0
        self.generations_finished: dict[str, int] = defaultdict(int)  # finish reason -> count
        self.t_start = time.time()
        self._last = (time.perf_counter(), 0)  # for the recent tokens/s gauge

    def request(self, path: str, status: int, seconds: float) -> None:
        """One HTTP request answered."""
        with self._lock:
            self.requests[(path, status)] += 1
            self.request_seconds[path] += seconds

    def started(self, n_prompt: int) -> None:
        """A generation was queued."""
        with self._lock:
            self.generations_started += 1
            self.prompt_tokens += n_prompt

    def finished(self, gen: Any) -> None:
        """A generation ended (or its client went away)."""
        with self._lock:
            self.generated_tokens += len(gen.tokens)
            self.generations_finished[str(gen.finish_reason or "cancelled")] += 1

    def _decode_rate(self, n_decoded: int) -> float:
        """Decode rows per second since the previous scrape."""
        now = time.perf_counter()
        t, n = self._last
        self._last = (now, n_decoded)
        return (n_decoded - n) / (now - t) if now > t else 0.0

    def render(self, model: Any) -> str:
        """The exposition text."""
        sch = model.scheduler
        with self._lock:
            lines = [f"# HELP {PREFIX}_requests_total HTTP requests by path and status.",
                     f"# TYPE {PREFIX}_requests_total counter"]
            lines += [f'{PREFIX}_requests_total{{path="{p}",status="{s}"}} {n}'
                      for (p, s), n in sorted(self.requests.items())]
            lines += [f"# TYPE {PREFIX}_request_seconds_total counter"]
            lines += [f'{PREFIX}_request_seconds_total{{path="{p}"}} {v:.6f}' for p, v in sorted(self.request_seconds.items())]
            lines += _counter("prompt_tokens_total", "Prompt tokens of queued generations.", self.prompt_tokens)
            lines += _counter("generated_tokens_total", "Tokens generated.", self.generated_tokens)
            lines += _counter("generations_started_total", "Generations queued.", self.generations_started)
            lines += [f"# TYPE {PREFIX}_generations_finished_total counter"]
            lines += [f'{PREFIX}_generations_finished_total{{reason="{r}"}} {n}'
                      for r, n in sorted(self.generations_finished.items())]
            lines += _gauge("queue_depth", "Requests waiting for a KV slot.", sch.n_waiting)
            lines += _gauge("slots_busy", "KV slots running a generation.", sch.n_running)
            lines += _gauge("slots_total", "KV slots (parallel generations).", model.n_seq)
            lines += _counter("decode_steps_total", "Batched decode forward passes.", sch.n_decode_steps)
            lines += _counter("decoded_tokens_total", "Tokens evaluated by decode passes.", sch.n_decoded)
            lines += _gauge("decode_tokens_per_second", "Decode rows per second since the last scrape.",
                            round(self._decode_rate(sch.n_decoded), 3))
            lines += _gauge("uptime_seconds", "Seconds since the server started.", round(time.time() - self.t_start, 3))
        return "\n".join(lines) + "\n"


def _counter(name: str, help_: str, value: float) -> list[str]:
    """A counter's lines."""
    return [f"# HELP {PREFIX}_{name} {help_}", f"# TYPE {PREFIX}_{name} counter", f"{PREFIX}_{name} {value}"]


def _gauge(name: str, help_: str, value: float) -> list[str]:
    """A gauge's lines."""
    return [f"# HELP {PREFIX}_{name} {help_}", f"# TYPE {PREFIX}_{name} gauge", f"{PREFIX}_{name} {value}"]
