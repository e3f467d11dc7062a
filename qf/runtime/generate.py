"""The generation loop: batched prefill with KV-prefix reuse, one-token decode, stop conditions, streaming."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np

from qf.format.errors import ContextOverflowError
from qf.runtime.arch.llama import LlamaForward
from qf.runtime.kv_cache import KVCache
from qf.runtime.sampler import Sampler, SamplingParams
from qf.runtime.threads import DecodeThreads
from qf.runtime.tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class GenerationStats:
    """Token counts and timings of one generation."""

    n_prompt: int = 0  # prompt tokens evaluated (excluding those reused from the cache)
    n_cached: int = 0  # prompt tokens whose keys/values were reused
    t_prompt: float = 0.0  # seconds spent on prompt evaluation
    n_gen: int = 0  # tokens generated
    t_gen: float = 0.0  # seconds spent generating (decode forward passes and sampling)

    @property
    def prompt_tps(self) -> float:
        """Prompt evaluation speed in tokens/s."""
        return self.n_prompt / self.t_prompt if self.t_prompt > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        """Generation speed in tokens/s."""
        return self.n_gen / self.t_gen if self.t_gen > 0 else 0.0


class Engine:
    """A forward pass plus its KV cache; one evaluation at a time (a lock guards the cache)."""

    def __init__(self, forward: LlamaForward, n_batch: int = 256, threads: DecodeThreads | None = None) -> None:
        self.forward = forward
        self.threads = threads  # decode thread count chosen by measurement; None: each backend's own count
        self.cache: KVCache = forward.new_cache()
        self.n_batch = max(1, int(n_batch))
        self.lock = threading.Lock()
        self.owner: object | None = None  # the generation currently allowed to use the cache

    @property
    def n_ctx(self) -> int:
        """Context length (positions in the cache)."""
        return self.cache.n_ctx

    def bind_threads(self, n: int | None = None) -> None:
        """Apply each backend's thread count (or n) to the calling thread (numba's setting is per thread)."""
        f = self.forward
        for be in {id(b): b for b in (f.embed_be, *f.placement, f.head_be)}.values():
            be.set_threads(n)

    def check_prompt(self, n: int) -> None:
        """A prompt must fit in the context."""
        if n == 0:
            raise ContextOverflowError("the prompt is empty: nothing to evaluate")
        if n > self.n_ctx:
            raise ContextOverflowError(f"the prompt has {n} tokens but the context holds {self.n_ctx} "
                                       f"(load with a larger n_ctx, or shorten the prompt)")

    def prefill(self, ids: Sequence[int], cancel: threading.Event | None = None,
                all_logits: bool = False) -> tuple[np.ndarray | None, int]:
        """Evaluate ids after the longest cached prefix; returns (logits of the last token, or of every
        evaluated token when all_logits; None if cancelled) and the number of reused tokens."""
        self.check_prompt(len(ids))
        keep = 0 if all_logits else min(self.cache.common_prefix(ids), len(ids) - 1)
        self.cache.truncate(keep)
        self.bind_threads()
        outs = []
        for start in range(keep, len(ids), self.n_batch):
            if cancel is not None and cancel.is_set():
                return None, keep
            chunk = ids[start:start + self.n_batch]
            outs.append(self.forward.forward(np.asarray(chunk), self.cache.n_past, self.cache, all_logits))
            self.cache.append(chunk)
        logits = np.concatenate(outs) if all_logits else outs[-1][-1]
        return logits, keep

    def step(self, token: int) -> np.ndarray:
        """Evaluate one token at the next position; logits f32 [n_vocab]."""
        n = self.threads.choose() if self.threads is not None else None
        self.bind_threads(n)
        t0 = time.perf_counter()
        logits = self.forward.forward(np.asarray([token]), self.cache.n_past, self.cache)
        if self.threads is not None:
            self.threads.record(n, time.perf_counter() - t0)
        self.cache.append([token])
        return logits[-1]


class StopFilter:
    """Holds back text that might be the start of a stop string; reports when one appears."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, stopped?) after appending text."""
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        """Text held back when generation ends without a stop string."""
        out, self.buf = self.buf, ""
        return out


class Generation:
    """One streaming generation: iterate for text pieces; `finish_reason`, `tokens`, `stats` when done."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, prompt: Sequence[int], params: SamplingParams,
                 max_tokens: int | None = None, stop: Sequence[str] = ()) -> None:
        engine.check_prompt(len(prompt))
        self.engine, self.tokenizer = engine, tokenizer
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.max_tokens = None if max_tokens is None or max_tokens < 0 else int(max_tokens)
        self.stop = list(stop)
        self.tokens: list[int] = []  # generated ids (end-of-generation token excluded)
        self.finish_reason: FinishReason | None = None
        self.stats = GenerationStats()
        self._cancel = threading.Event()
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def cancel(self) -> None:
        """Ask the loop to stop at the next token (safe from any thread)."""
        self._cancel.set()

    @property
    def text(self) -> str:
        """Everything generated so far, decoded."""
        return self.tokenizer.decode(self.tokens)

    def _run(self) -> Iterator[str]:
        """Prefill, then sample / emit / evaluate until a stop condition; sets finish_reason."""
        self.engine.owner = self
        logits = self._prefill()
        sampler = Sampler(self.params)
        stream, stops = self.tokenizer.stream(), StopFilter(self.stop)
        history = list(self.prompt)
        reason: FinishReason | None = None if logits is not None else "cancelled"
        by_string = False
        while reason is None:
            t0 = time.perf_counter()
            reason, text = self._choose(sampler, logits, history), ""
            if reason is None:
                text, by_string = stops.push(stream.feed(self.tokens[-1]))
                reason = "stop" if by_string else self._budget_left()
            self.stats.t_gen += time.perf_counter() - t0
            if text:
                yield text
            if reason is None:
                t0 = time.perf_counter()
                logits = self._step(self.tokens[-1])
                self.stats.t_gen += time.perf_counter() - t0
                reason = None if logits is not None else "cancelled"
        self.finish_reason = reason
        self.stats.n_gen = len(self.tokens)
        if not by_string:  # flush an incomplete character and any text held for a possible stop string
            tail = stops.push(stream.flush())[0] + stops.flush()
            if tail:
                yield tail

    def _prefill(self) -> np.ndarray | None:
        """Evaluate the prompt (reusing the cached prefix); None when cancelled meanwhile."""
        t0 = time.perf_counter()
        with self.engine.lock:
            logits, reused = self.engine.prefill(self.prompt, self._cancel)
        self.stats.n_cached, self.stats.n_prompt = reused, len(self.prompt) - reused
        self.stats.t_prompt = time.perf_counter() - t0
        return logits

    def _choose(self, sampler: Sampler, logits: np.ndarray, history: list[int]) -> FinishReason | None:
        """Sample the next token (appended to tokens and history); a finish reason instead when cancelled,
        out of budget, or at an end-of-generation token."""
        if self._cancel.is_set() or self.engine.owner is not self:
            return "cancelled"
        if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
            return "length"
        tok = sampler.sample(logits, history)
        if tok in self.tokenizer.eog_ids:
            return "stop"
        self.tokens.append(tok)
        history.append(tok)
        return None

    def _budget_left(self) -> FinishReason | None:
        """'length' once max_tokens are out or the context is full (never a silent truncation)."""
        if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
            return "length"
        if self.engine.cache.n_past >= self.engine.n_ctx:
            return "length"
        return None

    def _step(self, token: int) -> np.ndarray | None:
        """Evaluate the token just generated; None if another generation took over the model."""
        with self.engine.lock:
            if self.engine.owner is not self or self._cancel.is_set():
                return None
            return self.engine.step(token)
