"""SmolLM2 through the ecosystem's tools (opt-in): llm-compressor quantizes it, `qconvert` keeps the payload,
our runtime answers as transformers does on the same checkpoint.

    QF_PAYLOAD_E2E=/path/to/python-with-llmcompressor python -m pytest -s tests/test_payload_e2e.py

The Python named by QF_PAYLOAD_E2E must import llmcompressor (0.14 was used: a venv with
--system-site-packages and torch pinned to the installed one). It runs tests/payload_e2e_make.py once per
recipe (GPTQ, act-order GPTQ and AWQ each also need QF_PAYLOAD_E2E_GPTQ / _ACTORDER / _AWQ set: they take from
half an hour to an hour here); checkpoints are cached under cache_dir()/e2e, keyed by the SmolLM2 export they
came from. AWQ's checkpoint is asymmetric (zero points): it stays the native `int` payload. For each
recipe: greedy tokens of our runtime equal transformers' (compressed-tensors decompresses the checkpoint on
load), and our perplexity on the first chunks of the Jargon File evaluation slice is within 0.5% of
transformers' on the same tokens. The reference runs with compressed-tensors' fake quantization disabled
after decompression: FP8 "dynamic" checkpoints ask for each linear's input to be quantized to FP8 per token,
which transformers simulates and our runtime does not (it keeps f32 activations, as for every payload); that
perplexity is recorded as a figure (`ppl_transformers_with_activation_qdq`). Figures are printed (-s) and
written to cache_dir()/e2e/figures.json.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qf.eval.perplexity import perplexity, plan_chunks

PYTHON = os.environ.get("QF_PAYLOAD_E2E")
pytestmark = pytest.mark.skipif(not PYTHON, reason="set QF_PAYLOAD_E2E to a Python that imports llmcompressor")

RECIPES = ["fp8_dynamic", "fp8_block", "w4a16_rtn_g64"] + [  # GPTQ: ~1 h each on a loaded 2-core box
    r for r, env in (("w4a16_gptq_g64", "QF_PAYLOAD_E2E_GPTQ"), ("w4a16_gptq_g64_actorder", "QF_PAYLOAD_E2E_ACTORDER"),
                     ("w4a16_awq_g64", "QF_PAYLOAD_E2E_AWQ"))
    if os.environ.get(env)]
# llm-compressor's AWQ runs each block once per grid point (20) per mapping (4): 4 x 512 calibration tokens keep it
# near half an hour on one core; the checkpoint's format, not its quality, is under test here.
MAKE_ARGS = {"w4a16_awq_g64": ["--samples", "4"]}
PROMPT = "The Jargon File is a glossary of"
N_GEN = 24
N_CTX, N_CHUNKS = 512, int(os.environ.get("QF_PAYLOAD_E2E_CHUNKS", "3"))
HERE = Path(__file__).parent


def _checkpoint(src: Path, recipe: str) -> Path:
    """The recipe's checkpoint of src, made by llm-compressor in QF_PAYLOAD_E2E's Python (cached)."""
    from qf.tools.fetch import cache_dir

    out = cache_dir() / "e2e" / f"{src.name.rsplit('-', 1)[-1]}-{recipe}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        subprocess.run(["nice", "-n", "5", PYTHON, str(HERE / "payload_e2e_make.py"), str(src), str(out), recipe,
                        *MAKE_ARGS.get(recipe, [])],
                       check=True, env=env)
    return out


def _asymmetric(qdir: Path) -> bool:
    """Whether a compressed-tensors checkpoint's weights carry zero points."""
    groups = json.loads((qdir / "config.json").read_text())["quantization_config"].get("config_groups", {})
    return any((g.get("weights") or {}).get("symmetric") is False for g in groups.values())


def _hf_model(qdir: Path):
    """transformers' model of the checkpoint, f32 on CPU (compressed-tensors decompresses it on load).

    Zero points: transformers 5.24 with compressed-tensors 0.20 builds the compressed modules with an unpacked
    weight_zero_point [n_out, groups] and refuses the checkpoint's packed [n_out / 8, groups] ("size mismatch");
    dequantize=True (run_compressed=False in older transformers) decompresses at load instead: the same weights as
    llm-compressor's own transformers 5.17 / compressed-tensors 0.19 decompress (checked equal on the AWQ
    checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    dq = ({"dequantize": True} if "dequantize" in inspect.signature(CompressedTensorsConfig).parameters
          else {"run_compressed": False})
    kw = {"quantization_config": CompressedTensorsConfig(**dq)} if _asymmetric(qdir) else {}
    return AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.float32, **kw).eval()


def _hf_logits(model):
    """tokens [n] -> f32 logits [n, vocab] from transformers."""
    import torch

    def run(chunk: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(chunk[None], dtype=torch.long)).logits[0].float().numpy()
    return run


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, from transformers."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.as_tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def _record(recipe: str, fig: dict) -> None:
    """Print a recipe's figures and merge them into cache_dir()/e2e/figures.json."""
    from qf.tools.fetch import cache_dir

    print(f"\n{recipe}: {json.dumps(fig)}", file=sys.stderr)
    path = cache_dir() / "e2e" / "figures.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old[recipe] = fig
    path.write_text(json.dumps(old, indent=1))


@pytest.mark.parametrize("recipe", RECIPES)
def test_llmcompressor_checkpoint_runs_as_transformers(smollm2_hf, tmp_path, recipe):
    from qf.convert.pipeline import convert
    from qf.eval.text import evaluation_text
    from qf.format.reader import open_gguf
    from qf.quant.formats import PAYLOAD_SCHEMES_KEY
    from qf.runtime import Model

    qdir = _checkpoint(Path(smollm2_hf), recipe)
    out = tmp_path / f"{recipe}.qf"
    summary = convert(qdir, out, "F16")
    with open_gguf(out) as f:
        schemes = sorted(set(f.meta.get_array(PAYLOAD_SCHEMES_KEY))) if PAYLOAD_SCHEMES_KEY in f.meta else []
        types = sorted({t.type.name for n, t in f.tensors.items() if n.endswith("attn_q.weight")})
    hf = _hf_model(qdir)
    with Model.load(out, n_ctx=N_CTX, type_k="f32", type_v="f32") as m:
        ids = m.tokenize(PROMPT)
        g = m.generate(ids, max_tokens=N_GEN, temperature=0)
        "".join(g)
        ours = list(g.tokens)
        tokens = np.asarray(m.tokenize(evaluation_text()), dtype=np.int64)
        bos = m.bos_id if m.add_bos else None
        plan = plan_chunks(tokens.size, N_CTX, N_CHUNKS, bos)
        ppl_ours = perplexity(lambda c: m.logits(c.tolist()), tokens, plan).ppl
    from compressed_tensors.quantization import disable_quantization, enable_quantization

    groups = json.loads((qdir / "config.json").read_text())["quantization_config"].get("config_groups", {})
    ppl_qdq: float | str | None = None
    if any(g.get("input_activations") for g in groups.values()):
        try:  # transformers as loaded also fake-quantizes each linear's input (FP8 dynamic): a figure only
            ppl_qdq = round(perplexity(_hf_logits(hf), tokens, plan).ppl, 4)
        except RuntimeError as e:  # compressed-tensors' group-128 activation QDQ on 576-wide inputs
            ppl_qdq = f"transformers failed: {str(e)[:120]}"
    hf.apply(disable_quantization)  # the weights as compressed-tensors decompressed them, f32 activations: ours
    theirs = _hf_greedy(hf, list(ids), N_GEN)
    ppl_hf = perplexity(_hf_logits(hf), tokens, plan).ppl
    hf.apply(enable_quantization)
    fig = {"schemes": schemes, "attn_q types": types, "ppl_qf": round(ppl_ours, 4), "ppl_transformers":
           round(ppl_hf, 4), "ppl_rel_diff": round(ppl_ours / ppl_hf - 1, 6),
           "greedy_equal": ours == theirs[:len(ours)],
           "ppl_transformers_with_activation_qdq": ppl_qdq,
           "n_chunks": plan.n_chunks, "n_ctx": N_CTX, "notes": list(getattr(summary, "notes", ()))[:3]}
    _record(recipe, fig)
    assert ours == theirs[:len(ours)] and len(ours) > 0, (ours, theirs)
    assert math.isclose(ppl_ours, ppl_hf, rel_tol=0.005), (ppl_ours, ppl_hf)
