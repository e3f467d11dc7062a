"""qinspect: print what a .qf / GGUF file holds (metadata, tokenizer, tensors); --verify checks the recorded
checksums and scans every tensor for inf/NaN (float elements, quantized blocks' scales), streamed in chunks."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import click
import numpy as np

from qf.format.checksum import CRC_KEY
from qf.format.errors import FormatError
from qf.format.ggml_types import BLOCK, FLOAT_BITS, SCALE_FIELDS
from qf.format.reader import GGUFFile, Metadata, TensorInfo, open_gguf
from qf.format.values import GGUFValueType
from qf.quant.formats.base import payload_entries

PREVIEW_ITEMS = 4  # array elements shown before "..."
PREVIEW_CHARS = 72  # string characters shown before "..."
SCAN_CHUNK_BYTES = 4 << 20  # tensor bytes looked at per step of the inf/NaN scan (bounds its memory)

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


def payload_lines(f: GGUFFile) -> list[str]:
    """Payload weights (qf.payload.*) grouped by scheme: how many linears, their member bytes, and the
    llama.cpp caveat; [] for a file of ggml types only."""
    entries = payload_entries(f.meta, str(f.path))
    if not entries:
        return []
    groups: dict[str, tuple[int, int]] = {}
    for name, scheme in entries:
        base = name[: -len("weight")]
        nbytes = sum(ti.nbytes for n, ti in f.tensors.items() if n.startswith(base + "weight_")
                     or n == base + "input_scale")
        count, total = groups.get(scheme, (0, 0))
        groups[scheme] = (count + 1, total + nbytes)
    lines = [f"  {scheme}: {count} linear weights, {total:,} bytes" for scheme, (count, total) in groups.items()]
    return lines + ["  native payloads: llama.cpp cannot run this file (it refuses the unknown tensors); qf does"]


def report(f: GGUFFile, show_tensors: bool = True) -> str:
    """The whole printout for one file."""
    out = [f"{f.path}", f"  GGUF v{f.version}, {f.file_size:,} bytes, alignment {f.alignment}, "
                      f"data at {f.data_offset:,}",
           f"metadata ({len(f.meta)} keys):", *metadata_lines(f.meta),
           "tokenizer:", *tokenizer_lines(f.meta)]
    if show_tensors:
        out += [f"tensors ({len(f.tensors)}):", *tensor_lines(f)]
    payloads = payload_lines(f)
    out += ([f"payloads ({len(payloads) - 1} schemes):", *payloads] if payloads else [])
    out += ["totals:", *total_lines(f)]
    out.append("checksums: " + ("none recorded" if not f.has_checksums else
                                "stale (recorded for another tensor table; copied by a rewriting tool)"
                                if f.checksums_stale else
                                f"crc32 for {len(f.tensors)} tensors ({CRC_KEY}); --verify checks them"))
    return "\n".join(out)


def _float_finding(ti: TensorInfo, chunk: np.ndarray, r0: int) -> tuple[str, int] | None:
    """(description of the first inf/NaN, count) in chunk, rows r0.. of a float tensor; None when all finite."""
    udt, mask = FLOAT_BITS[ti.type]
    bits = chunk.view(udt)  # [rows, ne0]
    bad = (bits & mask) == mask
    n = int(np.count_nonzero(bad))
    if not n:
        return None
    r, c = np.unravel_index(int(np.argmax(bad)), bad.shape)
    b, sign = int(bits[r, c]), 8 * bits.itemsize - 1
    what = "NaN" if b & ((1 << sign) - 1) & ~mask else ("-inf" if b >> sign else "+inf")
    return f"{what} at row {r0 + r}, column {c}", n


def _scale_finding(ti: TensorInfo, chunk: np.ndarray, r0: int) -> tuple[str, int] | None:
    """(description of the first block whose scale is inf/NaN, count of such blocks) in chunk; None if none."""
    bs, ts = BLOCK[ti.type]
    per_row = chunk.shape[1] // ts
    blocks = chunk.reshape(-1, ts)  # [rows * per_row, ts]
    first: tuple[int, str, str] | None = None
    any_bad = np.zeros(blocks.shape[0], dtype=bool)
    for name, off, dt in SCALE_FIELDS[ti.type]:
        if dt == "e8m0":
            bad = blocks[:, off] == 0xFF
            kind = "0xFF (NaN in E8M0)"
        else:
            v = np.ascontiguousarray(blocks[:, off:off + np.dtype(dt).itemsize]).view(dt)[:, 0]
            bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.argmax(bad))
            if dt != "e8m0":
                kind = "NaN" if np.isnan(v[i]) else ("+inf" if v[i] > 0 else "-inf")
            if first is None or i < first[0]:
                first = (i, name, kind)
            any_bad |= bad
    if first is None:
        return None
    i, name, kind = first
    r, k = divmod(i, per_row)
    return (f"{name} is {kind} in block {(r0 + r) * per_row + k} (row {r0 + r}, block {k} of the row)",
            int(np.count_nonzero(any_bad)))


def nonfinite(f: GGUFFile, ti: TensorInfo, chunk_bytes: int = SCAN_CHUNK_BYTES) -> str | None:
    """The first inf/NaN of a tensor, described ('+inf at row 0, column 3 (8 values)'); None when finite or
    when its type holds no float (integers, IQ1_M). Streams chunk_bytes of rows at a time."""
    if ti.type in FLOAT_BITS:
        scan, unit = _float_finding, "values"
    elif ti.type in SCALE_FIELDS:
        scan, unit = _scale_finding, "blocks"
    else:
        return None
    raw = f.raw(ti.name)  # [n_rows, row_bytes], a view of the mmap
    rows = max(1, chunk_bytes // max(ti.row_bytes, 1))
    first, total = None, 0
    for r0 in range(0, ti.n_rows if ti.row_bytes else 0, rows):
        found = scan(ti, raw[r0:r0 + rows], r0)
        if found is not None:
            first = first or found[0]
            total += found[1]
    return None if first is None else f"{first} ({total} {unit} in all)"


def verify_finite(f: GGUFFile) -> int:
    """Scan every tensor for inf/NaN and print what is found; the number of tensors with any."""
    bad = 0
    for ti in f.tensors.values():
        found = nonfinite(f, ti)
        if found is not None:
            what = "scale" if ti.type in SCALE_FIELDS else "value"
            click.echo(f"non-finite {what}: {ti.name} ({ti.type.name}): {found}")
            bad += 1
    click.echo(f"verify: {len(f.tensors) - bad} of {len(f.tensors)} tensors finite"
               + ("" if not bad else f", {bad} with inf/NaN"))
    return bad


def verify_checksums(f: GGUFFile) -> int:
    """Recompute the checksums and print the result; the number of mismatches (0 when none are recorded)."""
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
    return len(bad)


def verify(f: GGUFFile) -> int:
    """Checksums, then the inf/NaN scan; exit code 0 (all good) or 1 (a mismatch or a non-finite tensor)."""
    mismatches = verify_checksums(f)
    return 1 if verify_finite(f) + mismatches else 0


@click.command()
@click.argument("file", type=click.Path(dir_okay=True))
@click.option("--verify", "do_verify", is_flag=True,
              help="Recompute per-tensor checksums and scan tensors for inf/NaN; exit 1 on either.")
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
