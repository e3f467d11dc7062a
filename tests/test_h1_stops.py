"""Stop strings (qf.runtime.stops.StopFilter): the old quadratic filter's outputs, in linear time, with
bounded stop lists."""

from __future__ import annotations

import time
from typing import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qf.format.errors import QFError
from qf.runtime.stops import MAX_STOP_CHARS, MAX_STOPS, StopFilter, StopStringError


class ReferenceStopFilter:
    """The straightforward filter StopFilter replaces (quadratic in the stop string length)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _run(f: StopFilter | ReferenceStopFilter, chunks: list[str], flush_at: set[int]) -> list:
    """Every push's result, with flushes at some points (the filter keeps going after a stop)."""
    out: list = []
    for i, c in enumerate(chunks):
        out.append(f.push(c))
        if i in flush_at:
            out.append(f.flush())
    out.append(f.flush())
    return out


small_text = st.text(alphabet="aab\u00e9\U0001f600", max_size=8)


@settings(max_examples=1500, deadline=None)
@given(stops=st.lists(st.text(alphabet="aab\u00e9", max_size=6), max_size=5),
       chunks=st.lists(small_text, max_size=12), flush_at=st.sets(st.integers(0, 12), max_size=2))
def test_same_outputs_as_the_reference(stops: list[str], chunks: list[str], flush_at: set[int]) -> None:
    assert _run(StopFilter(stops), chunks, flush_at) == _run(ReferenceStopFilter(stops), chunks, flush_at)


@settings(max_examples=300, deadline=None)
@given(stop=st.text(alphabet="ab", min_size=1, max_size=40), text=st.text(alphabet="ab", max_size=120),
       cuts=st.lists(st.integers(0, 120), max_size=20))
def test_periodic_stops_and_any_chunking_match_the_reference(stop: str, text: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    stops = [stop, stop[: len(stop) // 2 + 1] + "b"]
    assert _run(StopFilter(stops), chunks, set()) == _run(ReferenceStopFilter(stops), chunks, set())


def test_stop_strings_cut_and_hold_back() -> None:
    f = StopFilter(["STOP", "\n\n"])
    assert f.push("hello ST") == ("hello ", False)
    assert f.push("ILL") == ("STILL", False)
    assert f.push(" then\n") == (" then", False)
    assert f.push("\nrest") == ("", True)
    assert StopFilter(["abcd", "bc"]).push("xabcd") == ("x", True)  # the earliest start wins, not the first end
    g = StopFilter(["abc"])
    assert g.push("xxab") == ("xx", False) and g.flush() == "ab"
    assert StopFilter([]).push("anything") == ("anything", False)
    assert StopFilter(["", "z"]).stops == ["z"]


MB = 1_000_000


def test_megabyte_stop_and_megabyte_text_are_fast() -> None:
    import random

    rng = random.Random(0)
    stop = "".join(rng.choice("abcdefgh") for _ in range(MB))
    text = stop[: MB - 1] + "x"  # matches all but the last character: everything is held back until then
    cases = {
        "random, 1 chunk": ([stop], [text]),
        "random, 100 B chunks": ([stop], [text[i:i + 100] for i in range(0, MB, 100)]),
        "periodic, 1 KB chunks": (["a" * MB], ["a" * 1000] * 999 + ["a" * 999 + "b"]),
        "periodic, 1 chunk": (["ab" * (MB // 2)], ["ab" * (MB // 2 - 1) + "aa" + "ab" * 10]),
        "64 stops, 1 MB of their first letter": ([chr(0x100 + i) * 16000 + "z" for i in range(64)],
                                                 [chr(0x100 + i % 64) * 1000 for i in range(1000)]),
    }
    for name, (stops, chunks) in cases.items():
        t0 = time.perf_counter()
        f = StopFilter(stops)
        out = [f.push(c) for c in chunks]
        seconds = time.perf_counter() - t0
        assert seconds < 2.0, f"{name}: {seconds:.2f} s"
        assert not any(hit for _, hit in out)
        assert "".join(o for o, _ in out) + f.flush() == "".join(chunks)  # nothing lost, nothing repeated
    t0 = time.perf_counter()
    f = StopFilter([stop])
    assert f.push(text[:-1]) == ("", False) and f.push(stop[-1] + "tail") == ("", True)
    assert time.perf_counter() - t0 < 2.0


def test_held_back_text_comes_out_exactly() -> None:
    stop = "a" * 1000 + "b"
    f = StopFilter([stop])
    pieces = [f.push("a") for _ in range(5000)]
    assert "".join(p for p, _ in pieces) == "a" * 4000 and f.flush() == "a" * 1000


@pytest.mark.parametrize("stops,match", [
    ("###", "single str"), (b"##", "single bytes"), (["ok", 3], "stop string 1: expected a str, got int"),
    (["x"] * (MAX_STOPS + 1), f"more than {MAX_STOPS} given"),
    (["x" * (MAX_STOP_CHARS // 2 + 1)] * 2, "characters in all"),
    ((s for s in ["a", None]), "stop string 1"),
])
def test_bad_stop_lists_are_refused(stops: object, match: str) -> None:
    with pytest.raises(StopStringError, match=match) as e:
        StopFilter(stops)  # type: ignore[arg-type]
    assert isinstance(e.value, QFError) and isinstance(e.value, ValueError)


def test_limits_are_allowed_exactly() -> None:
    assert len(StopFilter(["x"] * MAX_STOPS).stops) == MAX_STOPS
    assert StopFilter(["y" * MAX_STOP_CHARS]).push("y" * 10) == ("", False)
