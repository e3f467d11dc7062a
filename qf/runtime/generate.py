"""Generation requests (what `Model.generate` returns) and the low-level Engine over one KV slot.

A `Generation` is a request to the model's scheduler (qf.runtime.scheduler): the scheduler thread
evaluates, samples, detokenizes and applies stop rules; the caller's thread iterates text pieces from the
request's queue. Any number of generations may run at once from any threads (up to the model's KV slots,
the rest wait); each ends with a finish reason: "stop", "length" or "cancelled".
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal, Protocol, Sequence

import numpy as np

from qf.format.errors import ContextOverflowError, QFError
from qf.runtime.arch.llama import Batch
from qf.runtime.kv_cache import KVCache
from qf.runtime.sampler import Sampler, SamplingParams
from qf.runtime.stops import StopFilter
from qf.runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    from qf.runtime.scheduler import Scheduler

FinishReason = Literal["stop", "length", "cancelled"]
__all__ = ["Engine", "FinishReason", "Generation", "GenerationStats", "StopFilter", "TokenLogprob"]
_SEQ = itertools.count()  # arrival order of requests (prompt chunks are served oldest first)
_DONE = object()  # queue sentinel: the request finished


class LogitsConstraint(Protocol):
    """Restricts which tokens may come next (structured output): called in the scheduler's thread."""

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits f32 [n_vocab] with every token the constraint forbids set to -inf (in place or a copy)."""

    def accept(self, token: int) -> None:
        """The token that was sampled (the constraint advances its state)."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the distribution it was sampled from (the model's logits,
    after a structured-output mask, before penalties and temperature), and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """log_softmax(logits)[token] and the k best (token, logprob) pairs."""
    x = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(x)
    m = x[finite].max()
    lse = m + np.log(np.exp(x[finite] - m).sum())
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        idx = np.argpartition(-x, min(k, x.size - 1))[:k]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = tuple((int(i), float(x[i] - lse)) for i in idx)
    return TokenLogprob(int(token), float(x[token] - lse), top)


@dataclass
class GenerationStats:
    """Token counts and timings of one generation."""

    n_prompt: int = 0  # prompt tokens evaluated (excluding those reused from the cache)
    n_cached: int = 0  # prompt tokens whose keys/values were reused
    t_prompt: float = 0.0  # seconds spent on prompt evaluation
    n_gen: int = 0  # tokens generated
    t_gen: float = 0.0  # seconds spent generating (decode forward passes, shared with the batch, and sampling)
    t_queued: float = 0.0  # seconds spent waiting for a free KV slot

    @property
    def prompt_tps(self) -> float:
        """Prompt evaluation speed in tokens/s."""
        return self.n_prompt / self.t_prompt if self.t_prompt > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        """Generation speed in tokens/s."""
        return self.n_gen / self.t_gen if self.t_gen > 0 else 0.0


def check_prompt(n: int, n_ctx: int) -> None:
    """A prompt must be non-empty and fit in the context."""
    if n == 0:
        raise ContextOverflowError("the prompt is empty: nothing to evaluate")
    if n > n_ctx:
        raise ContextOverflowError(f"the prompt has {n} tokens but the context holds {n_ctx} "
                                   f"(load with a larger n_ctx, or shorten the prompt)")


class Generation:
    """One streaming generation: iterate for text pieces; `finish_reason`, `tokens`, `stats` when done.

    It is queued on the model's scheduler at the first iteration; `cancel()` (any thread) ends it at the
    next token with finish reason "cancelled" and frees its KV slot.
    """

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, prompt: Sequence[int], params: SamplingParams,
                 max_tokens: int | None = None, stop: Sequence[str] = (), all_logits: bool = False,
                 constraint: LogitsConstraint | None = None, logprobs: int | None = None) -> None:
        check_prompt(len(prompt), scheduler.cache.n_ctx)
        self.constraint = constraint
        self.n_logprobs = logprobs  # None: not recorded; k: the chosen token's logprob and the k best
        self.logprobs: list[TokenLogprob] = []  # one per generated token, when n_logprobs is not None
        self.n_read = 0  # tokens whose text the caller has iterated past
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.max_tokens = None if max_tokens is None or max_tokens < 0 else int(max_tokens)
        self.stop = list(stop)
        self.all_logits = all_logits
        self.tokens: list[int] = []  # generated ids (end-of-generation token excluded)
        self.finish_reason: FinishReason | None = None
        self.stats = GenerationStats()
        self.seq = next(_SEQ)
        self.slot: int | None = None
        self.decoding = False  # prompt evaluated; next_token waits for its forward pass
        self.next_token = -1
        self._stops = StopFilter(self.stop)
        self._sampler = Sampler(params)
        self._stream = tokenizer.stream()
        self._history = list(self.prompt)
        self._logits: list[np.ndarray] = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._submitted = False
        self._t_submit = 0.0
        self.done = False

    # -- the caller's side ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if not self._submitted and not self.done:
            self._submit()
        if self._queue is None:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._queue = None
            self.n_read = len(self.tokens)
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue = None
            raise item
        text, self.n_read = item
        return text

    def start(self) -> "Generation":
        """Queue on the scheduler now rather than at the first iteration (a no-op once started); returns self."""
        if not self._submitted and not self.done:
            self._submit()
        return self

    def _submit(self) -> None:
        """Queue on the scheduler (once)."""
        self._submitted = True
        self._t_submit = time.perf_counter()
        self.scheduler.submit(self)

    def wait(self) -> "Generation":
        """Run to the end, discarding the text pieces (they stay in `text`); returns self."""
        for _ in self:
            pass
        return self

    def cancel(self) -> None:
        """Ask the scheduler to stop at the next token (safe from any thread)."""
        self._cancel.set()
        if self._submitted:
            self.scheduler.wake()
        elif not self.done:
            self._finish("cancelled")

    def close(self) -> None:
        """Cancel (a generator protocol name: `with closing(gen)` or an abandoned loop)."""
        self.cancel()

    def __del__(self) -> None:
        if not getattr(self, "done", True):
            self._cancel.set()

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was called."""
        return self._cancel.is_set()

    @property
    def text(self) -> str:
        """Everything generated so far, decoded."""
        return self.tokenizer.decode(self.tokens)

    @property
    def logits(self) -> np.ndarray:
        """Logits f32 [len(prompt), n_vocab] of an all-logits request (after it finished)."""
        return np.concatenate(self._logits) if self._logits else np.zeros((0, 0), np.float32)

    # -- the scheduler's side (its thread only) ------------------------------------------------------------
    def _start(self, slot: int, reused: int) -> None:
        """Got a KV slot whose first `reused` positions already hold the prompt's prefix."""
        self.slot = slot
        self.stats.n_cached, self.stats.n_prompt = reused, len(self.prompt) - reused
        self.stats.t_queued = time.perf_counter() - self._t_submit

    def _prompt_done(self) -> None:
        """The prompt is in the cache; from now on each iteration decodes one token."""
        self.decoding = True

    def _add_logits(self, logits: np.ndarray) -> None:
        """Keep an all-logits request's rows."""
        self._logits.append(logits)

    def _accept(self, logits: np.ndarray, context_full: bool) -> None:
        """Sample the next token from logits [n_vocab], emit its text, or finish."""
        t0 = time.perf_counter()
        reason, text, by_string = None, "", False
        if self.cancelled:
            reason = "cancelled"
        elif self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
            reason = "length"
        else:
            if self.constraint is not None:
                logits = self.constraint.mask(np.array(logits, dtype=np.float32))
            tok = self._sampler.sample(logits, self._history)
            if self.constraint is not None:
                self.constraint.accept(tok)
            if tok in self.tokenizer.eog_ids:
                reason = "stop"
            else:
                if self.n_logprobs is not None:
                    self.logprobs.append(token_logprob(logits, tok, self.n_logprobs))
                self.tokens.append(tok)
                self._history.append(tok)
                text, by_string = self._stops.push(self._stream.feed(tok))
                if by_string:
                    reason = "stop"
                elif (self.max_tokens is not None and len(self.tokens) >= self.max_tokens) or context_full:
                    reason = "length"  # never a silent truncation
                self.next_token = tok
        self.stats.t_gen += time.perf_counter() - t0
        if text:
            self._queue.put((text, len(self.tokens)))
        if reason is not None:
            self._finish(reason, flush=not by_string)

    def _finish(self, reason: FinishReason, flush: bool = True) -> None:
        """End with a finish reason: flush held-back text, then the end marker."""
        if self.done:
            return
        if flush:
            tail = self._stops.push(self._stream.flush())[0] + self._stops.flush()
            if tail:
                self._queue.put((tail, len(self.tokens)))
        self.finish_reason = reason
        self.stats.n_gen = len(self.tokens)
        self.done = True
        self._queue.put(_DONE)

    def _fail(self, error: BaseException) -> None:
        """End with an error the caller's iteration raises."""
        if self.done:
            return
        self.finish_reason = "cancelled"
        self.stats.n_gen = len(self.tokens)
        self.done = True
        self._queue.put(error if isinstance(error, QFError) else QFError(repr(error)))


class Engine:
    """Direct evaluation on KV slot 0, for tools and benchmarks (qbench, qimatrix, bench_runtime).

    It shares the scheduler's lock, and refuses to run while a generation holds slot 0; generations wait
    for slot 0 while an Engine call runs.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.forward = scheduler.forward
        self.threads = scheduler.threads

    @property
    def cache(self) -> KVCache:
        """The model's KV cache (the Engine uses slot 0)."""
        return self.scheduler.cache

    @property
    def lock(self) -> threading.RLock:
        """The scheduler's evaluation lock."""
        return self.scheduler.lock

    @property
    def n_ctx(self) -> int:
        """Context length (positions per slot)."""
        return self.scheduler.cache.n_ctx

    @property
    def n_batch(self) -> int:
        """Prompt tokens per forward pass."""
        return self.scheduler.n_batch

    def bind_threads(self, n: int | None = None) -> None:
        """Apply each backend's thread count (or n) to the calling thread."""
        self.scheduler.bind_threads(n)

    def check_prompt(self, n: int) -> None:
        """A prompt must fit in the context."""
        check_prompt(n, self.n_ctx)

    def prefill(self, ids: Sequence[int], cancel: threading.Event | None = None,
                all_logits: bool = False) -> tuple[np.ndarray | None, int]:
        """Evaluate ids after the longest cached prefix of slot 0; (logits of the last token, or of every
        evaluated token when all_logits; None if cancelled) and the number of reused tokens."""
        self.check_prompt(len(ids))
        with self.lock, _Reserved(self.scheduler, 0):
            cache = self.cache
            keep = 0 if all_logits else min(cache.common_prefix(ids), len(ids) - 1)
            cache.truncate(keep)
            self.bind_threads()
            outs = []
            for start in range(keep, len(ids), self.n_batch):
                if cancel is not None and cancel.is_set():
                    return None, keep
                chunk = list(ids[start:start + self.n_batch])
                outs.append(self.forward.forward(np.asarray(chunk), cache.n_past(), cache, all_logits))
                cache.append(chunk)
        return (np.concatenate(outs) if all_logits else outs[-1][-1]), keep

    def step(self, token: int) -> np.ndarray:
        """Evaluate one token at slot 0's next position; logits f32 [n_vocab]."""
        with self.lock, _Reserved(self.scheduler, 0):
            n = self.threads.choose() if self.threads is not None else None
            self.bind_threads(n)
            t0 = time.perf_counter()
            batch = Batch.sequence([token], self.cache.n_past())
            logits = self.forward.forward_batch(batch, self.cache)
            if self.threads is not None:
                self.threads.record(n, time.perf_counter() - t0)
            self.cache.append([token])
        return logits[-1]


class _Reserved:
    """Context manager: a slot kept away from the scheduler's requests."""

    def __init__(self, scheduler: Scheduler, slot: int) -> None:
        self.scheduler, self.slot = scheduler, slot

    def __enter__(self) -> None:
        self.scheduler.reserve(self.slot)

    def __exit__(self, *exc: object) -> None:
        self.scheduler.release(self.slot)
