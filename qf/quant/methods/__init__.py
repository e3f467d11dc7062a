"""Registry of calibrated quantization methods (`qconvert --type GPTQ-W4G64 --calib FILE`, `--type Q4_K_M
--method gptq`). Each module of METHOD_MODULES exports METHOD (a qf.quant.methods.base.Method); add a method by
appending its module here."""

from __future__ import annotations

import importlib
from functools import cache

from qf.format.errors import QFError
from qf.quant.methods.base import (
    INPUT_GROUPS, LINEAR_ROLES, CalibLayer, InputGroup, LinearInfo, LinearPlan, LinearTarget, Method, TypeSpec,
)

METHOD_MODULES: tuple[str, ...] = (
    "qf.quant.methods.gptq",
    "qf.quant.methods.fp8",
    "qf.quant.methods.awq",
)


@cache
def methods() -> dict[str, Method]:
    """Every registered method by name."""
    out = {}
    for mod in METHOD_MODULES:
        m = importlib.import_module(mod).METHOD
        out[m.name] = m
    return out


@cache
def type_specs() -> dict[str, TypeSpec]:
    """Every calibrated --type name (upper case) -> its spec."""
    return {s.name.upper(): s for m in methods().values() for s in m.type_specs()}


def method_type_names() -> list[str]:
    """The --type names the methods add, in registry order."""
    return [s.name for s in type_specs().values()]


def get_spec(qtype: str, method: str | None = None) -> TypeSpec | None:
    """The spec of a method --type name, or of `--type MIX --method NAME`; None for a plain mix without
    a method. QFError for an unknown method or a mix the method cannot work over."""
    if method is None:
        return type_specs().get(qtype.upper())
    m = methods().get(method.lower())
    if m is None:
        raise QFError(f"unknown --method {method!r}; known: {', '.join(methods())}")
    if qtype.upper() in type_specs():
        raise QFError(f"--type {qtype} already names its method; --method {method} applies to ggml mixes")
    spec = m.over_mix(qtype.upper())
    if spec is None:
        raise QFError(f"--method {method} cannot quantize --type {qtype}")
    return spec


__all__ = ["INPUT_GROUPS", "LINEAR_ROLES", "METHOD_MODULES", "CalibLayer", "InputGroup", "LinearInfo",
           "LinearPlan", "LinearTarget", "Method", "TypeSpec", "get_spec", "method_type_names", "methods",
           "type_specs"]
