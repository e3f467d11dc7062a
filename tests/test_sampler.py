"""Sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from qf.format.errors import QFError
from qf.runtime.sampler import (NonFiniteLogitsError, Sampler, SamplingError, SamplingParams, apply_repeat_penalty,
                                softmax)

# probabilities 0.5, 0.25, 0.125, 0.0625, then 12 tokens sharing the remaining 0.0625
PROBS = np.array([0.5, 0.25, 0.125, 0.0625] + [0.0625 / 12] * 12)
LOGITS = np.log(PROBS).astype(np.float32)


def _draws(n: int = 4000, seed: int = 7, **kw) -> np.ndarray:
    s = Sampler(SamplingParams(seed=seed, **kw))
    return np.array([s.sample(LOGITS) for _ in range(n)])


def test_greedy_is_argmax() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.standard_normal(1000).astype(np.float32)
        assert Sampler(SamplingParams(temperature=0)).sample(x) == int(np.argmax(x))
        assert Sampler(SamplingParams(temperature=1.0, top_k=1)).sample(x) == int(np.argmax(x))


def test_seed_reproducible_and_varies() -> None:
    a = _draws(200, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    b = _draws(200, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert np.array_equal(a, b)
    c = _draws(200, seed=8, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert not np.array_equal(a, c) and len(set(a.tolist())) > 4


def test_temperature_one_follows_the_distribution() -> None:
    d = _draws(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    freq = np.bincount(d, minlength=len(PROBS)) / len(d)
    assert np.abs(freq[:4] - PROBS[:4]).max() < 0.03
    assert freq[4:].sum() == pytest.approx(0.0625, abs=0.02)


def test_temperature_sharpens_and_flattens() -> None:
    cold = np.bincount(_draws(temperature=0.25, top_k=0, top_p=1.0, min_p=0.0), minlength=16) / 4000
    hot = np.bincount(_draws(temperature=4.0, top_k=0, top_p=1.0, min_p=0.0), minlength=16) / 4000
    expect_cold = softmax(LOGITS / 0.25)
    assert np.abs(cold - expect_cold).max() < 0.03
    assert hot[0] < 0.25 and hot[4:].sum() > 0.3


def test_top_k_keeps_only_k_best() -> None:
    d = _draws(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)
    assert set(d.tolist()) == {0, 1}
    assert np.mean(d == 0) == pytest.approx(2 / 3, abs=0.03)  # renormalised 0.5 : 0.25


def test_top_p_keeps_smallest_nucleus() -> None:
    assert set(_draws(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0).tolist()) == {0, 1}  # 0.5+0.25 >= 0.7
    assert set(_draws(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0).tolist()) == {0, 1, 2}
    assert set(_draws(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0).tolist()) == {0}


def test_min_p_drops_tokens_below_fraction_of_best() -> None:
    assert set(_draws(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2).tolist()) == {0, 1, 2}  # p >= 0.1
    assert set(_draws(temperature=1.0, top_k=0, top_p=1.0, min_p=0.6).tolist()) == {0}


def test_repeat_penalty_as_llama_cpp() -> None:
    x = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    y = apply_repeat_penalty(x, [0, 1, 1, 7], 2.0)  # 7 is out of range: ignored; repeats count once
    assert y.tolist() == [1.0, -4.0, 1.0, 0.5]
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=10.0, repeat_last_n=2))
    logits = np.array([3.0, 2.9, 0.0], dtype=np.float32)
    assert s.sample(logits, history=[0]) == 1
    assert s.sample(logits, history=[0, 2, 2]) == 0  # token 0 left the penalty window


def test_bad_parameters_are_rejected() -> None:
    for kw in ({"top_p": -0.1}, {"min_p": 1.5}, {"repeat_penalty": 0.0}, {"repeat_last_n": -1},
               {"temperature": float("nan")}):
        with pytest.raises(ValueError):  # SamplingError is still a ValueError
            SamplingParams(**kw)


BAD_PARAMETERS = [
    ("seed", -1), ("seed", 1.5), ("seed", "7"), ("seed", True), ("seed", 2**64), ("seed", float("nan")),
    ("top_k", 2.5), ("top_k", 3.0), ("top_k", True), ("top_k", "40"), ("top_k", None),
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -float("inf")),
    ("temperature", "0.7"), ("temperature", None), ("temperature", False), ("temperature", 1j),
    ("top_p", float("nan")), ("top_p", float("inf")), ("top_p", -0.1), ("top_p", "0.9"),
    ("min_p", float("nan")), ("min_p", 1.5), ("min_p", -0.01), ("min_p", float("inf")),
    ("repeat_penalty", 0.0), ("repeat_penalty", -1.0), ("repeat_penalty", float("nan")),
    ("repeat_penalty", float("inf")), ("repeat_last_n", 1.5), ("repeat_last_n", -1), ("repeat_last_n", "64"),
    ("repeat_last_n", True),
]


@pytest.mark.parametrize("name,value", BAD_PARAMETERS, ids=[f"{n}={v!r}" for n, v in BAD_PARAMETERS])
def test_bad_parameter_names_itself_and_its_range(name: str, value: object) -> None:
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{name: value})
    assert isinstance(e.value, QFError) and isinstance(e.value, ValueError)  # old callers caught ValueError
    assert e.value.parameter == name
    assert f"{name}={value!r}: expected " in str(e.value)


def test_numpy_numbers_are_accepted_as_plain_numbers() -> None:
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.9), seed=np.uint32(3),
                       repeat_last_n=np.int16(8), min_p=0, repeat_penalty=1)
    assert (p.temperature, p.top_k, p.top_p, p.seed, p.repeat_last_n) == (0.5, 5, 0.9, 3, 8)
    assert all(type(v) in (int, float) for v in (p.temperature, p.top_k, p.top_p, p.seed, p.min_p))
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1 and SamplingParams(seed=None).seed is None


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
                                {"temperature": 0.7}])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_logits_raise_instead_of_sampling(kw: dict, bad: float) -> None:
    for where in (0, 7, len(LOGITS) - 1):
        x = LOGITS.copy()
        x[where] = bad
        with pytest.raises(NonFiniteLogitsError, match=f"token {where} = {bad}") as e:
            Sampler(SamplingParams(seed=1, **kw)).sample(x)
        assert isinstance(e.value, QFError)


def test_logits_that_allow_nothing_or_are_malformed_raise() -> None:
    s = Sampler(SamplingParams(seed=1))
    for bad in (np.full(8, -np.inf, dtype=np.float32), np.zeros(0, dtype=np.float32), np.zeros((2, 4)),
                ["a", "b"], np.array([1e39, 0.0])):  # 1e39 overflows f32 to +inf
        with pytest.raises(NonFiniteLogitsError):
            s.sample(bad)


def test_forbidden_tokens_are_never_drawn() -> None:
    x = LOGITS.copy()
    x[[0, 2, 5]] = -np.inf  # a constraint forbids them
    d = np.array([Sampler(SamplingParams(seed=i, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)).sample(x)
                  for i in range(400)])
    assert not np.isin(d, [0, 2, 5]).any() and len(set(d.tolist())) > 5
    assert Sampler(SamplingParams(temperature=0)).sample(x) == 1
    only = np.full(16, -np.inf, dtype=np.float32)
    only[9] = -50.0
    assert Sampler(SamplingParams(seed=3, temperature=2.0, top_k=0, top_p=1.0, min_p=0.0)).sample(only) == 9


def test_extreme_parameters_never_produce_nan() -> None:
    tiny_t = Sampler(SamplingParams(seed=0, temperature=1e-30, top_k=0, top_p=1.0, min_p=0.0))
    assert {tiny_t.sample(LOGITS) for _ in range(50)} == {0}  # a vanishing temperature is greedy
    huge_t = np.array([Sampler(SamplingParams(seed=i, temperature=1e30, top_k=0, top_p=1.0, min_p=0.0)).sample(LOGITS)
                       for i in range(800)])
    assert len(set(huge_t.tolist())) == len(LOGITS)  # a huge one is uniform
    big = np.array([3e38, -3e38, 1.0, 0.5], dtype=np.float32)
    for penalty in (1e-30, 1e30):
        y = apply_repeat_penalty(big, [0, 1, 2], penalty)
        assert np.isfinite(y).all()
        s = Sampler(SamplingParams(seed=0, temperature=1.0, repeat_penalty=penalty, top_k=0, top_p=1.0, min_p=0.0))
        assert 0 <= s.sample(big, history=[0, 1, 2]) < 4
    masked = np.array([-np.inf, 2.0], dtype=np.float32)
    assert apply_repeat_penalty(masked, [0, 1], 1e30)[0] == -np.inf  # still forbidden
