"""`qexport MODEL.qf OUT_DIR --format compressed-tensors|gptq|awq|fp8|float`: a .qf/.gguf file -> a Hugging Face
folder that transformers and vLLM load (quantized linears kept quantized; `float` dequantizes everything)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from qf.format.errors import QFError

FORMATS = ("compressed-tensors", "gptq", "awq", "fp8", "float")
DTYPES = ("float16", "bfloat16", "float32")


def _run(model: Path, out: Path, fmt: str | None, dtype: str, overwrite: bool, gptq_format: str) -> str:
    """Export and return the summary line."""
    t0 = time.perf_counter()
    if fmt == "float":
        from qf.convert.export import export_hf

        export_hf(model, out, dtype, overwrite)
        return f"wrote {out}: every tensor dequantized to {dtype}, {time.perf_counter() - t0:.1f} s"
    from qf.convert.export_quant import export_quantized

    opts = {"checkpoint_format": gptq_format} if fmt == "gptq" else {}
    s = export_quantized(model, out, fmt, dtype, overwrite, **opts)
    linears = ", ".join(f"{k} x{v}" for k, v in sorted(s.linears.items()))
    note = f"\n  {s.group_note}" if s.group_note else ""
    return (f"wrote {s.path} ({s.layout}): {sum(s.linears.values())} quantized linears ({linears}), {s.floats} "
            f"tensors as {dtype}, {time.perf_counter() - t0:.1f} s{note}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Layout of the quantized linears [default: the one the file's payloads came from, else "
                   "compressed-tensors]. float: dequantize every tensor.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True,
              help="Float type of the tensors written unquantized (embeddings, lm_head, norms).")
@click.option("--gptq-format", type=click.Choice(("gptq", "gptq_v2")), default="gptq", show_default=True,
              help="GPTQ checkpoint_format: gptq (v1, zero points stored minus one; most loaders) or gptq_v2.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def main(model: Path, out: Path, fmt: str | None, dtype: str, gptq_format: str, overwrite: bool) -> None:
    """Export MODEL (.qf/.gguf) to the Hugging Face folder OUT (written atomically)."""
    try:
        click.echo(_run(model, out, fmt, dtype, overwrite, gptq_format))
    except QFError as e:
        click.echo(f"qexport: error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"qexport: error: cannot write {out}: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
