"""Decode thread choice by measurement (qf.runtime.threads) and its wiring into Model / Engine."""

from __future__ import annotations

from qf.runtime.threads import PROBE_EVERY, DecodeThreads


def _run(tuner: DecodeThreads, seconds: dict[int, float], steps: int) -> list[int]:
    """Drive the tuner with fixed per-thread-count step times; the counts it chose."""
    chosen = []
    for _ in range(steps):
        n = tuner.choose()
        tuner.record(n, seconds[n])
        chosen.append(n)
    return chosen


def test_quiet_machine_keeps_all_threads_and_rarely_probes():
    chosen = _run(DecodeThreads(4), {4: 0.008, 2: 0.013}, 10 * PROBE_EVERY - 1)
    assert set(chosen[:4]) == {4, 2}  # both timed twice first
    assert chosen[4:].count(2) == 9 and chosen[-1] == 4  # one probe per PROBE_EVERY steps


def test_busy_core_moves_to_half_the_threads():
    chosen = _run(DecodeThreads(2), {2: 0.035, 1: 0.013}, 10 * PROBE_EVERY - 1)
    assert chosen[4:].count(2) == 9 and chosen[-1] == 1


def test_load_that_goes_away_is_noticed_at_the_next_probes():
    t = DecodeThreads(2)
    _run(t, {2: 0.035, 1: 0.013}, 200)
    assert t.best == 1
    _run(t, {2: 0.008, 1: 0.013}, 4 * PROBE_EVERY)  # medians of 3 need two fresh probes
    assert t.best == 2


def test_one_thread_has_nothing_to_choose():
    t = DecodeThreads(1)
    assert _run(t, {1: 0.01}, 10) == [1] * 10


def test_model_adapts_only_when_threads_are_not_pinned(smollm2_gguf):
    import numba
    import pytest

    from qf.runtime.api import Model, default_threads

    with Model.load(smollm2_gguf, n_ctx=64, n_threads=2) as m:
        assert m.engine.threads is None
    if min(default_threads(), numba.config.NUMBA_NUM_THREADS) < 2:
        pytest.skip("one CPU thread: nothing to choose")
    with Model.load(smollm2_gguf, n_ctx=64) as m:
        assert m.engine.threads is not None
        assert m.engine.threads.steps == 0  # the warm-up's timings are forgotten
        for tok in (5, 6, 7, 8, 9):
            m.engine.step(tok)
        assert sum(len(v) for v in m.engine.threads.times.values()) == 5
        assert all(len(v) >= 2 for v in m.engine.threads.times.values())
