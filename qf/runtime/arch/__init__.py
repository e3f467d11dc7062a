"""One module per architecture: each exports ARCHS (GGUF general.architecture -> the spec its forward class
gets) and FORWARD (the class, built from qf.runtime.arch.blocks). Discovered here; nothing central to edit."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def all_forwards() -> dict[str, tuple[Any, type]]:
    """general.architecture -> (spec, forward class), over every module of this package that exports both."""
    out: dict[str, tuple[Any, type]] = {}
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{mod.name}")
        if hasattr(module, "ARCHS") and hasattr(module, "FORWARD"):
            out.update({name: (spec, module.FORWARD) for name, spec in module.ARCHS.items()})
    return out


def supported_architectures() -> tuple[str, ...]:
    """GGUF architectures the runtime runs."""
    return tuple(all_forwards())
