"""`qconvert MODEL_DIR OUT.qf --type Q8_0`: Hugging Face checkpoint folder -> one .qf (GGUF v3) file."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from qf.format.errors import QFError
from qf.quant.mixes import mix_names

# Test hook: when set to a fraction in [0, 1], the run stops (sleeps) once that share of the tensor bytes
# is written, after printing PAUSE_MARK on stdout, so a test can SIGKILL it at a known point.
PAUSE_ENV = "QF_CONVERT_PAUSE_AT"
PAUSE_MARK = "qconvert: paused at"


class _Progress:
    """Progress bar on stderr, plus the optional pause hook."""

    def __init__(self, quiet: bool, label: str = "converting") -> None:
        self.quiet, self.label = quiet, label
        self.bar = None
        self.last = 0
        pause = os.environ.get(PAUSE_ENV)
        self.pause_at = float(pause) if pause else None

    def start(self, total: int) -> None:
        """Open the bar once the plan (and so the total) is known."""
        if not self.quiet:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, width=30,
                                         show_pos=False, show_percent=True)
            self.bar.__enter__()

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.bar is not None:
            self.bar.update(done - self.last)
            self.last = done
        if self.pause_at is not None and done >= self.pause_at * total:
            self.pause_at = None
            click.echo(f"{PAUSE_MARK} {100.0 * done / max(1, total):.1f}% after {name}")
            sys.stdout.flush()
            while True:
                time.sleep(3600)

    def close(self) -> None:
        """Finish the bar line."""
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def write_with_progress(tool: str, out: Path, quiet: bool, label: str, run: Callable[..., Any]) -> None:
    """Run a file-writing job with a progress bar; print its summary, or a one-line error and exit.

    run(progress=..., on_plan=...) returns the summary; QFError exits 2, an OS error (disk full...) exits 1.
    """
    progress = _Progress(quiet, label)
    try:
        summary = run(progress=progress, on_plan=lambda plan: progress.start(plan.total_bytes))
    except QFError as e:
        progress.close()
        click.echo(f"{tool}: error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # disk full, permissions...: the writer has already removed its temp file
        progress.close()
        click.echo(f"{tool}: error: cannot write {out}: {e}", err=True)
        sys.exit(1)
    progress.close()
    click.echo(_summary(summary))


def _summary(s) -> str:
    """Human summary: tensors, bytes, bits per weight, time, types used."""
    types = ", ".join(f"{k} x{v}" for k, v in sorted(s.types.items()))
    notes = "".join(f"\n  {n}" for n in getattr(s, "notes", ()))
    return (f"wrote {s.path}: {s.n_tensors} tensors, {s.n_params:,} weights, {s.file_bytes / 2**20:.1f} MiB, "
            f"{s.bits_per_weight:.2f} bits/weight, {s.seconds:.1f} s\n  types: {types}{notes}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--type", "--outtype", "qtype", default=None,
              type=click.Choice(mix_names(), case_sensitive=False),
              help="Quantization type (mix) of the output [default: Q8_0; for a GPTQ/AWQ/FP8/compressed-tensors "
                   "checkpoint F16 for its unquantized tensors; its quantized linears become Q4_0/Q8_0 where that is "
                   "exact for every one of them, else keep their payload].")
@click.option("--imatrix", "imatrix_file", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Importance matrix (llama-imatrix output, GGUF or legacy .dat) for the quantizers.")
@click.option("--keep-payload", is_flag=True,
              help="Keep a quantized checkpoint's payloads native even where a ggml type holds them exactly.")
@click.option("--transcode-lossy", is_flag=True,
              help="Also write asymmetric 4-bit payloads as Q4_1 (not exact: the min is rounded to fp16; the "
                   "summary prints the worst error).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def main(model_dir: Path, out: Path, qtype: str, imatrix_file: str | None, keep_payload: bool,
         transcode_lossy: bool, quiet: bool) -> None:
    """Convert the Hugging Face checkpoint in MODEL_DIR to one .qf file OUT (written atomically)."""
    from qf.convert.pipeline import convert  # late: keeps --help fast
    from qf.quant.imatrix import load_imatrix

    write_with_progress("qconvert", out, quiet, "converting",
                        lambda **kw: convert(model_dir, out, qtype.upper() if qtype else None,
                                             imatrix=load_imatrix(imatrix_file) if imatrix_file else None,
                                             keep_payload=keep_payload, transcode_lossy=transcode_lossy, **kw))


if __name__ == "__main__":
    main()
