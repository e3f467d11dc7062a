"""Refuse an output path that is one of a tool's inputs (directly, through a symlink, a relative path or a hard link).

The writers replace their output by rename, so `qconvert d d/model.safetensors` or `qquantize m.gguf m.gguf`
would otherwise swap a checkpoint for the file made from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from qf.format.errors import QFError


def _same(a: Path, b: Path) -> bool:
    """Both name one file: the same resolved path, or (both existing) the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def refuse_input_as_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                           error: type[QFError]) -> None:
    """Raise `error` naming both paths when out resolves to any existing input file; nothing is touched."""
    out = Path(out)
    for p in inputs:
        if p is not None and Path(p).exists() and _same(out, Path(p)):
            raise error(f"{out}: the output path is the input file {p}; writing it would replace the input "
                        "(choose another output path)")


def refuse_folder_over_input(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                             error: type[QFError]) -> None:
    """Raise `error` when a folder to be (re)placed at out_dir is, or contains, an input file."""
    root = Path(os.path.realpath(out_dir))
    for p in inputs:
        real = Path(os.path.realpath(p))
        if real == root or root in real.parents:
            raise error(f"{out_dir}: the output folder holds the input file {p}; replacing it would delete the "
                        "input (choose another output folder)")
