"""qbench: prompt-processing and generation speed, llama-bench style.

    qbench MODEL -p 128 -n 64 -r 3 -t 2

ppN evaluates N prompt tokens (in batches of -b) from an empty cache; tgN evaluates N tokens one at a time
from an empty cache. Each test runs once to warm up (compilation, page cache), then -r times; the table shows
the median tokens/s and the standard deviation.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from qf.format.errors import QFError
from qf.tools.kv_options import kv_cache_options


@dataclass
class BenchResult:
    """One test's timings."""

    test: str  # "pp128" | "tg64"
    n_tokens: int
    seconds: list[float]

    @property
    def tps(self) -> list[float]:
        """Tokens/s of each run."""
        return [self.n_tokens / s for s in self.seconds]

    @property
    def median(self) -> float:
        """Median tokens/s."""
        return statistics.median(self.tps)

    @property
    def stdev(self) -> float:
        """Standard deviation of tokens/s (0 for one run)."""
        return statistics.stdev(self.tps) if len(self.tps) > 1 else 0.0


def time_prompt(engine: Any, ids: list[int]) -> float:
    """Seconds to evaluate ids from an empty cache."""
    engine.cache.clear()
    t0 = time.perf_counter()
    engine.prefill(ids)
    return time.perf_counter() - t0


def time_generation(engine: Any, ids: list[int]) -> float:
    """Seconds to evaluate ids one token at a time from an empty cache."""
    engine.cache.clear()
    engine.bind_threads()
    t0 = time.perf_counter()
    for t in ids:
        engine.step(t)
    return time.perf_counter() - t0


def run_bench(model: Any, n_prompt: int, n_gen: int, reps: int, seed: int = 0) -> list[BenchResult]:
    """Warm up, then time ppN and tgN `reps` times each (random token ids, as llama-bench)."""
    rng = np.random.default_rng(seed)
    eng = model.engine
    need = max(n_prompt, n_gen)
    if need > model.n_ctx:
        raise QFError(f"the test needs {need} positions but the context holds {model.n_ctx} (raise -c)")
    results = []
    for name, n, fn in (("pp", n_prompt, time_prompt), ("tg", n_gen, time_generation)):
        if n <= 0:
            continue
        # warm-up: the whole prompt (as llama-bench: its kernels, e.g. those of long batches, compile here), 8 steps
        fn(eng, rng.integers(0, model.n_vocab, size=n if name == "pp" else min(n, 8)).tolist())
        secs = [fn(eng, rng.integers(0, model.n_vocab, size=n).tolist()) for _ in range(reps)]
        results.append(BenchResult(f"{name}{n}", n, secs))
    eng.cache.clear()
    return results


def model_facts(path: Path) -> tuple[int, int]:
    """(tensor bytes, parameter count) of a model file."""
    from qf.format.reader import open_gguf

    with open_gguf(path) as f:
        size = sum(t.nbytes for t in f.tensors.values())
        params = sum(int(np.prod(t.ne, dtype=np.int64)) for t in f.tensors.values())
    return size, params


def format_table(name: str, size: int, params: int, threads: int, results: list[BenchResult]) -> str:
    """A markdown table like llama-bench's."""
    head = ["model", "size", "params", "backend", "threads", "test", "t/s"]
    rows = [[name, f"{size / 2**20:.2f} MiB", f"{params / 1e6:.2f} M", "CPU", str(threads), r.test,
             f"{r.median:.2f} ± {r.stdev:.2f}"] for r in results]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-p", "--n-prompt", type=int, default=512, show_default=True, help="Prompt tokens (0: skip pp).")
@click.option("-n", "--n-gen", type=int, default=128, show_default=True, help="Generated tokens (0: skip tg).")
@click.option("-r", "--repetitions", type=int, default=5, show_default=True, help="Timed runs per test.")
@click.option("-t", "--threads", "n_threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("-b", "--batch-size", "n_batch", type=int, default=512, show_default=True, help="Prompt batch size.")
@click.option("--repack", is_flag=True, help="Repack quantized weights into integer panels (RAM beyond the mmap; "
              "llama-bench repacks by default, -nr 1 turns it off).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write results as JSON.")
@kv_cache_options
def main(model_path: Path, n_prompt: int, n_gen: int, repetitions: int, n_threads: int | None, n_batch: int,
         json_out: Path | None, type_k: str, type_v: str, repack: bool) -> None:
    """Measure prompt (ppN) and generation (tgN) tokens/s of MODEL_PATH; median of -r runs."""
    from qf.runtime import Model
    from qf.runtime.api import default_threads
    from qf.runtime.backend import CpuBackend

    if repetitions < 1:
        raise click.BadParameter("must be at least 1", param_hint="-r")
    threads = n_threads or default_threads()
    cpu = CpuBackend(threads, repack=repack)
    try:
        with Model.load(model_path, n_ctx=max(n_prompt, n_gen, 1), n_threads=threads, n_batch=n_batch,
                        type_k=type_k, type_v=type_v, cpu_backend=cpu) as model:
            results = run_bench(model, n_prompt, n_gen, repetitions)
            if repack:
                from qf.runtime.planner import fmt_bytes

                click.echo(f"repacked weights: {fmt_bytes(cpu.repacked_bytes)} of RAM", err=True)
        size, params = model_facts(model_path)
    except QFError as e:
        click.echo(f"qbench: error: {e}", err=True)
        sys.exit(1)
    click.echo(format_table(model_path.name, size, params, threads, results))
    if json_out is not None:
        json_out.write_text(json.dumps({"model": str(model_path), "threads": threads, "n_batch": n_batch,
                                        "results": [asdict(r) | {"median_tps": r.median, "stdev_tps": r.stdev}
                                                    for r in results]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
