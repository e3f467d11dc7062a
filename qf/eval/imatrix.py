"""Compute an importance matrix: run the model over calibration text and sum each weight's input squares.

What llama-imatrix (tools/imatrix/imatrix.cpp) collects: for every matrix product with a `blk.*` weight
(and output.weight with process_output) over a batch of at least 16 tokens, the per-column sum of x^2 of
its input rows and the number of rows. The text is cut into chunks of n_ctx tokens as llama-perplexity
does (BOS in front of each chunk when the model adds one); each chunk is evaluated from an empty cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qf.eval.perplexity import chunk_input, plan_chunks
from qf.runtime.backend import CpuBackend

MIN_TOKENS = 16  # llama-imatrix ignores smaller batches


@dataclass
class ImatrixStats:
    """Running sums: weight name -> f64 [n_in] sum of x^2, and the rows that went into it."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, x: np.ndarray) -> None:
        """Account the input rows x [M, n_in] of one product with weight `name`."""
        s = np.einsum("mi,mi->i", x, x, dtype=np.float64)  # [n_in]
        if name in self.sums:
            self.sums[name] += s
            self.counts[name] += x.shape[0]
        else:
            self.sums[name], self.counts[name] = s, x.shape[0]


class CollectingBackend(CpuBackend):
    """The CPU backend, plus the input statistics of every matrix product with a collected weight."""

    def __init__(self, n_threads: int | None, stats: ImatrixStats, process_output: bool = False) -> None:
        super().__init__(n_threads)
        self.stats, self.process_output = stats, process_output
        self._names: dict[int, str] = {}  # id(matrix) -> weight name, for the weights we collect

    def matrix(self, t: Any) -> Any:
        """Wrap the weight as usual; remember its name when it is one llama-imatrix collects."""
        m = super().matrix(t)
        if t.name.startswith("blk.") or (self.process_output and t.name == "output.weight"):
            self._names[id(m)] = t.name
        return m

    def linear(self, w: Any, x: np.ndarray, bias: np.ndarray | None = None, exact_rows: bool = False) -> np.ndarray:
        """x @ w.T (+ bias), after adding x's squares to w's statistics (batches of 16+ rows)."""
        name = self._names.get(id(w))
        if name is not None and x.shape[0] >= MIN_TOKENS:
            self.stats.add(name, x)
        return super().linear(w, x, bias, exact_rows)

    def linears(self, ws: Sequence[Any], x: np.ndarray, biases: Sequence[np.ndarray | None],
                exact_rows: bool = False) -> list[np.ndarray]:
        """The merged products (Q/K/V, gate/up) of the CPU backend, after adding x's squares to each weight's
        statistics: llama-imatrix sees one product per weight."""
        if x.shape[0] >= MIN_TOKENS:
            for w in ws:
                name = self._names.get(id(w))
                if name is not None:
                    self.stats.add(name, x)
        return super().linears(ws, x, biases, exact_rows)


def compute_imatrix(model_path: str | os.PathLike, text: str, n_ctx: int = 512, max_chunks: int | None = None,
                    n_threads: int | None = None, process_output: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> tuple[ImatrixStats, int]:
    """Statistics over the text's chunks, and the number of chunks evaluated."""
    from qf.runtime.api import Model, default_threads

    stats = ImatrixStats()
    backend = CollectingBackend(n_threads or default_threads(), stats, process_output)
    with Model.load(model_path, n_ctx=n_ctx, n_batch=n_ctx, cpu_backend=backend, warmup=False) as m:
        tokens = np.asarray(m.tokenize(text), dtype=np.int64)
        plan = plan_chunks(tokens.size, n_ctx, max_chunks, m.bos_id if m.add_bos else None)
        eng = m.engine
        for i in range(plan.n_chunks):
            with eng.lock:
                eng.cache.clear()
                eng.prefill(chunk_input(tokens, plan, i).tolist(), all_logits=process_output)
            if progress is not None:
                progress(i + 1, plan.n_chunks)
        eng.cache.clear()
    return stats, plan.n_chunks


def save_imatrix(path: str | os.PathLike, stats: ImatrixStats, n_chunks: int, n_ctx: int,
                 dataset: str) -> Path:
    """The statistics as a GGUF imatrix file (readable by llama-quantize and qf.quant.imatrix)."""
    from qf.quant.imatrix import write_imatrix

    return write_imatrix(path, stats.sums, stats.counts, [dataset], n_chunks, n_ctx)
