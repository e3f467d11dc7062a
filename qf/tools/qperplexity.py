"""`qperplexity`: perplexity over a text, and KL divergence against a reference model's saved logits.

    qperplexity model-f16.qf -f eval.txt -c 512 --save-logits base.bin   # reference run
    qperplexity model-q4_0.qf -f eval.txt -c 512 --kl-divergence base.bin  # quantized run
    qperplexity model.qf --slice evaluation --chunks 16                   # built-in Jargon File slice

Scoring follows llama.cpp's llama-perplexity (see qf.eval.perplexity); the logits file and the KLD
statistics are described in qf.eval.kld. Progress goes to stderr, results to stdout (and --json).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from qf.eval.kld import (KLDStats, LogitsFile, LogitsWriter, TokenStats, check_compatible, compare_chunk,
                         format_report, kld_stats)
from qf.eval.perplexity import ChunkPlan, PerplexityResult, ScoredChunk, iter_chunks, perplexity, plan_chunks
from qf.eval.text import SLICES, read_text_arg
from qf.format.errors import QFError
from qf.tools.kv_options import kv_cache_options

if TYPE_CHECKING:
    from qf.runtime import Model


def _err(msg: str) -> None:
    """One progress line on stderr."""
    click.echo(msg, err=True)


class _Progress:
    """Per-chunk progress on stderr with an ETA after the first chunk (like llama-perplexity)."""

    def __init__(self, n_chunks: int) -> None:
        self.n_chunks, self.t0 = n_chunks, time.perf_counter()

    def chunk_done(self, i: int, line: str) -> None:
        """Report chunk i (0-based)."""
        if i == 0:
            dt = time.perf_counter() - self.t0
            _err(f"qperplexity: {dt:.2f} seconds per pass - ETA {dt * self.n_chunks / 60:.2f} minutes")
        _err(line)


def _write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (temp + rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load(model_path: Path, n_ctx: int, n_threads: int | None, n_batch: int | None, kv: dict | None = None) -> Model:
    """Load the model through the public runtime API; a chunk is evaluated n_batch tokens per forward
    call (default: the whole chunk at once, as llama-perplexity's default batch of 2048 does). No cold-start
    path: every chunk runs on the compiled kernels, so a fresh install scores as every later run does."""
    from qf.runtime import Model
    n_batch = n_ctx if n_batch is None else n_batch
    if n_batch < 1:
        raise QFError(f"the batch size must be positive, got {n_batch}")
    return Model.load(model_path, n_ctx=n_ctx, n_threads=n_threads, n_batch=min(n_batch, n_ctx), cold_start=False,
                      **(kv or {}))


def _model_bos(model: Model) -> int | None:
    """The BOS id the model prepends, or None when it adds no BOS."""
    return model.bos_id if model.add_bos else None


def _logits_fn(model: Model) -> Callable[[np.ndarray], np.ndarray]:
    """tokens [n_ctx] -> logits [n_ctx, n_vocab], evaluated from an empty cache."""
    return lambda chunk: model.logits(chunk.tolist())


def run_perplexity(model: Model, tokens: np.ndarray, plan: ChunkPlan,
                   save_logits: Path | None) -> PerplexityResult:
    """Perplexity run; with save_logits, also write the reference logits file."""
    prog = _Progress(plan.n_chunks)
    writer = (LogitsWriter(save_logits, plan.n_ctx, model.n_vocab, tokens[:plan.n_chunks * plan.n_ctx],
                           plan.bos_id) if save_logits else None)

    def on_chunk(ch: ScoredChunk, nll: np.ndarray) -> None:
        if writer is not None:
            writer.write_chunk(ch.logits, ch.targets)
        prog.chunk_done(ch.index, f"[{ch.index + 1}/{plan.n_chunks}] PPL {math.exp(nll.mean()):.4f}")

    try:
        res = perplexity(_logits_fn(model), tokens, plan, on_chunk)
        if writer is not None:
            writer.finish()
    finally:
        if writer is not None:
            writer.abort()  # no-op after finish (the temp file is gone)
    return res


def run_kl_divergence(model: Model, base: LogitsFile, tokens: np.ndarray,
                      plan: ChunkPlan) -> tuple[TokenStats, KLDStats]:
    """KL-divergence run against `base`: per-token results and their summary."""
    prog = _Progress(plan.n_chunks)
    acc = TokenStats.empty()
    _err("chunk       PPL        ln(PPL(Q)/PPL(base))   KL Divergence   Same top p")
    for ch in iter_chunks(_logits_fn(model), tokens, plan):
        acc.extend(compare_chunk(base, ch.index, ch.logits, ch.targets))
        prog.chunk_done(ch.index, f"{ch.index + 1:4d}  {math.exp(acc.nll.mean()):10.4f}  "
                                  f"{acc.nll.mean() - acc.nll_base.mean():12.5f}  "
                                  f"{acc.kld.mean():16.6f}  {100 * acc.same_top.mean():10.3f} %")
    return acc, kld_stats(acc)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-f", "--file", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file to evaluate (UTF-8).")
@click.option("--slice", "slice_name", type=click.Choice(list(SLICES)), help="Use a built-in Jargon File slice.")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=None,
              help="Tokens per chunk (default 512, or the base file's with --kl-divergence).")
@click.option("--chunks", "max_chunks", type=int, default=None, help="Evaluate at most N chunks.")
@click.option("-b", "--batch-size", "n_batch", type=int, default=None, help="Tokens per forward call.")
@click.option("-t", "--threads", "n_threads", type=int, default=None, help="CPU threads.")
@click.option("--save-logits", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the reference logits file (run this on the F16/BF16 model).")
@click.option("--kl-divergence", "kld_base", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Compare against a logits file saved with --save-logits.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write results as JSON.")
@kv_cache_options
def main(model_path: Path, text_file: Path | None, slice_name: str | None, n_ctx: int | None,
         max_chunks: int | None, n_batch: int | None, n_threads: int | None, save_logits: Path | None,
         kld_base: Path | None, json_out: Path | None, type_k: str, type_v: str) -> None:
    """Perplexity of MODEL_PATH over a text (llama-perplexity's method), or its KL divergence to a reference."""
    try:
        result = _main(model_path, text_file, slice_name, n_ctx, max_chunks, n_batch, n_threads,
                       save_logits, kld_base, dict(type_k=type_k, type_v=type_v))
    except QFError as e:
        raise click.ClickException(str(e)) from None
    if json_out is not None:
        _write_json(json_out, result)


def _main(model_path: Path, text_file: Path | None, slice_name: str | None, n_ctx: int | None,
          max_chunks: int | None, n_batch: int | None, n_threads: int | None, save_logits: Path | None,
          kld_base: Path | None, kv: dict | None = None) -> dict:
    """The command's work; returns the JSON-able result."""
    if save_logits is not None and kld_base is not None:
        raise QFError("--save-logits and --kl-divergence are exclusive (save with the reference model)")
    if kld_base is not None:
        return _main_kld(model_path, text_file, slice_name, n_ctx, max_chunks, n_batch, n_threads, kld_base, kv)
    n_ctx = 512 if n_ctx is None else n_ctx
    text = read_text_arg(text_file, slice_name)
    t0 = time.perf_counter()
    with _load(model_path, n_ctx, n_threads, n_batch, kv) as model:
        tokens = np.asarray(model.tokenize(text), dtype=np.int64)
        plan = plan_chunks(tokens.size, n_ctx, max_chunks, _model_bos(model))
        _err(f"qperplexity: {tokens.size} tokens; {plan.n_chunks} chunks of {n_ctx}, {plan.n_scored} scored each")
        res = run_perplexity(model, tokens, plan, save_logits)
    click.echo(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f}")
    return {"model": str(model_path), "n_ctx": n_ctx, "n_chunks": plan.n_chunks, "n_tokens": res.n_tokens,
            "ppl": res.ppl, "ppl_err": res.ppl_err, "seconds": time.perf_counter() - t0,
            "save_logits": None if save_logits is None else str(save_logits)}


def _main_kld(model_path: Path, text_file: Path | None, slice_name: str | None, n_ctx: int | None,
              max_chunks: int | None, n_batch: int | None, n_threads: int | None, kld_base: Path,
              kv: dict | None = None) -> dict:
    """--kl-divergence: tokens come from the base file; a given text must tokenize to the same."""
    t0 = time.perf_counter()
    text = None if text_file is None and slice_name is None else read_text_arg(text_file, slice_name)
    with LogitsFile(kld_base) as base, _load(model_path, n_ctx or base.layout.n_ctx, n_threads, n_batch, kv) as model:
        n_ctx = model.n_ctx
        tokens = None if text is None else np.asarray(model.tokenize(text), dtype=np.int64)
        check_compatible(base, n_ctx=n_ctx, n_vocab=model.n_vocab, bos_id=_model_bos(model), tokens=tokens)
        stream = base.tokens.reshape(-1).astype(np.int64)
        if max_chunks is not None and max_chunks < 1:
            raise QFError(f"the number of chunks must be positive, got {max_chunks}")
        plan = ChunkPlan(n_ctx, min(base.layout.n_chunks, max_chunks or base.layout.n_chunks), base.bos_id)
        _err(f"qperplexity: KL divergence against {kld_base}: {plan.n_chunks} chunks of {n_ctx}")
        _, stats = run_kl_divergence(model, base, stream, plan)
    click.echo(format_report(stats))
    return {"model": str(model_path), "base": str(kld_base), "n_ctx": n_ctx, "n_chunks": plan.n_chunks,
            "seconds": time.perf_counter() - t0, **stats.to_dict()}


if __name__ == "__main__":
    sys.exit(main())
