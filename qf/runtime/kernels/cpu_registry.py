"""The one registration place for CPU kernels: each decoder module registers its types when imported.

A decoder module calls `register(DECODERS)` (f32 decoders, cpu_decoder.Decoder) and/or `register_int(...)`
(integer decoders, cpu_idecode.IntDecoder) at import; `load()` imports every module of `MODULES`, the only
list a new decoder module joins. A type registered twice is an error, so two modules cannot silently
disagree.

numba's disk cache only watches the source file of a cached function, not the modules it inlines, so the
drivers' kind types carry `source_stamp()`: a hash of every registered module and, transitively, every
module of this package they import (read from their import statements), so nothing needs listing by hand.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import sys
from pathlib import Path
from typing import Any, Mapping

from qf.format.ggml_types import GGMLType

PACKAGE = "qf.runtime.kernels"

# Decoder modules (in this package), imported by load(); each registers its types.
MODULES = ("cpu_float", "cpu_legacy", "cpu_kquants", "cpu_iq", "cpu_idecode", "cpu_iq_low")

DECODERS: dict[GGMLType, Any] = {}  # ggml type -> cpu_decoder.Decoder
INT_DECODERS: dict[GGMLType, Any] = {}  # ggml type -> cpu_idecode.IntDecoder
_OWNERS: set[str] = set()  # registering modules (their names)


def _add(table: dict[GGMLType, Any], entries: Mapping[GGMLType, Any], what: str) -> None:
    """Merge entries into table; a type already there is an error."""
    for t, dec in entries.items():
        t = GGMLType(t)
        if t in table:
            raise ValueError(f"{what} for {t.name} registered twice")
        table[t] = dec


def _owner() -> str:
    """Name of the module calling register / register_int."""
    return sys._getframe(2).f_globals["__name__"]


def register(entries: Mapping[GGMLType, Any]) -> dict[GGMLType, Any]:
    """Register f32 decoders {type: Decoder} of the calling module; returns entries as a dict."""
    _add(DECODERS, entries, "a CPU decoder")
    _OWNERS.add(_owner())
    return dict(entries)


def register_int(entries: Mapping[GGMLType, Any]) -> dict[GGMLType, Any]:
    """Register integer decoders {type: IntDecoder} of the calling module; returns entries as a dict."""
    _add(INT_DECODERS, entries, "an integer decoder")
    _OWNERS.add(_owner())
    return dict(entries)


def load() -> None:
    """Import every decoder module (each registers itself; importing twice registers nothing new)."""
    for name in MODULES:
        importlib.import_module(f"{PACKAGE}.{name}")


def _kernel_imports(path: Path) -> set[str]:
    """Modules of this package that the source at path imports (short names)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:
                out.update(a.name for a in node.names)
            elif node.module.startswith(PACKAGE + "."):
                out.add(node.module[len(PACKAGE) + 1:])
        elif isinstance(node, ast.Import):
            out.update(a.name[len(PACKAGE) + 1:] for a in node.names if a.name.startswith(PACKAGE + "."))
    return out


def source_stamp(extra: tuple[str, ...] = ()) -> str:
    """Short hash of the registered modules, the modules `extra` names and every package module they import."""
    here = Path(__file__).parent
    todo = sorted({n.rsplit(".", 1)[-1] for n in _OWNERS} | set(extra))
    seen: set[str] = set()
    try:
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo.extend(_kernel_imports(here / f"{name}.py") - seen)
        h = hashlib.sha1()
        for name in sorted(seen):
            h.update(name.encode() + b"\0" + (here / f"{name}.py").read_bytes())
    except OSError:  # no source files (e.g. a zipped install): numba cannot cache then either
        return "nosrc"
    return h.hexdigest()[:12]
