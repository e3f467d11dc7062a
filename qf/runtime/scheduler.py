"""Continuous batching: every running sequence's next token in one forward pass, prompts in chunks between.

One scheduler thread per loaded model owns the KV cache. Requests (qf.runtime.generate.Generation) come
from any thread; each waits for a free KV slot, then alternates with the others:

    iteration:  admit waiting requests into free slots (the slot with the longest common prefix wins)
                one forward over the next token of every decoding request      (B rows, exact_rows)
                one prompt chunk (<= n_batch tokens) of the oldest prefilling request

Decode rows are computed bit for bit as they would be alone (`Batch.exact_rows`: the fused kernels whose
per-row sums do not depend on the batch), and a prompt is cut into the same chunks whether it runs alone
or beside others, so at temperature 0 a request gives the same tokens whatever else is running. Prompt
chunks are not merged into the decode forward for that reason (a matmul of other rows would go through
BLAS, whose sums depend on M); a chunk therefore costs one extra pass over the weights per iteration.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from qf.format.errors import ModelClosedError, ModelError, QFError
from qf.runtime.arch.llama import Batch, NonFiniteError
from qf.runtime.kv_cache import KVCache
from qf.runtime.threads import DecodeThreads

if TYPE_CHECKING:
    from qf.runtime.generate import Generation


class Scheduler:
    """Runs the requests of one model on its KV cache from a background thread (started on first use)."""

    def __init__(self, forward: Any, cache: KVCache, n_batch: int, threads: DecodeThreads | None,
                 bind_threads: Callable[[int | None], None]) -> None:
        self.forward, self.cache = forward, cache
        self.n_batch = max(1, int(n_batch))
        self.threads = threads
        self.bind_threads = bind_threads
        self.lock = threading.RLock()  # held for every forward pass (the scheduler's and the Engine's)
        self._cv = threading.Condition()
        self._waiting: list[Generation] = []
        self._active: dict[int, Generation] = {}  # slot -> request
        self._last_used = [0.0] * cache.n_slots
        self._reserved: set[int] = set()  # slots an Engine user holds
        self._thread: threading.Thread | None = None
        self._closed = False
        self.max_batch = 0  # most decode rows one forward pass has held
        self.n_decode_steps = 0  # decode forward passes
        self.n_decoded = 0  # tokens evaluated by them

    # -- requests ------------------------------------------------------------------------------------------
    def submit(self, req: Generation) -> None:
        """Queue a request; it starts when a slot is free."""
        with self._cv:
            if self._closed:
                raise ModelClosedError("the model is closed")
            self._waiting.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qf-scheduler", daemon=True)
                self._thread.start()
            self._cv.notify()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No forward pass runs while inside (requests started meanwhile begin together afterwards)."""
        with self.lock:
            yield

    def wake(self) -> None:
        """Re-check the queues (a request was cancelled)."""
        with self._cv:
            self._cv.notify()

    @property
    def n_running(self) -> int:
        """Requests holding a slot and not yet finished (a finished one frees its slot at the next iteration)."""
        with self._cv:
            return sum(not r.done for r in self._active.values())

    @property
    def n_waiting(self) -> int:
        """Requests queued for a slot."""
        with self._cv:
            return len(self._waiting)

    def slot_busy(self, slot: int) -> bool:
        """Whether a request holds the slot."""
        with self._cv:
            return slot in self._active

    def reserve(self, slot: int) -> None:
        """Keep requests off a slot (the Engine evaluates on it directly)."""
        with self._cv:
            if slot in self._active:
                raise ModelError(f"KV slot {slot} is in use by a running generation; wait for it or cancel it")
            self._reserved.add(slot)

    def release(self, slot: int) -> None:
        """Give a reserved slot back to the requests."""
        with self._cv:
            self._reserved.discard(slot)
            self._cv.notify()

    def close(self) -> None:
        """Stop the thread; requests still queued or running end with an error."""
        with self._cv:
            self._closed = True
            self._cv.notify()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        for req in self._waiting + list(self._active.values()):
            req._fail(ModelClosedError("the model was closed while this generation ran"))
        self._waiting.clear()
        self._active.clear()

    # -- the loop ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        """Iterate while there is work; sleep on the condition otherwise."""
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._active:
                    self._cv.wait()
                if self._closed:
                    return
                self._admit()
                active = list(self._active.values())
            if not active:
                with self._cv:  # everything waits for a reserved slot
                    self._cv.wait(0.05)
                continue
            try:
                with self.lock:
                    self._iteration(active)
            except BaseException as e:  # a bug or MemoryError: fail this iteration's requests, keep serving
                for req in active:
                    if not req.done:
                        req._fail(e if isinstance(e, QFError) else ModelError(f"generation failed: {e!r}"))
            self._retire()

    def _admit(self) -> None:
        """Move waiting requests into free slots (caller holds _cv): drop cancelled ones, reuse prefixes."""
        for req in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(req)
            req._finish("cancelled")
        free = [s for s in range(self.cache.n_slots) if s not in self._active and s not in self._reserved]
        while self._waiting and free:
            req = self._waiting.pop(0)
            slot = max(free, key=lambda s: (self.cache.common_prefix(req.prompt, s), -self._last_used[s]))
            free.remove(slot)
            keep = 0 if req.all_logits else min(self.cache.common_prefix(req.prompt, slot), len(req.prompt) - 1)
            self.cache.truncate(keep, slot)
            req._start(slot, keep)
            self._active[slot] = req

    def _retire(self) -> None:
        """Free the slots of finished requests."""
        with self._cv:
            for slot in [s for s, r in self._active.items() if r.done]:
                del self._active[slot]
                self._last_used[slot] = time.monotonic()

    def _iteration(self, active: list[Generation]) -> None:
        """One decode forward over all decoding requests, then one prompt chunk."""
        for req in active:
            if req.cancelled and not req.done:
                req._finish("cancelled")
        decoding = [r for r in active if not r.done and r.decoding]
        if decoding:
            self._decode(decoding)
        prefilling = [r for r in active if not r.done and not r.decoding]
        if prefilling:
            self._prefill_chunk(min(prefilling, key=lambda r: r.seq))

    def _decode(self, reqs: list[Generation]) -> None:
        """Evaluate each request's last sampled token (one row each) and sample the next."""
        self.max_batch = max(self.max_batch, len(reqs))
        self.n_decode_steps += 1
        self.n_decoded += len(reqs)
        slots = np.asarray([r.slot for r in reqs], dtype=np.int64)
        pos = np.asarray([self.cache.n_past(r.slot) for r in reqs], dtype=np.int64)
        batch = Batch(np.asarray([r.next_token for r in reqs], dtype=np.int64), pos, slots, exact_rows=True)
        n = self.threads.choose() if self.threads is not None else None
        self.bind_threads(n)
        t0 = time.perf_counter()
        logits = self.forward.forward_batch(batch, self.cache)  # [B, n_vocab]
        dt = time.perf_counter() - t0
        if self.threads is not None:
            self.threads.record(n, dt)
        for i, req in enumerate(reqs):
            self.cache.append([req.next_token], req.slot)
            req.stats.t_gen += dt
        self._check_finite(batch, logits, reqs)
        for i, req in enumerate(reqs):
            if not req.done:
                req._accept(logits[i], self.cache.n_past(req.slot) >= self.cache.n_ctx)

    def _prefill_chunk(self, req: Generation) -> None:
        """Evaluate the next chunk of a prompt; sample the first token after its last chunk."""
        start = self.cache.n_past(req.slot)
        chunk = req.prompt[start:start + self.n_batch]
        last = start + len(chunk) == len(req.prompt)
        batch = Batch.sequence(chunk, start, req.slot)
        self.bind_threads(None)
        t0 = time.perf_counter()
        rows = None if req.all_logits else np.asarray([len(chunk) - 1])
        logits = self.forward.forward_batch(batch, self.cache, rows)
        self.cache.append(chunk, req.slot)
        req.stats.t_prompt += time.perf_counter() - t0
        if req.all_logits:
            self._check_finite(batch, logits, [req] * len(chunk))
            req._add_logits(logits)
        else:
            self._check_finite(Batch.sequence(chunk[-1:], start + len(chunk) - 1, req.slot), logits, [req])
        if last and not req.done:
            if req.all_logits:
                req._finish("length")
            else:
                req._prompt_done()
                req._accept(logits[-1], self.cache.n_past(req.slot) >= self.cache.n_ctx)

    def _check_finite(self, batch: Batch, logits: np.ndarray, reqs: list[Generation]) -> None:
        """Fail the requests whose logits hold inf / NaN, naming the first layer that produced them."""
        ok = np.isfinite(logits).all(axis=-1)
        if ok.all():
            return
        for i in np.flatnonzero(~ok):
            if reqs[i].done:  # one error per request (an all-logits request owns every row)
                continue
            row = Batch(batch.ids[i:i + 1], batch.pos[i:i + 1], batch.slots[i:i + 1], batch.exact_rows)
            where = self.forward.locate_nonfinite(row, self.cache) or "output"
            reqs[i]._fail(NonFiniteError(f"the forward pass produced inf/NaN (first in {where}'s output) at "
                                         f"position {int(row.pos[0])}: the model's weights or scales there are "
                                         "not finite, or the values overflow (check with `qinspect --verify`)"))
