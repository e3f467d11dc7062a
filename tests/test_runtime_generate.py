"""The Python API and generation loop: chat answers, finish reasons, context overflow, stop strings,
cancellation, prefix reuse, two models in one process."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from test_runtime_forward import build_tiny_gguf

from qf.format.errors import ContextOverflowError, ModelError
from qf.runtime import Model
from qf.runtime.generate import StopFilter

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Model:
    with Model.load(smollm2_gguf, n_ctx=512) as m:
        yield m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gguf(tmp_path_factory.mktemp("gen") / "tiny.gguf")


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2: Model) -> None:
    gen = smollm2.chat(QUESTION, temperature=0, max_tokens=48)
    text = "".join(gen)
    assert "Paris" in text, text
    assert gen.finish_reason == "stop" and smollm2.finish_reason == "stop"
    assert gen.text == text.strip() or text.startswith(gen.text[:5])
    s = gen.stats
    assert s.n_prompt + s.n_cached == len(smollm2.chat_tokens(QUESTION)) and s.n_gen == len(gen.tokens) > 0
    assert s.prompt_tps > 0 and s.gen_tps > 0


@pytest.mark.slow
def test_smollm2_prefix_reuse_gives_same_answer(smollm2: Model) -> None:
    first = "".join(smollm2.chat(QUESTION, temperature=0, max_tokens=16))
    again = smollm2.chat(QUESTION, temperature=0, max_tokens=16)
    assert "".join(again) == first
    assert again.stats.n_cached == len(smollm2.chat_tokens(QUESTION)) - 1  # only the last prompt token re-run


@pytest.mark.slow
def test_logits_api_matches_generation(smollm2: Model) -> None:
    ids = smollm2.tokenize("The capital of France is")
    logits = smollm2.logits(ids)
    assert logits.shape == (len(ids), smollm2.n_vocab) and logits.dtype == np.float32
    gen = smollm2.generate(ids, max_tokens=1, temperature=0)
    list(gen)
    assert gen.tokens == [int(np.argmax(logits[-1]))]
    assert gen.finish_reason == "length"


def test_sampling_with_seed_is_reproducible(tiny: Path) -> None:
    with Model.load(tiny, n_ctx=64) as m:
        a = m.generate([40, 41, 42], max_tokens=10, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
        b = m.generate([40, 41, 42], max_tokens=10, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
        assert list(a) == list(b) and a.tokens == b.tokens and len(a.tokens) > 0


def test_prompt_longer_than_context_is_an_error(tiny: Path) -> None:
    with Model.load(tiny, n_ctx=16) as m:
        with pytest.raises(ContextOverflowError, match="17 tokens.*16"):
            m.generate(list(range(40, 57)))
        with pytest.raises(ContextOverflowError):
            m.logits(list(range(40, 57)))
        with pytest.raises(ContextOverflowError, match="empty"):
            m.generate([])


def test_generation_that_fills_the_context_ends_with_length(tiny: Path) -> None:
    with Model.load(tiny, n_ctx=16) as m:
        gen = m.generate(list(range(40, 50)), max_tokens=100, temperature=0)  # 10 + 100 > 16
        list(gen)
        assert gen.finish_reason == "length"
        assert len(gen.tokens) == 7  # 16 positions: 10 prompt + 6 evaluated + 1 sampled last
        full = m.generate(list(range(40, 56)), max_tokens=5, temperature=0)  # exactly n_ctx
        list(full)
        assert full.finish_reason == "length" and len(full.tokens) == 1


def test_max_tokens_ends_with_length(tiny: Path) -> None:
    with Model.load(tiny, n_ctx=64) as m:
        gen = m.generate([40, 41], max_tokens=3, temperature=0)
        list(gen)
        assert (gen.finish_reason, len(gen.tokens)) == ("length", 3)
        zero = m.generate([40, 41], max_tokens=0)
        assert list(zero) == [] and zero.finish_reason == "length"


def test_end_of_generation_tokens_stop(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eos and tokens the vocabulary marks as end of generation (<|endoftext|> by its text) end with "stop"."""
    from qf.runtime.sampler import Sampler

    with Model.load(tiny, n_ctx=64) as m:
        assert m.tokenizer.eog_ids == {0, 2}  # <|endoftext|>, <|im_end|> (eos)
        for eog in (0, 2):
            script = iter([75, 108, eog, 75])  # "H", "i", end (byte b is token b + 3)
            monkeypatch.setattr(Sampler, "sample", lambda self, logits, history=(): next(script))
            gen = m.generate([40, 41], max_tokens=10)
            assert "".join(gen) == "Hi"
            assert gen.finish_reason == "stop" and gen.tokens == [75, 108]


def test_stop_strings_cut_and_hold_back() -> None:
    f = StopFilter(["STOP", "\n\n"])
    assert f.push("hello ST") == ("hello ", False)  # "ST" may start STOP: held
    assert f.push("ILL") == ("STILL", False)
    assert f.push(" then\n") == (" then", False)
    assert f.push("\nrest") == ("", True)
    g = StopFilter(["abc"])
    assert g.push("xxab") == ("xx", False) and g.flush() == "ab"
    assert StopFilter([]).push("anything") == ("anything", False)


def test_stop_string_ends_generation(tiny: Path) -> None:
    with Model.load(tiny, n_ctx=64) as m:
        free = m.generate([40, 41], max_tokens=12, temperature=0)
        text = "".join(free)
        assert len(text) >= 3
        stop = text[1:3]
        cut = m.generate([40, 41], max_tokens=12, temperature=0, stop=[stop])
        out = "".join(cut)
        assert cut.finish_reason == "stop" and stop not in out and text.startswith(out)


def test_cancel_from_another_thread(smollm2_gguf: Path) -> None:
    with Model.load(smollm2_gguf, n_ctx=256) as m:
        gen = m.generate("Once upon a time", max_tokens=200, temperature=0.8, seed=1)
        got = []
        for i, piece in enumerate(gen):
            got.append(piece)
            if i == 2:
                t = threading.Thread(target=m.cancel)
                t.start()
                t.join()
        assert gen.finish_reason == "cancelled" and m.finish_reason == "cancelled"
        assert 3 <= len(gen.tokens) <= 4


def test_a_second_generation_waits_instead_of_cancelling_the_first(tiny: Path) -> None:
    """One KV slot: a second request queues behind the first; both finish with their own tokens."""
    with Model.load(tiny, n_ctx=64) as m:
        alone_old = m.generate([40, 41], max_tokens=20, temperature=0).wait().tokens
        alone_new = m.generate([50, 51], max_tokens=5, temperature=0).wait().tokens
        old = m.generate([40, 41], max_tokens=20, temperature=0)
        next(iter(old), None)
        new = m.generate([50, 51], max_tokens=5, temperature=0)
        list(new)
        list(old)
        assert old.finish_reason == "length" and new.finish_reason == "length"
        assert old.tokens == alone_old and new.tokens == alone_new


def test_two_models_in_one_process(tiny: Path, tmp_path: Path) -> None:
    other = build_tiny_gguf(tmp_path / "other.gguf", seed=1, arch="qwen2", bias=True)
    with Model.load(tiny, n_ctx=32) as a, Model.load(other, n_ctx=32) as b:
        la, lb = a.logits([40, 41, 42]), b.logits([40, 41, 42])
        ga = a.generate([40, 41], max_tokens=4, temperature=0)
        gb = b.generate([40, 41], max_tokens=4, temperature=0)
        for _ in zip(ga, gb):  # interleaved: each model keeps its own cache
            pass
        list(ga), list(gb)
        assert not np.allclose(la, lb)
        assert np.allclose(a.logits([40, 41, 42]), la) and np.allclose(b.logits([40, 41, 42]), lb)
        assert ga.finish_reason == gb.finish_reason == "length"


def test_bad_token_ids_are_rejected(tiny: Path) -> None:
    with Model.load(tiny, n_ctx=32) as m:
        with pytest.raises(ModelError, match="out of range"):
            m.logits([1, m.n_vocab])
        with pytest.raises(ModelError, match="out of range"):
            m.generate([-1])
        with pytest.raises(ModelError, match="unknown sampling parameter"):
            m.generate([1], temprature=0.5)


def test_chat_tokens_use_the_template(tiny: Path) -> None:
    with Model.load(tiny, n_ctx=64) as m:
        ids = m.chat_tokens(QUESTION)
        assert ids[0] == 1 and m.detokenize(ids, special=True).startswith("<|im_start|>user\nWhat is")
        assert m.detokenize(ids, special=True).endswith("<|im_start|>assistant\n")
