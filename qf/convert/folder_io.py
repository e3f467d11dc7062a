"""Write a whole folder atomically: build it in a hidden temp sibling, fsync, then rename it into place."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qf.format.errors import ConvertError
from qf.format.writer import pid_alive

TMP_MARK = ".tmp-"


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Pretty JSON file."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync_tree(d: Path) -> None:
    """Flush every file of a folder and the folder itself to disk."""
    for p in d.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Delete '.<name>.tmp-<pid>-<hex>' folders of out_dir left by writers whose process is gone."""
    removed = []
    prefix = f".{out_dir.name}{TMP_MARK}"
    if not out_dir.parent.is_dir():
        return removed
    for p in out_dir.parent.iterdir():
        pid = p.name[len(prefix):].split("-", 1)[0] if p.name.startswith(prefix) else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temp folder onto out_dir (replacing it only when overwrite)."""
    if out_dir.exists() and not overwrite:
        raise ConvertError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces out_dir, on any error it is removed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConvertError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
