"""Our runtime on an F16 .qf against transformers' LlamaForCausalLM on the same HF folder.

The folder is SmolLM2 exported with qf.convert.export_hf; qf.convert turns it back into an F16 file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
    # long enough (with its 32 generated tokens) for the prefill products of 64+ tokens: AMX-BF16 tiles where the
    # host has them (kernels/cpu_amx_bf16.py), else the integer path
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based inks and a wooden press adapted from wine making. Within a few decades printing shops "
    "had spread across Europe, and books that once took months to copy by hand",
]
N_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qf.convert.pipeline import convert

    out = tmp_path_factory.mktemp("f16") / "smollm2-f16.qf"
    convert(smollm2_hf, out, qtype="F16")
    return out


@pytest.mark.slow
def test_greedy_and_logits_match_transformers(smollm2_hf: Path, smollm2_f16: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from qf.runtime import Model

    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    diffs = []
    with Model.load(smollm2_f16, n_ctx=256) as m:
        for prompt in PROMPTS:
            ids = m.tokenize(prompt)
            gen = m.generate(ids, max_tokens=N_TOKENS, temperature=0)
            list(gen)
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=len(gen.tokens), do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
                ref_tokens = out[0, len(ids):].tolist()
                ref_logits = hf(out).logits[0].float().numpy()
            assert gen.tokens == ref_tokens[:len(gen.tokens)], (prompt, m.detokenize(gen.tokens),
                                                                m.detokenize(ref_tokens))
            assert len(gen.tokens) == N_TOKENS or gen.finish_reason == "stop"
            ours = m.logits(out[0].tolist())
            diff = float(np.abs(ours - ref_logits).max())
            diffs.append(diff)
            assert diff < 0.02 * float(np.abs(ref_logits).max()), (prompt, diff)
    print("max |logit difference| vs transformers per prompt:", " ".join(f"{d:.5f}" for d in diffs))
