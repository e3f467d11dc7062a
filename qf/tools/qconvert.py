"""`qconvert MODEL_DIR OUT.qf --type Q8_0`: Hugging Face checkpoint folder -> one .qf (GGUF v3) file."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from qf.format.errors import QFError
from qf.quant.methods import method_type_names, type_specs
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


def _method_help() -> str:
    """The calibrated and baseline --type names, for --help."""
    names = method_type_names()
    gptq = [n for n in names if n.startswith("GPTQ-")]
    rtn = [n for n in names if n.startswith("RTN-")]
    return (f"Calibrated types (need --calib): {', '.join(gptq)}. Round-to-nearest baselines on the same grids: "
            f"{', '.join(rtn)}. W<bits>: 2/4/8-bit codes; G<n>: one scale per n inputs, CH: per output channel; "
            "-ASYM: with zero points. Symmetric W4/W8 with groups of whole 32-value blocks are written as Q4_0/Q8_0 "
            "(exact); the rest as the int payload (docs/qf-extensions.md). Other methods: "
            + ", ".join(n for n in names if not n.startswith(("GPTQ-", "RTN-"))) + " (AWQ: asymmetric unless -SYM; "
            "FP8: e4m3 payload, -STATIC adds an input scale from --calib).")


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_method_help())
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--type", "--outtype", "qtype", default=None, metavar="TYPE",
              type=click.Choice(mix_names() + method_type_names(), case_sensitive=False),
              help="Quantization type (mix) of the output [default: Q8_0; for a GPTQ/AWQ/FP8/compressed-tensors "
                   "checkpoint F16 for its unquantized tensors; its quantized linears become Q4_0/Q8_0 where that is "
                   "exact for every one of them, else keep their payload]; or a calibrated type (GPTQ-W4G64, ...: "
                   "see below).")
@click.option("--method", "method", default=None, metavar="NAME",
              help="Quantize the linears of a ggml --type mix (e.g. Q4_K_M) with a calibrated method: gptq "
                   "(GPTQ error feedback with the type's own blocks as the grid; needs --calib).")
@click.option("--calib", "calib_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Calibration text: plain text, or JSONL of chat conversations ({\"messages\": [...]} per line) "
                   "rendered with the model's chat template.")
@click.option("--calib-samples", default=128, show_default=True, type=int, help="Calibration windows.")
@click.option("--calib-seqlen", default=512, show_default=True, type=int, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration window sampling.")
@click.option("--act-order", type=click.Choice(["none", "static", "g_idx"]), default="static", show_default=True,
              help="GPTQ column order: none; by descending Hessian diagonal with groups fitted before the loop "
                   "(static: contiguous groups, stays Q4_0/Q8_0-exact); or with groups in that order (g_idx "
                   "payload). Ignored with --method over ggml types.")
@click.option("--damp", default=0.01, show_default=True, type=float,
              help="GPTQ dampening: this fraction of the Hessian's mean diagonal is added to it.")
@click.option("--imatrix", "imatrix_file", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Importance matrix (llama-imatrix output, GGUF or legacy .dat) for the quantizers.")
@click.option("--keep-payload", is_flag=True,
              help="Keep a quantized checkpoint's payloads native even where a ggml type holds them exactly "
                   "(calibrated types: write the int payload, never Q4_0/Q8_0).")
@click.option("--transcode-lossy", is_flag=True,
              help="Also write asymmetric 4-bit payloads as Q4_1 (not exact: the min is rounded to fp16; the "
                   "summary prints the worst error).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def main(model_dir: Path, out: Path, qtype: str, method: str | None, calib_file: Path | None, calib_samples: int,
         calib_seqlen: int, seed: int, act_order: str, damp: float, imatrix_file: str | None, keep_payload: bool,
         transcode_lossy: bool, quiet: bool) -> None:
    """Convert the Hugging Face checkpoint in MODEL_DIR to one .qf file OUT (written atomically)."""
    from qf.quant.methods import get_spec

    try:
        spec = get_spec(qtype or "Q8_0", method) if (method or (qtype or "").upper() in type_specs()) else None
        if spec is None and calib_file is not None:
            raise QFError("--calib applies to calibrated types (GPTQ-..., or --type MIX --method gptq)")
        if spec is not None and not spec.calibrated and calib_file is not None:
            raise QFError(f"--type {spec.name} does not calibrate; --calib applies to GPTQ-... types and --method")
        if spec is not None and imatrix_file:
            raise QFError(f"--imatrix does not apply to --type {spec.name} (it calibrates with --calib)")
    except QFError as e:
        click.echo(f"qconvert: error: {e}", err=True)
        sys.exit(2)
    if spec is not None:
        _convert_calibrated(model_dir, out, spec, calib_file, calib_samples, calib_seqlen, seed, act_order, damp,
                            keep_payload, quiet)
        return
    from qf.convert.pipeline import convert  # late: keeps --help fast
    from qf.quant.imatrix import load_imatrix

    write_with_progress("qconvert", out, quiet, "converting",
                        lambda **kw: convert(model_dir, out, qtype.upper() if qtype else None,
                                             imatrix=load_imatrix(imatrix_file) if imatrix_file else None,
                                             keep_payload=keep_payload, transcode_lossy=transcode_lossy, **kw))


def _convert_calibrated(model_dir: Path, out: Path, spec, calib_file: Path | None, samples: int, seqlen: int,
                        seed: int, act_order: str, damp: float, keep_payload: bool, quiet: bool) -> None:
    """A method --type: per-layer progress lines (stderr) instead of the byte bar."""
    from dataclasses import replace

    from qf.calib.data import CalibOptions
    from qf.calib.driver import convert_calibrated

    params = spec.params
    fields = {"act_order": act_order if not getattr(params, "ggml", False) else "none", "damp": damp,
              "keep_payload": keep_payload}
    if hasattr(params, "__dataclass_fields__"):
        params = replace(params, **{k: v for k, v in fields.items() if k in params.__dataclass_fields__})
    spec = replace(spec, params=params)
    calib = CalibOptions(calib_file, samples, seqlen, seed) if calib_file is not None else None
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    write_with_progress("qconvert", out, True, "converting",
                        lambda **kw: convert_calibrated(model_dir, out, spec, calib, log=log, **kw))


if __name__ == "__main__":
    main()
