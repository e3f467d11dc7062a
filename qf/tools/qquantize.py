"""`qquantize IN OUT --type Q4_K_M`: requantize a GGUF/.qf file to another type or mix (like llama-quantize).

Per-tensor options follow llama-quantize: --pure, --tensor-type PATTERN=TYPE (repeatable; PATTERN is a
Python regular expression searched anywhere in the tensor name, so a plain substring such as `attn_v`
works and `^blk\\.0\\.` pins one layer; the first matching option wins), --output-tensor-type and
--token-embedding-type. Types have to be F32/F16/BF16 unless --allow-requantize. --imatrix FILE (llama.cpp's
GGUF or legacy .dat importance matrix) weights the quantizers' error by each column's importance and
records the quantize.imatrix.* keys, as llama-quantize does.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from qf.format.errors import QFError
from qf.quant.mixes import Overrides, mix_names
from qf.tools.qconvert import write_with_progress


def _storage_type(ctx: click.Context, param: click.Parameter, value: str | None):
    """click callback: a ggml type name that can be written, or None."""
    from qf.quant.requantize import parse_storage_type

    if value is None:
        return None
    try:
        return parse_storage_type(value)
    except QFError as e:
        raise click.BadParameter(str(e)) from None


def _tensor_types(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]):
    """click callback: each PATTERN=TYPE parsed and checked."""
    from qf.quant.requantize import parse_tensor_type

    try:
        return tuple(parse_tensor_type(v) for v in values)
    except QFError as e:
        raise click.BadParameter(str(e)) from None


def _refuse_payloads(src: Path) -> None:
    """QFError when src holds native payloads (GPTQ/AWQ/FP8 weights): requantizing works on ggml tensors only."""
    from qf.format.reader import open_gguf
    from qf.quant.formats.base import payload_entries

    with open_gguf(src) as f:
        entries = payload_entries(f.meta, str(src))
    if entries:
        name, scheme = entries[0]
        raise QFError(f"{src} holds {len(entries)} native payload weights (e.g. {name}: {scheme}); qquantize "
                      "requantizes ggml tensors only. Convert the unquantized checkpoint with `qconvert --type`, "
                      "or convert the quantized one without --keep-payload (symmetric 4/8-bit payloads become "
                      "Q4_0/Q8_0 exactly where every weight allows it)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", metavar="IN", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--type", "qtype", required=True, type=click.Choice(mix_names(), case_sensitive=False),
              help="Quantization type (mix) of the output.")
@click.option("--allow-requantize", is_flag=True,
              help="Also requantize tensors that are already quantized (dequantized first; loses quality).")
@click.option("--pure", is_flag=True, help="Every quantizable tensor gets the default type: no per-tensor mix rules.")
@click.option("--tensor-type", "tensor_types", multiple=True, callback=_tensor_types, metavar="PATTERN=TYPE",
              help="Type for tensors whose name matches the regex PATTERN (repeatable; first match wins).")
@click.option("--output-tensor-type", callback=_storage_type, metavar="TYPE", help="Type of output.weight.")
@click.option("--token-embedding-type", callback=_storage_type, metavar="TYPE", help="Type of token_embd.weight.")
@click.option("--imatrix", "imatrix_file", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Importance matrix (llama-imatrix output, GGUF or legacy .dat) for the quantizers.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def main(src: Path, out: Path, qtype: str, allow_requantize: bool, pure: bool, tensor_types, output_tensor_type,
         token_embedding_type, imatrix_file: str | None, quiet: bool) -> None:
    """Requantize the GGUF/.qf file IN to OUT (written atomically), keeping all its metadata."""
    from qf.quant.imatrix import load_imatrix
    from qf.quant.requantize import RequantizeWarning, requantize  # late: keeps --help fast

    try:
        _refuse_payloads(src)
    except QFError as e:  # as write_with_progress reports errors: one line, exit 2
        click.echo(f"qquantize: error: {e}", err=True)
        sys.exit(2)
    overrides = Overrides(pure=pure, tensor_types=tensor_types, output_type=output_tensor_type,
                          token_embd_type=token_embedding_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RequantizeWarning)
        try:
            write_with_progress("qquantize", out, quiet, "quantizing",
                                lambda **kw: requantize(src, out, qtype.upper(), overrides, allow_requantize,
                                                        imatrix=load_imatrix(imatrix_file) if imatrix_file else None,
                                                        **kw))
        finally:
            for w in caught:
                if issubclass(w.category, RequantizeWarning):
                    click.echo(f"qquantize: warning: {w.message}", err=True)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


if __name__ == "__main__":
    main()
