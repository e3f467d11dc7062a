"""Calling a compiled numba kernel without its dispatcher, for calls made hundreds of times per token.

numba's dispatcher types every argument on every call; an argument of a custom type (a decoder `Kind`, the
integer ISA, a repack stamp) goes through Python and costs ~0.5 us. On SmolLM2's decode step that is ~4.5 us
per merged product, 120 products per token. `entry_point` resolves the compiled code once for a fixed set of
argument types (compiling it, or loading it from numba's disk cache, like a first call) and returns numba's
own entry point for it, which unboxes the arguments by that signature without typing them again.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


def entry_point(dispatcher: Any, args: Sequence[Any]) -> Callable[..., Any]:
    """A callable running dispatcher's compiled code for args' numba types.

    The caller must pass arguments of exactly those types on every later call (arrays of the same dtype,
    dimensions, layout and writability; objects of the same numba type): the entry point does not check them.
    Falls back to the dispatcher itself where numba does not expose compiled overloads (NUMBA_DISABLE_JIT)."""
    try:
        sig = tuple(dispatcher.typeof_pyval(a) for a in args)
        cres = dispatcher.overloads.get(sig)
        return cres.entry_point if cres is not None else dispatcher.compile(sig)
    except AttributeError:
        return dispatcher
