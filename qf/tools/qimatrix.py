"""`qimatrix MODEL -f calibration.txt -o imatrix.gguf`: compute an importance matrix, as llama-imatrix does.

Runs the model over the text in chunks of -c tokens and writes, for every `blk.*` weight (and
output.weight with --process-output), the sum of its input squares and the token count, in llama.cpp's
GGUF imatrix format: `qquantize ... --imatrix imatrix.gguf` and llama-quantize both read it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from qf.eval.text import SLICES, read_text_arg
from qf.format.errors import QFError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-f", "--file", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration text (UTF-8).")
@click.option("--slice", "slice_name", type=click.Choice(list(SLICES)), help="Use a built-in Jargon File slice.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), default=Path("imatrix.gguf"),
              show_default=True, help="Output file (GGUF imatrix format; written atomically).")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", "max_chunks", type=int, default=None, help="Use at most N chunks.")
@click.option("-t", "--threads", "n_threads", type=int, default=None, help="CPU threads.")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix skips it by default).")
def main(model_path: Path, text_file: Path | None, slice_name: str | None, out: Path, n_ctx: int,
         max_chunks: int | None, n_threads: int | None, process_output: bool) -> None:
    """Compute the importance matrix of MODEL_PATH over a calibration text."""
    from qf.eval.imatrix import compute_imatrix, save_imatrix

    t0 = time.perf_counter()

    def progress(i: int, n: int) -> None:
        click.echo(f"\rqimatrix: chunk {i}/{n}, {time.perf_counter() - t0:.0f} s", err=True, nl=i == n)

    try:
        text = read_text_arg(text_file, slice_name)
        stats, n_chunks = compute_imatrix(model_path, text, n_ctx, max_chunks, n_threads, process_output, progress)
        save_imatrix(out, stats, n_chunks, n_ctx, str(text_file) if text_file else f"jargon:{slice_name}")
    except QFError as e:
        click.echo(f"qimatrix: error: {e}", err=True)
        sys.exit(2)
    click.echo(f"wrote {out}: {len(stats.sums)} weights, {n_chunks} chunks of {n_ctx} tokens, "
               f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
