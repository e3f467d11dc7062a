"""qinspect: print what a .qf / GGUF file holds (metadata, tokenizer, tensors) and verify its checksums."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import click
import numpy as np

from qf.format.checksum import CRC_KEY
from qf.format.errors import FormatError
from qf.format.reader import GGUFFile, Metadata, open_gguf
from qf.format.values import GGUFValueType

PREVIEW_ITEMS = 4  # array elements shown before "..."
PREVIEW_CHARS = 72  # string characters shown before "..."

# Tokenizer summary lines: label -> metadata key (token ids are also resolved to their text).
TOKENIZER_FIELDS: dict[str, str] = {
    "model": "tokenizer.ggml.model",
    "pre": "tokenizer.ggml.pre",
}
TOKENIZER_IDS: dict[str, str] = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


def _short(s: str) -> str:
    """repr of s, cut to PREVIEW_CHARS with its full length noted."""
    if len(s) <= PREVIEW_CHARS:
        return repr(s)
    return f"{s[:PREVIEW_CHARS]!r}... ({len(s)} chars)"


def format_value(vtype: GGUFValueType, elem: GGUFValueType | None, value: Any) -> str:
    """One metadata value for display; long strings and arrays summarized."""
    if vtype is GGUFValueType.STRING:
        return _short(value)
    if vtype is GGUFValueType.FLOAT32:
        return str(np.float32(value))  # shortest text that round-trips the stored f32
    if vtype is not GGUFValueType.ARRAY:
        return str(value)
    items = value.tolist() if isinstance(value, np.ndarray) else value
    shown = [_short(v) if isinstance(v, str) else ("[...]" if isinstance(v, (list, np.ndarray)) else str(v))
             for v in items[:PREVIEW_ITEMS]]
    more = ", ..." if len(items) > PREVIEW_ITEMS else ""
    return f"[{elem.name} x {len(items)}] [{', '.join(shown)}{more}]"


def metadata_lines(meta: Metadata) -> list[str]:
    """'key  TYPE  value' for every key."""
    width = max((len(k) for k in meta.keys()), default=0)
    lines = []
    for key in meta.keys():
        vtype, value = meta.raw(key)
        tname = "" if vtype is GGUFValueType.ARRAY else vtype.name
        lines.append(f"  {key:<{width}}  {tname:<7}  {format_value(vtype, meta.elem_type(key), value)}")
    return lines


def _token_text(tokens: list[str] | None, i: int) -> str:
    return f" {tokens[i]!r}" if tokens is not None and 0 <= i < len(tokens) else ""


def tokenizer_lines(meta: Metadata) -> list[str]:
    """Model, pre-tokenizer, vocabulary and merge counts, special ids, chat template presence."""
    if "tokenizer.ggml.model" not in meta and "tokenizer.ggml.tokens" not in meta:
        return ["  (no tokenizer in this file)"]
    lines = [f"  {label}: {meta.get_str(key, '-')}" for label, key in TOKENIZER_FIELDS.items()]
    tokens = meta.get_array("tokenizer.ggml.tokens", None, elem=GGUFValueType.STRING)
    merges = meta.get_array("tokenizer.ggml.merges", None, elem=GGUFValueType.STRING)
    lines.append(f"  vocab size: {'-' if tokens is None else len(tokens)}")
    lines.append(f"  merges: {'-' if merges is None else len(merges)}")
    for label, key in TOKENIZER_IDS.items():
        if key in meta:
            i = meta.get_int(key)
            lines.append(f"  {label}: {i}{_token_text(tokens, i)}")
    tmpl = meta.get_str("tokenizer.chat_template", None)
    lines.append(f"  chat template: {'no' if tmpl is None else f'yes ({len(tmpl)} chars)'}")
    return lines


def tensor_lines(f: GGUFFile) -> list[str]:
    """A table of name, type, shape (numpy order), bytes."""
    width = max([4, *(len(n) for n in f.tensors)])
    lines = [f"  {'name':<{width}}  {'type':<7}  {'shape':<18}  {'bytes':>12}"]
    for ti in f.tensors.values():
        shape = "x".join(str(d) for d in ti.shape) or "scalar"
        lines.append(f"  {ti.name:<{width}}  {ti.type.name:<7}  {shape:<18}  {ti.nbytes:>12,}")
    return lines


def total_lines(f: GGUFFile) -> list[str]:
    """Tensor count, weights, bytes, bits per weight, tensors per type."""
    n_w = sum(ti.n_elements for ti in f.tensors.values())
    n_b = sum(ti.nbytes for ti in f.tensors.values())
    bpw = f"{n_b * 8 / n_w:.3f}" if n_w else "-"
    types = Counter(ti.type.name for ti in f.tensors.values())
    return [f"  {len(f.tensors)} tensors, {n_w:,} weights, {n_b:,} bytes ({n_b / 2**20:.1f} MiB), "
            f"{bpw} bits per weight",
            "  types: " + ", ".join(f"{t} x{n}" for t, n in types.most_common())]


def report(f: GGUFFile, show_tensors: bool = True) -> str:
    """The whole printout for one file."""
    out = [f"{f.path}", f"  GGUF v{f.version}, {f.file_size:,} bytes, alignment {f.alignment}, "
                      f"data at {f.data_offset:,}",
           f"metadata ({len(f.meta)} keys):", *metadata_lines(f.meta),
           "tokenizer:", *tokenizer_lines(f.meta)]
    if show_tensors:
        out += [f"tensors ({len(f.tensors)}):", *tensor_lines(f)]
    out += ["totals:", *total_lines(f)]
    out.append("checksums: " + ("none recorded" if not f.has_checksums else
                                "stale (recorded for another tensor table; copied by a rewriting tool)"
                                if f.checksums_stale else
                                f"crc32 for {len(f.tensors)} tensors ({CRC_KEY}); --verify checks them"))
    return "\n".join(out)


def verify(f: GGUFFile) -> int:
    """Recompute the checksums, print the result; exit code 0 (pass or none recorded) or 1 (mismatch)."""
    if not f.has_checksums:
        click.echo(f"verify: no checksums recorded ({CRC_KEY} absent): nothing to verify")
        return 0
    if f.checksums_stale:
        click.echo(f"verify: the checksums ({CRC_KEY}) were recorded for a different tensor table: this file "
                   "was rewritten by a tool that copied the qf.* keys along (e.g. llama-quantize); nothing to verify")
        return 0
    bad = f.verify()
    for name in bad:
        click.echo(f"checksum mismatch: {name}")
    click.echo(f"verify: {len(f.tensors) - len(bad)} of {len(f.tensors)} tensors pass"
               + ("" if not bad else f", {len(bad)} FAIL"))
    return 1 if bad else 0


@click.command()
@click.argument("file", type=click.Path(dir_okay=True))
@click.option("--verify", "do_verify", is_flag=True, help="Recompute per-tensor checksums; exit 1 on a mismatch.")
@click.option("--tensors/--no-tensors", default=True, help="Print the tensor table.")
def main(file: str, do_verify: bool, tensors: bool) -> None:
    """Print the metadata, tokenizer summary and tensor table of a .qf / GGUF FILE."""
    try:
        with open_gguf(file) as f:
            click.echo(report(f, tensors))
            code = verify(f) if do_verify else 0
    except FormatError as e:
        click.echo(f"qinspect: error: {e}", err=True)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
