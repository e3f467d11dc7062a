"""The KV cache options shared by qrun, qperplexity and qbench (llama.cpp's -ctk / -ctv spellings)."""

from __future__ import annotations

from typing import Any, Callable

import click

from qf.runtime.kv_cache import DEFAULT_KV_TYPE, KV_TYPES


def kv_cache_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add -ctk/--cache-type-k and -ctv/--cache-type-v (passed as type_k, type_v)."""
    choice = click.Choice(list(KV_TYPES), case_sensitive=False)
    fn = click.option("-ctv", "--cache-type-v", "type_v", type=choice, default=DEFAULT_KV_TYPE, show_default=True,
                      help="KV cache type for V (q8_0/q4_0 are stored Hadamard-rotated, as llama.cpp does).")(fn)
    return click.option("-ctk", "--cache-type-k", "type_k", type=choice, default=DEFAULT_KV_TYPE, show_default=True,
                        help="KV cache type for K.")(fn)
