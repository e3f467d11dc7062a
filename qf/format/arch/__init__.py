"""One module per architecture family, each exporting MODELS (a tuple of qf.format.tensor_roles.ModelArch):
the tensor tables the validator, the runtime and the converter share. Discovered here; nothing central to edit."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from qf.format.tensor_roles import ModelArch


@lru_cache(maxsize=1)
def all_models() -> dict[str, ModelArch]:
    """general.architecture -> its ModelArch, over every module of this package (module-name order)."""
    out: dict[str, ModelArch] = {}
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        for m in getattr(importlib.import_module(f"{__name__}.{mod.name}"), "MODELS", ()):
            out[m.name] = m
    return out


def model_arch(name: str) -> ModelArch | None:
    """The ModelArch of a GGUF architecture name, or None when unknown."""
    return all_models().get(name)


def known_archs() -> tuple[str, ...]:
    """Every GGUF architecture name with a ModelArch."""
    return tuple(all_models())
