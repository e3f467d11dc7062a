"""Evaluation text slices, chunking and scoring math; perplexity of a real model vs transformers."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from qf.eval import text
from qf.eval.perplexity import (chunk_input, chunk_targets, log_softmax, mean_and_error, perplexity,
                                plan_chunks, token_nll)
from qf.format.errors import QFError

SLICE_SHA256 = {
    "calibration": "0831d56efce5eef7d3a41edc0ae4f8ee4b64bfda573980f567a734b67120f37c",
    "evaluation": "833da5a737e7c890dfc762918dc11aa58b744ff35b389e1b4aa457e293d3f461",
}
needs_jargon = pytest.mark.skipif(not text.jargon_path().is_file(),
                                  reason="jargon-text not installed (apt-get install jargon-text)")


# ---- text slices -------------------------------------------------------------------------------

@needs_jargon
def test_slices_are_deterministic_and_disjoint():
    cal, ev = text.calibration_text(), text.evaluation_text()
    text._normalized.cache_clear()
    assert text.calibration_text() == cal and text.evaluation_text() == ev  # same bytes on a fresh read
    cal_p, ev_p = cal.strip().split("\n\n"), ev.strip().split("\n\n")
    all_p = text.paragraphs(text.read_jargon())
    assert cal_p + ev_p == all_p  # the two slices partition the text, in order
    long_cal = {p for p in cal_p if len(p) > 80}
    assert not long_cal & {p for p in ev_p if len(p) > 80}  # no shared substantial paragraph
    assert 600_000 < len(cal) and 600_000 < len(ev)
    assert ev.startswith(":infinity: n.") and cal.startswith("The Jargon File\n\n(version 4.4.7)")
    # pinned: a change to the normalization or the bounds changes every published number
    assert hashlib.sha256(cal.encode()).hexdigest() == SLICE_SHA256["calibration"]
    assert hashlib.sha256(ev.encode()).hexdigest() == SLICE_SHA256["evaluation"]


def test_paragraphs_unwrap_and_slice_boundaries():
    paras = text.paragraphs("  a b\n   c \n\n\n  d\r\n\r\n e  f \n")
    assert paras == ["a b c", "d", "e f"]
    joined = "\n\n".join(paras)  # starts at offsets 0, 7, 10 of 13 chars
    assert len(joined) == 13
    assert text.slice_paragraphs(paras, 0.0, 7 / 13) == ["a b c"]
    assert text.slice_paragraphs(paras, 7 / 13, 1.0) == ["d", "e f"]
    with pytest.raises(QFError):
        text.slice_paragraphs(paras, 0.6, 0.5)


def test_unknown_slice_and_missing_file(tmp_path, monkeypatch):
    with pytest.raises(QFError, match="unknown text slice"):
        text.get_slice("train")
    monkeypatch.setenv(text.JARGON_ENV, str(tmp_path / "nope.gz"))
    with pytest.raises(QFError, match="apt-get install jargon-text"):
        text.read_jargon()


def test_other_content_is_refused(tmp_path):
    import gzip
    p = tmp_path / "j.gz"
    p.write_bytes(gzip.compress(b"not the jargon file"))
    with pytest.raises(QFError, match="unexpected content"):
        text.read_jargon(p)
    assert text.read_jargon(p, check=False) == "not the jargon file"


# ---- chunking and scoring math -----------------------------------------------------------------

def test_plan_like_llama_perplexity():
    plan = plan_chunks(5000, 512)
    assert (plan.n_chunks, plan.first, plan.n_scored) == (9, 256, 255)
    assert plan_chunks(5000, 512, max_chunks=4).n_chunks == 4
    assert plan_chunks(1024, 512).n_chunks == 2
    with pytest.raises(QFError, match="at least 1024 tokens"):
        plan_chunks(1023, 512)
    with pytest.raises(QFError, match="positive"):
        plan_chunks(5000, 512, max_chunks=0)


def test_bos_substitution_and_targets():
    tokens = np.arange(100, 140)
    plan = plan_chunks(tokens.size, 16, bos_id=1)
    c1 = chunk_input(tokens, plan, 1)
    assert c1.tolist() == [1] + list(range(117, 132))
    assert tokens[16] == 116  # the stream itself is not modified
    assert chunk_targets(tokens, plan, 1).tolist() == list(range(125, 132))  # positions 9..15
    assert chunk_input(tokens, plan_chunks(tokens.size, 16), 1)[0] == 116  # no BOS: unchanged


def test_log_softmax_and_nll_match_direct():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 300)) * 5).astype(np.float32)
    t = rng.integers(0, 300, 7)
    x64 = x.astype(np.float64)
    ref = x64 - np.log(np.exp(x64).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(log_softmax(x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(token_nll(x, t), -ref[np.arange(7), t], rtol=1e-6)
    assert mean_and_error(np.array([1.0, 3.0])) == (2.0, 1.0)


def test_perplexity_of_a_known_model():
    """A 'model' that predicts next = current + 1 with prob 0.6: PPL = 1 / 0.6 on such text."""
    v, n_ctx = 32, 16
    tokens = np.arange(64) % v
    seen = []

    def logits_fn(chunk: np.ndarray) -> np.ndarray:
        seen.append(chunk.copy())
        p = np.full((chunk.size, v), 0.4 / (v - 1))
        p[np.arange(chunk.size), (chunk + 1) % v] = 0.6
        return np.log(p).astype(np.float32)

    res = perplexity(logits_fn, tokens, plan_chunks(tokens.size, n_ctx, max_chunks=3))
    assert len(seen) == 3 and res.n_tokens == 3 * 7 and res.n_chunks == 3
    assert res.ppl == pytest.approx(1 / 0.6, rel=1e-6) and res.ppl_err == pytest.approx(0, abs=1e-6)


def test_perplexity_uncertainty_formula():
    rng = np.random.default_rng(1)
    v, n_ctx = 20, 8
    tokens = rng.integers(0, v, 80)
    logits = rng.standard_normal((10, n_ctx, v)).astype(np.float32)
    calls = iter(range(10))
    res = perplexity(lambda c: logits[next(calls)], tokens, plan_chunks(tokens.size, n_ctx))
    ls = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    nll = np.concatenate([-ls[i, 4:7][np.arange(3), tokens[i * 8 + 5:i * 8 + 8]] for i in range(10)])
    assert res.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    assert res.ppl_err == pytest.approx(res.ppl * nll.std() / math.sqrt(nll.size - 1), rel=1e-5)


# ---- real model: SmolLM2 F16 vs transformers, and qperplexity end to end -----------------------

N_CTX_HF = 256  # 2 chunks of 256 (127 scored tokens each) against transformers
N_CTX_CLI = 64  # the CLI round trips use small chunks to stay fast
CLI_ARGS = ("-c", str(N_CTX_CLI), "--chunks", "2")


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_hf, tmp_path_factory):
    """The exported SmolLM2 folder converted to an F16 .qf."""
    from qf.convert.pipeline import convert
    out = tmp_path_factory.mktemp("ppl") / "smollm2-f16.qf"
    convert(smollm2_hf, out, "F16")
    return out


@pytest.fixture(scope="module")
def eval_text_file(tmp_path_factory):
    """The first 40,000 characters of the evaluation slice, as a file."""
    if not text.jargon_path().is_file():
        pytest.skip("jargon-text not installed (apt-get install jargon-text)")
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(text.evaluation_text()[:40000], encoding="utf-8")
    return p


@pytest.mark.slow
def test_f16_perplexity_matches_transformers(smollm2_hf, smollm2_f16, eval_text_file):
    """Our F16 runtime vs transformers' own loss (labels masked to the scored half), same chunks."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qf.runtime import Model

    model = Model.load(smollm2_f16, n_ctx=N_CTX_HF, n_batch=N_CTX_HF)
    tokens = model.tokenize(eval_text_file.read_text(encoding="utf-8"))
    plan = plan_chunks(len(tokens), N_CTX_HF, max_chunks=2, bos_id=model.bos_id if model.add_bos else None)
    ours = perplexity(lambda c: model.logits(c.tolist()), tokens, plan)
    model.close()

    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_hf, torch_dtype=torch.float32).eval()
    nll_sum = 0.0
    for i in range(plan.n_chunks):
        x = torch.tensor(chunk_input(np.asarray(tokens), plan, i)[None].astype(np.int64))
        labels = x.clone()
        labels[:, :plan.first + 1] = -100  # HF shifts labels: logits at first..n_ctx-2 score tokens first+1..
        with torch.no_grad():
            nll_sum += float(hf(input_ids=x, labels=labels).loss) * plan.n_scored
    ppl_hf = math.exp(nll_sum / (plan.n_chunks * plan.n_scored))
    assert ours.n_tokens == 2 * (N_CTX_HF // 2 - 1)
    assert abs(ours.ppl / ppl_hf - 1) < 0.01, (ours.ppl, ppl_hf)


def _qperplexity(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from qf.tools.qperplexity import main
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def saved_base(smollm2_f16, eval_text_file, tmp_path_factory):
    """qperplexity --save-logits on the F16 model: (logits file, its JSON result)."""
    import json
    d = tmp_path_factory.mktemp("base")
    base, js = d / "base.bin", d / "ppl.json"
    code, out = _qperplexity(str(smollm2_f16), "-f", str(eval_text_file), *CLI_ARGS, "--save-logits", str(base),
                             "--json", str(js))
    assert code == 0, out
    assert "Final estimate: PPL = " in out
    return base, json.loads(js.read_text())


@pytest.mark.slow
def test_qperplexity_self_kld_is_zero(smollm2_f16, eval_text_file, saved_base, tmp_path):
    """--save-logits then --kl-divergence with the same model: KLD exactly 0, top-1 100 %."""
    import json
    base, ppl = saved_base
    assert ppl["n_chunks"] == 2 and ppl["n_tokens"] == 2 * (N_CTX_CLI // 2 - 1) and ppl["ppl"] > 1
    js = tmp_path / "kld.json"
    code, out = _qperplexity(str(smollm2_f16), "-f", str(eval_text_file), *CLI_ARGS,
                             "--kl-divergence", str(base), "--json", str(js))
    assert code == 0, out
    k = json.loads(js.read_text())
    assert k["kld"] == 0.0 and k["kld_max"] == 0.0 and k["same_top"] == 1.0
    assert k["ln_ppl_ratio"] == 0.0 and k["dp_rms"] == 0.0
    assert k["ppl_base"] == pytest.approx(ppl["ppl"], rel=1e-12) and k["ppl"] == k["ppl_base"]
    assert "Mean    KLD:   0.000000" in out
    # -b: each chunk evaluated 24 tokens per forward call through the KV cache scores the same, up to summation
    # order: 24-token chunks attend over a cached prefix with the tiled kernel, and their products run in other
    # tiles than one 64-token call (logits differ by <= ~1e-2, measured 1.05e-4 relative in PPL)
    code, out = _qperplexity(str(smollm2_f16), "-f", str(eval_text_file), *CLI_ARGS, "-b", "24", "--json", str(js))
    assert code == 0, out
    assert json.loads(js.read_text())["ppl"] == pytest.approx(ppl["ppl"], rel=3e-4)


@pytest.mark.slow
def test_qperplexity_refuses_other_inputs(smollm2_f16, saved_base, tmp_path):
    base, _ = saved_base
    other = tmp_path / "other.txt"
    other.write_text("Completely different text. " * 400, encoding="utf-8")
    code, out = _qperplexity(str(smollm2_f16), "-f", str(other), "--kl-divergence", str(base))
    assert code != 0 and "tokens differ" in out and "field 'tokens'" in out
    code, out = _qperplexity(str(smollm2_f16), "-c", "256", "--kl-divergence", str(base))
    assert code != 0 and "field 'n_ctx'" in out
    code, out = _qperplexity(str(smollm2_f16), "-f", str(other), "-c", "4096")
    assert code != 0 and "you need at least 8192 tokens" in out
    code, out = _qperplexity(str(smollm2_f16), "-f", str(other), "--save-logits", "x", "--kl-divergence", str(base))
    assert code != 0 and "exclusive" in out


@pytest.mark.slow
def test_kld_orders_quant_types(smollm2_hf, smollm2_f16, eval_text_file, tmp_path):
    """One 128-token chunk: KLD to F16 grows as bits shrink, Q8_0 < Q5_0 < Q4_0 (the benchmark has the rest)."""
    from qf.convert.pipeline import convert
    from qf.eval.kld import LogitsFile, LogitsWriter, TokenStats, compare_chunk, kld_stats
    from qf.eval.perplexity import iter_chunks
    from qf.runtime import Model

    n_ctx = 128
    text_ = eval_text_file.read_text(encoding="utf-8")

    def chunks(path):
        with Model.load(path, n_ctx=n_ctx, n_batch=n_ctx) as m:
            toks = np.asarray(m.tokenize(text_))
            plan = plan_chunks(toks.size, n_ctx, max_chunks=1, bos_id=m.bos_id if m.add_bos else None)
            return toks, plan, list(iter_chunks(lambda c: m.logits(c.tolist()), toks, plan))

    toks, plan, ref = chunks(smollm2_f16)
    with LogitsWriter(tmp_path / "base.bin", n_ctx, ref[0].logits.shape[1], toks[:n_ctx], plan.bos_id) as w:
        w.write_chunk(ref[0].logits, ref[0].targets)
        w.finish()
    klds = {}
    with LogitsFile(tmp_path / "base.bin") as base:
        for t in ("Q8_0", "Q5_0", "Q4_0"):
            convert(smollm2_hf, tmp_path / f"{t}.qf", t)
            acc = TokenStats.empty()
            for ch in chunks(tmp_path / f"{t}.qf")[2]:
                acc.extend(compare_chunk(base, ch.index, ch.logits, ch.targets))
            klds[t] = kld_stats(acc)
    assert 0 < klds["Q8_0"].kld < klds["Q5_0"].kld < klds["Q4_0"].kld, {t: s.kld for t, s in klds.items()}
    assert klds["Q8_0"].kld < 0.01 and klds["Q8_0"].same_top > 0.9
    assert klds["Q4_0"].same_top < klds["Q8_0"].same_top
