"""KL divergence to F16 orders the K mixes as llama.cpp's do: Q6_K < Q5_K_M < Q4_K_M < Q3_K_M < Q2_K,
and Q4_K_M < Q4_0, on SmolLM2 rotated off its Q4_1 grid (qf.eval.rotate) and Jargon File text.

A small version of `benchmarks/bench_quality.py` (which has the full table and the reasons for the
rotation): 2 windows of 256 tokens instead of 6 of 512. The measured gaps (README) are 3x or more the
error bars there, so a regression in a mix rule or a quantizer flips an inequality here.
"""

from __future__ import annotations

import numpy as np
import pytest

from qf.convert.pipeline import convert
from qf.eval import text
from qf.eval.kld import kld_rows
from qf.eval.perplexity import log_softmax
from qf.eval.rotate import rotate_checkpoint
from qf.runtime.api import Model

ORDER = ["Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
WINDOW, N_WINDOWS = 256, 2

pytestmark = pytest.mark.skipif(not text.jargon_path().is_file(),
                                reason="jargon-text not installed (apt-get install jargon-text)")


def _logp(path, windows: list[list[int]]) -> np.ndarray:
    """Log-probabilities f32 [N_WINDOWS * (WINDOW - 1), n_vocab] of every window's positions after the first."""
    with Model.load(path, n_ctx=WINDOW) as m:
        return np.concatenate([log_softmax(m.logits(w)[1:]) for w in windows])


@pytest.fixture(scope="module")
def kld(tmp_path_factory, smollm2_hf) -> dict[str, float]:
    """Mean KLD to F16 of each type, on the rotated SmolLM2."""
    d = tmp_path_factory.mktemp("quality")
    rot = rotate_checkpoint(smollm2_hf, d / "rotated")
    ref = convert(rot, d / "F16.qf", "F16").path
    with Model.load(ref, n_ctx=WINDOW) as m:
        ids = m.tokenize(text.evaluation_text()[:20000])
    windows = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(N_WINDOWS)]
    base = _logp(ref, windows)
    out = {}
    for t in ORDER + ["Q4_0"]:
        q = convert(rot, d / f"{t}.qf", t).path
        out[t] = float(kld_rows(base, _logp(q, windows)).mean())
        q.unlink()
    return out


def test_k_mixes_order_by_kl_divergence(kld):
    values = [kld[t] for t in ORDER]
    assert values == sorted(values), kld
    assert kld["Q6_K"] < 0.02 and kld["Q2_K"] > 0.3, kld


def test_q4_k_m_beats_q4_0(kld):
    assert kld["Q4_K_M"] < 0.5 * kld["Q4_0"], kld
