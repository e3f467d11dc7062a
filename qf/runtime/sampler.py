"""Next-token sampling: repetition penalty, top-k, top-p, min-p, temperature (llama.cpp's order), seeded.

Parameters are validated when SamplingParams is built (SamplingError names the parameter and its range).
Logits may hold -inf (a constraint forbidding a token); NaN or +inf, or no token left at all, raise
NonFiniteLogitsError instead of sampling a meaningless token.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from qf.format.errors import QFError

_F32_MAX = float(np.finfo(np.float32).max)
_MAX_SEED = 1 << 64


class SamplingError(QFError, ValueError):
    """A sampling parameter has the wrong type or is out of range (`parameter` names it)."""

    def __init__(self, parameter: str, value: Any, expected: str) -> None:
        self.parameter = parameter
        super().__init__(f"sampling parameter {parameter}={value!r}: expected {expected}")


class NonFiniteLogitsError(QFError):
    """The logits to sample from hold NaN or +inf, or forbid every token."""


def _real(v: Any) -> float | None:
    """v as a finite float, or None when it is not a finite real number (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _integer(v: Any) -> int | None:
    """v as an int, or None when it is not an integer (bools and integral floats are not integers here)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        return None
    return int(v)


# parameter -> (converter, range check, what is expected); data for SamplingParams.__post_init__.
_PARAMETERS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], bool], str]] = {
    "temperature": (_real, lambda v: True, "a finite number (<= 0 means greedy)"),
    "top_k": (_integer, lambda v: True, "an integer (<= 0 means off)"),
    "top_p": (_real, lambda v: v >= 0.0, "a finite number >= 0 (>= 1 means off)"),
    "min_p": (_real, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1] (0 means off)"),
    "repeat_penalty": (_real, lambda v: v > 0.0, "a finite number > 0 (1 means off)"),
    "repeat_last_n": (_integer, lambda v: v >= 0, "an integer >= 0"),
    "seed": (_integer, lambda v: 0 <= v < _MAX_SEED, "None or an integer in [0, 2**64)"),
}


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; defaults follow llama.cpp. temperature <= 0 means greedy."""

    temperature: float = 0.8
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # >= 1: off
    min_p: float = 0.05  # <= 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, (convert, in_range, expected) in _PARAMETERS.items():
            raw = getattr(self, name)
            if name == "seed" and raw is None:
                continue
            value = convert(raw)
            if value is None or not in_range(value):
                raise SamplingError(name, raw, expected)
            object.__setattr__(self, name, value)  # numpy scalars become plain Python numbers

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken."""
        return self.temperature <= 0 or self.top_k == 1


class Sampler:
    """Picks the next token from logits; owns its random generator (one per generation, no global state)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """One token id from logits f32 [n_vocab], given the tokens so far (for the repetition penalty)."""
        p = self.params
        logits = checked_logits(logits)
        if p.repeat_penalty != 1.0 and p.repeat_last_n > 0 and len(history):
            logits = apply_repeat_penalty(logits, history[-p.repeat_last_n:], p.repeat_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        ids, vals = top_k(logits, p.top_k)  # sorted, most likely first
        keep = int(np.count_nonzero(vals > -np.inf))  # forbidden tokens are never drawn
        probs = softmax(vals)
        if p.top_p < 1.0:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)  # smallest set with mass >= p
        if p.min_p > 0.0:
            keep = min(keep, int(np.count_nonzero(probs >= p.min_p * probs[0])))
        keep = max(keep, 1)
        with np.errstate(over="ignore"):  # a tiny temperature: gaps of -inf, i.e. greedy among ties
            final = softmax((vals[:keep].astype(np.float64) - float(vals[0])) / p.temperature)
        return int(ids[self.rng.choice(keep, p=final)])


def checked_logits(logits: Any) -> np.ndarray:
    """logits as f32 [n_vocab] with at least one allowed token; NonFiniteLogitsError on NaN / +inf."""
    try:
        with np.errstate(over="ignore"):  # a float64 beyond the f32 range becomes +inf, reported below
            x = np.asarray(logits, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise NonFiniteLogitsError(f"logits: expected a 1-D array of numbers ({e})") from e
    if x.ndim != 1 or x.size == 0:
        raise NonFiniteLogitsError(f"logits: expected a 1-D array with one value per token, got shape {x.shape}")
    bad = np.isnan(x) | (x == np.inf)
    if bad.any():
        i = int(np.argmax(bad))
        raise NonFiniteLogitsError(f"logits hold {int(bad.sum())} NaN/+inf value(s) among {x.size} (first: token {i} "
                                   f"= {x[i]}); the forward pass produced non-finite values")
    if not (x > -np.inf).any():
        raise NonFiniteLogitsError(f"every one of the {x.size} logits is -inf: no token is allowed")
    return x


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp's penalty: positive logits of recent tokens divided by it, negative ones multiplied
    (saturating at the f32 range, so a tiny or huge penalty cannot turn a logit into +-inf)."""
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < len(out))]
    v = out[ids].astype(np.float64)
    with np.errstate(over="ignore"):
        scaled = np.clip(np.where(v > 0, v / penalty, v * penalty), -_F32_MAX, _F32_MAX)
    out[ids] = np.where(np.isfinite(v), scaled, v)  # a forbidden (-inf) token stays forbidden
    return out


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best ids and their logits, best first (all of them when k <= 0)."""
    n = len(logits)
    if 0 < k < n:
        ids = np.argpartition(-logits, k - 1)[:k]
    else:
        ids = np.arange(n)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    return ids, logits[ids]


def softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax in float64 (probabilities must sum to 1 for Generator.choice); -inf -> 0."""
    x = x.astype(np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()
