"""Evaluation and calibration text: fixed, disjoint, deterministic slices of Debian's Jargon File.

Source: the `jargon-text` Debian package (`apt-get install jargon-text`), version 4.4.7, file
`/usr/share/doc/jargon-text/jargon.txt.gz`. The decompressed text is checked against a SHA-256 so that
numbers measured on one machine compare with numbers measured on another.

Normalization (deterministic): the hard-wrapped text is cut into paragraphs at blank lines; within a
paragraph, lines are stripped and joined with one space and runs of spaces collapse to one; paragraphs
are joined with a blank line. A slice is the run of whole paragraphs whose start offset in the
normalized text lies in `[lo, hi) * len(text)`, so slices with non-overlapping ranges share no paragraph.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

from qf.format.errors import QFError

JARGON_PATH = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
JARGON_ENV = "QF_JARGON"  # overrides JARGON_PATH
# SHA-256 of the decompressed jargon.txt of jargon-text 4.4.7-4.1.
JARGON_SHA256 = "40dfb4b98191a670a09a183d5798d50f243d23fdbd1495dcc0aca2ce5895ba97"

# slice name -> [lo, hi) as fractions of the normalized text (paragraph starts); the ranges are disjoint.
SLICES: dict[str, tuple[float, float]] = {
    "calibration": (0.0, 0.5),
    "evaluation": (0.5, 1.0),
}

_SPACES = re.compile(r"[ \t]+")
_BLANK = re.compile(r"\n[ \t]*\n")


def jargon_path() -> Path:
    """Where the Jargon File is read from: $QF_JARGON, else the Debian path."""
    return Path(os.environ.get(JARGON_ENV) or JARGON_PATH)


def read_jargon(path: str | os.PathLike | None = None, *, check: bool = True) -> str:
    """The decompressed Jargon File text; raises QFError if missing or (with check) not version 4.4.7."""
    p = Path(path) if path is not None else jargon_path()
    if not p.is_file():
        raise QFError(f"{p}: Jargon File not found; install it with `apt-get install jargon-text` "
                      f"or point ${JARGON_ENV} at jargon.txt.gz")
    with gzip.open(p, "rb") as f:
        raw = f.read()
    if check:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != JARGON_SHA256:
            raise QFError(f"{p}: unexpected content (sha256 {digest}, expected {JARGON_SHA256} for "
                          f"jargon-text 4.4.7); slices would not be comparable")
    return raw.decode("utf-8")


def paragraphs(text: str) -> list[str]:
    """Hard-wrapped text -> unwrapped paragraphs (blank-line separated, spaces collapsed)."""
    text = text.replace("\r\n", "\n")
    out = []
    for block in _BLANK.split(text):
        para = _SPACES.sub(" ", " ".join(line.strip() for line in block.split("\n"))).strip()
        if para:
            out.append(para)
    return out


def slice_paragraphs(paras: list[str], lo: float, hi: float) -> list[str]:
    """The paragraphs whose start offset in '\\n\\n'.join(paras) lies in [lo, hi) * total length."""
    if not 0.0 <= lo <= hi <= 1.0:
        raise QFError(f"slice bounds must satisfy 0 <= lo <= hi <= 1, got [{lo}, {hi})")
    total = sum(len(p) for p in paras) + 2 * max(len(paras) - 1, 0)
    start, begin, end = 0, total * lo, total * hi
    picked = []
    for para in paras:
        if begin <= start < end:
            picked.append(para)
        start += len(para) + 2
    return picked


@lru_cache(maxsize=4)
def _normalized(path: str, check: bool) -> tuple[str, ...]:
    """Cached paragraphs of one source file."""
    return tuple(paragraphs(read_jargon(path, check=check)))


def get_slice(name: str, path: str | os.PathLike | None = None, *, check: bool = True) -> str:
    """The text of one named slice ('calibration' or 'evaluation')."""
    if name not in SLICES:
        raise QFError(f"unknown text slice {name!r}; known: {', '.join(SLICES)}")
    lo, hi = SLICES[name]
    paras = _normalized(str(Path(path) if path is not None else jargon_path()), check)
    return "\n\n".join(slice_paragraphs(list(paras), lo, hi)) + "\n"


def calibration_text(path: str | os.PathLike | None = None) -> str:
    """The calibration slice (for imatrix and other data-driven quantization)."""
    return get_slice("calibration", path)


def evaluation_text(path: str | os.PathLike | None = None) -> str:
    """The evaluation slice (for perplexity and KL divergence)."""
    return get_slice("evaluation", path)


def read_text_arg(text_file: Path | None, slice_name: str | None) -> str:
    """A command's text: the UTF-8 file given with -f, or a built-in slice given with --slice."""
    if text_file is not None and slice_name is not None:
        raise QFError("give either -f FILE or --slice, not both")
    if slice_name is not None:
        return get_slice(slice_name)
    if text_file is None:
        raise QFError("no text: give -f FILE or --slice NAME")
    try:
        return Path(text_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QFError(f"{text_file}: not UTF-8 text (byte {e.start})") from None


def write_slice(name: str, out: str | os.PathLike) -> Path:
    """Write one slice as UTF-8 to `out` atomically (temp file + rename); returns the path."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(get_slice(name), encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m qf.eval.text SLICE [OUT]`: print or write a slice."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in SLICES or len(args) > 2:
        print(f"usage: python -m qf.eval.text {{{','.join(SLICES)}}} [OUT]", file=sys.stderr)
        return 2
    if len(args) == 2:
        write_slice(args[0], args[1])
    else:
        sys.stdout.write(get_slice(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
