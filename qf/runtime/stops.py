"""Stop strings over streamed text, in time linear in the text: a KMP matcher per stop string."""

from __future__ import annotations

from array import array
from collections import deque
from typing import Iterable, Sequence

from qf.format.errors import QFError

MAX_STOPS = 64  # stop strings one generation may watch for
MAX_STOP_CHARS = 1 << 20  # their total length, in characters


class StopStringError(QFError, ValueError):
    """The stop strings are not a list of strings, or too many / too long."""


class _Matcher:
    """Knuth-Morris-Pratt over one stop string: how much of it the text seen so far ends with."""

    def __init__(self, stop: str) -> None:
        self.stop, self.first = stop, stop[0]
        self.q = 0  # length of the longest suffix of the text so far that is a prefix of stop
        self.borders = array("q")  # borders[i]: longest proper border of stop[:i + 1], filled on demand

    def border(self, q: int) -> int:
        """Length of the longest proper border of stop[:q] (extends the failure function up to q)."""
        s, b = self.stop, self.borders
        for i in range(len(b), q):
            k = b[i - 1] if i else 0
            while k and s[k] != s[i]:
                k = b[k - 1]
            b.append(k + 1 if i and s[k] == s[i] else 0)
        return b[q - 1]

    def scan(self, text: str) -> int:
        """Advance over text; the end (in text) of the first complete occurrence, or -1 (state kept)."""
        s, n, size = self.stop, len(text), len(self.stop)
        q, i = self.q, 0
        while i < n and q < size:
            if q == 0:
                i = text.find(self.first, i)
                if i < 0:
                    break
                q, i = 1, i + 1
                continue
            r = _common_prefix(text, i, s, q, min(n - i, size - q))
            q, i = q + r, i + r
            if q < size and i < n:  # text[i] breaks the partial match: fall back along the borders
                c = text[i]
                while q and s[q] != c:
                    q = self.border(q)
                q, i = q + (s[q] == c), i + 1
        if q == size:
            self.q = 0
            return i
        self.q = q
        return -1


def _common_prefix(text: str, i: int, s: str, q: int, limit: int) -> int:
    """How many characters text[i:] and s[q:] share (at most limit), by galloping C-level comparisons."""
    if limit <= 0 or text[i] != s[q]:
        return 0
    lo, step = 1, 1  # text[i:i + lo] == s[q:q + lo]
    while lo < limit:
        m = min(step, limit - lo)
        if not s.startswith(text[i + lo:i + lo + m], q + lo):
            hi = lo + m  # the first difference lies in [lo, hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if s.startswith(text[i + lo:i + mid], q + lo):
                    lo = mid
                else:
                    hi = mid
            return lo
        lo, step = lo + m, step * 2
    return lo


def _checked_stops(stops: Iterable[str]) -> list[str]:
    """The non-empty stop strings; StopStringError for a bare string, a non-string, or too many / too long."""
    if isinstance(stops, (str, bytes)):
        raise StopStringError(f"stop strings: expected a list of strings, got a single {type(stops).__name__} "
                              f"{stops[:40]!r} (wrap it in a list)")
    out, total = [], 0
    for i, s in enumerate(stops):
        if i >= MAX_STOPS:
            raise StopStringError(f"stop strings: more than {MAX_STOPS} given (at most {MAX_STOPS})")
        if not isinstance(s, str):
            raise StopStringError(f"stop string {i}: expected a str, got {type(s).__name__}")
        total += len(s)
        if total > MAX_STOP_CHARS:
            raise StopStringError(f"stop strings: more than {MAX_STOP_CHARS} characters in all "
                                  f"(at most {MAX_STOP_CHARS})")
        if s:
            out.append(s)
    return out


class StopFilter:
    """Holds back text that might be the start of a stop string; reports when one appears.

    At most MAX_STOPS (64) stop strings of MAX_STOP_CHARS (1 MiB) characters in all (StopStringError
    otherwise); empty ones are ignored. Each push costs O(len(text)) amortised per stop string, however
    long the stop strings or the held-back text: a Knuth-Morris-Pratt state per stop string (its failure
    function built lazily, only as far as the text has matched), the held-back text kept as chunks.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = _checked_stops(stops)
        self._matchers = [_Matcher(s) for s in self.stops]
        self._held: deque[str] = deque()  # text not emitted yet: a suffix that may start a stop string
        self._held_len = 0

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, stopped?) after appending text."""
        if not self.stops:
            return text, False
        starts = [self._held_len + end - len(m.stop) for m in self._matchers if (end := m.scan(text)) >= 0]
        if starts:
            out = ("".join(self._held) + text)[:min(starts)]
            self._reset()
            return out, True
        hold = max(m.q for m in self._matchers)
        self._held.append(text)
        self._held_len += len(text)
        return self._emit(self._held_len - hold), False

    def flush(self) -> str:
        """Text held back when generation ends without a stop string."""
        out = "".join(self._held)
        self._reset()
        return out

    def _emit(self, n: int) -> str:
        """Take the first n held characters off the front."""
        parts, self._held_len = [], self._held_len - n
        while n > 0:
            chunk = self._held.popleft()
            if len(chunk) > n:
                self._held.appendleft(chunk[n:])
                chunk = chunk[:n]
            parts.append(chunk)
            n -= len(chunk)
        return "".join(parts)

    def _reset(self) -> None:
        """Forget held text and partial matches (after a stop, or a flush)."""
        self._held.clear()
        self._held_len = 0
        for m in self._matchers:
            m.q = 0
