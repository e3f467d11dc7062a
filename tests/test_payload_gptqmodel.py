"""SmolLM2 quantized by GPTQModel as classic GPTQ with desc_act (opt-in): `qconvert` keeps the act-order payload,
our runtime answers as GPTQModel's own CPU load of the same checkpoint does.

    QF_PAYLOAD_GPTQMODEL=/path/to/python-with-gptqmodel python -m pytest -s tests/test_payload_gptqmodel.py

The Python named by QF_PAYLOAD_GPTQMODEL must import gptqmodel (7.7 was used: it declares a CUDA torch, so it
goes into a venv with --system-site-packages and `pip install --no-deps gptqmodel==7.7.*`; GPTQMODEL_CPU_WORKERS
is set to 2). tests/payload_gptqmodel_make.py quantizes SmolLM2 there (4 bits, group 64, symmetric,
desc_act=True: a non-monotonic g_idx; 16 x 512 calibration tokens of the Jargon File calibration slice, about
5 minutes on 2 cores), cached under cache_dir()/gptqmodel keyed by the SmolLM2 export it came from, and then
gives the reference: GPTQModel loads the checkpoint on the CPU (BACKEND.TORCH; its TorchLinear kernel takes
fp16/bf16 only, so each TorchLinear's own dequantize_weight, scales[g_idx] * (q - zeros[g_idx]) with the scales
upcast to f32, becomes a float32 nn.Linear of the transformers model it wraps, and the unquantized tensors are
read again in f32), which generates greedily and scores the first chunks of the Jargon File evaluation slice
in f32, as our runtime computes. Ours: the act-order payload is kept (not transcoded), greedy tokens equal,
perplexity within 0.5% (measured: 38.5599 both, 3 x 512 tokens, greedy equal; quantization ~5 min, the whole
test ~16 min on a loaded 2-core machine).
Figures are printed (-s) and written to cache_dir()/gptqmodel/figures.json.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qf.eval.perplexity import perplexity, plan_chunks

PYTHON = os.environ.get("QF_PAYLOAD_GPTQMODEL")
pytestmark = pytest.mark.skipif(not PYTHON, reason="set QF_PAYLOAD_GPTQMODEL to a Python that imports gptqmodel")

RECIPE = "gptq_w4g64_desc_act"
PROMPT = "The Jargon File is a glossary of"
N_GEN = 24
N_CTX, N_CHUNKS = 512, int(os.environ.get("QF_PAYLOAD_GPTQMODEL_CHUNKS", "3"))
HERE = Path(__file__).parent


def _run(*args: str) -> None:
    """tests/payload_gptqmodel_make.py with args, in QF_PAYLOAD_GPTQMODEL's Python (niced, this repo importable)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "GPTQMODEL_CPU_WORKERS": "2"}
    subprocess.run(["nice", "-n", "5", PYTHON, str(HERE / "payload_gptqmodel_make.py"), *args], check=True, env=env)


def _checkpoint(src: Path) -> Path:
    """GPTQModel's desc_act checkpoint of src (cached)."""
    from qf.tools.fetch import cache_dir

    out = cache_dir() / "gptqmodel" / f"{src.name.rsplit('-', 1)[-1]}-{RECIPE}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _run("make", str(src), str(out))
    return out


def _record(fig: dict) -> None:
    """Print the figures and merge them into cache_dir()/gptqmodel/figures.json."""
    from qf.tools.fetch import cache_dir

    print(f"\n{RECIPE}: {json.dumps(fig)}", file=sys.stderr)
    path = cache_dir() / "gptqmodel" / "figures.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old[RECIPE] = fig
    path.write_text(json.dumps(old, indent=1))


def test_gptqmodel_desc_act_checkpoint_runs_as_gptqmodel(smollm2_hf, tmp_path):
    from qf.convert.pipeline import convert
    from qf.eval.text import evaluation_text
    from qf.format.reader import open_gguf
    from qf.quant.formats import PAYLOAD_SCHEMES_KEY
    from qf.runtime import Model

    qdir = _checkpoint(Path(smollm2_hf))
    qcfg = json.loads((qdir / "config.json").read_text())["quantization_config"]
    assert qcfg["desc_act"] and qcfg["quant_method"] == "gptq", qcfg
    from safetensors import safe_open

    with safe_open(qdir / "model.safetensors", "np") as st:
        g = st.get_tensor("model.layers.0.self_attn.q_proj.g_idx")
    assert np.any(np.diff(g) < 0), "desc_act should give a non-monotonic g_idx"
    out = tmp_path / f"{RECIPE}.qf"
    summary = convert(qdir, out, "F16")
    with open_gguf(out) as f:
        schemes = sorted(set(f.meta.get_array(PAYLOAD_SCHEMES_KEY))) if PAYLOAD_SCHEMES_KEY in f.meta else []
    assert any("g_idx=1" in s for s in schemes), schemes  # the act-order payload is kept, not transcoded
    with Model.load(out, n_ctx=N_CTX, type_k="f32", type_v="f32") as m:
        ids = list(m.tokenize(PROMPT))
        gen = m.generate(ids, max_tokens=N_GEN, temperature=0)
        "".join(gen)
        ours = list(gen.tokens)
        tokens = np.asarray(m.tokenize(evaluation_text()), dtype=np.int64)
        bos = m.bos_id if m.add_bos else None
        plan = plan_chunks(tokens.size, N_CTX, N_CHUNKS, bos)
        ppl_ours = perplexity(lambda c: m.logits(c.tolist()), tokens, plan).ppl
    np.save(tmp_path / "tokens.npy", tokens)
    ref_path = tmp_path / "reference.json"
    extra = [] if bos is None else ["--bos", str(bos)]
    _run("reference", str(qdir), str(tmp_path / "tokens.npy"), str(ref_path), "--prompt-ids",
         ",".join(map(str, ids)), "--n-gen", str(N_GEN), "--n-ctx", str(N_CTX), "--n-chunks", str(N_CHUNKS), *extra)
    ref = json.loads(ref_path.read_text())
    theirs, ppl_ref = ref["greedy"], ref["ppl"]
    fig = {"schemes": schemes, "ppl_qf": round(ppl_ours, 4), "ppl_gptqmodel": round(ppl_ref, 4),
           "ppl_rel_diff": round(ppl_ours / ppl_ref - 1, 6), "greedy_equal": ours == theirs[:len(ours)],
           "reference_kernels": ref["kernels"], "n_chunks": plan.n_chunks, "n_ctx": N_CTX,
           "notes": list(getattr(summary, "notes", ()))[:3]}
    _record(fig)
    assert ref["n_chunks"] == plan.n_chunks
    assert ours == theirs[:len(ours)] and len(ours) > 0, (ours, theirs)
    assert math.isclose(ppl_ours, ppl_ref, rel_tol=0.005), (ppl_ours, ppl_ref)
