"""llama.cpp and payload checkpoints (opt-in): a symmetric W4 checkpoint made by compressed-tensors from SmolLM2
becomes a file of ggml types (Q4_0) that llama.cpp runs with our perplexity; a file that keeps native
payloads is refused by llama.cpp's loader, never misread.

    QF_LLAMA_BIN=/path/to/llama.cpp/build/bin python -m pytest -s tests/test_payload_llamacpp.py

QF_LLAMA_BIN is a folder with llama-perplexity and llama-completion (built from the llama-cpp-python sdist's
vendor/llama.cpp, as for tests/test_llama_quantize.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("compressed_tensors")

from payload_fixtures import ct_checkpoint  # noqa: E402

from qf.convert.pipeline import convert  # noqa: E402
from qf.eval.perplexity import perplexity, plan_chunks  # noqa: E402
from qf.eval.text import evaluation_text  # noqa: E402
from qf.format.reader import open_gguf  # noqa: E402
from qf.quant.formats import PAYLOAD_TENSORS_KEY  # noqa: E402

BIN = os.environ.get("QF_LLAMA_BIN")
pytestmark = pytest.mark.skipif(not (BIN and os.access(Path(BIN) / "llama-perplexity", os.X_OK)),
                                reason="set QF_LLAMA_BIN to a folder with llama.cpp's llama-perplexity")
N_CTX, N_CHUNKS = 512, 3
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


@pytest.fixture(scope="module")
def w4_checkpoint(smollm2_hf, tmp_path_factory) -> Path:
    """SmolLM2 as compressed-tensors W4A16 group 64 symmetric (fp16-valued scales, as GPTQ writes them)."""
    out = tmp_path_factory.mktemp("w4") / "ckpt"
    ct_checkpoint(Path(smollm2_hf), out, "w4a16_g64_sym", f16_scales=True)
    return out


def _llama(tool: str, *args: str) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool on 2 threads, output captured."""
    return subprocess.run([str(Path(BIN) / tool), "-t", "2", *args], capture_output=True, text=True, timeout=1800)


def _our_ppl(path: Path, text: str) -> float:
    """Our perplexity of the file on the first N_CHUNKS chunks of text (qperplexity's scoring)."""
    from qf.runtime import Model

    with Model.load(path, n_ctx=N_CTX) as m:
        tokens = np.asarray(m.tokenize(text), dtype=np.int64)
        plan = plan_chunks(tokens.size, N_CTX, N_CHUNKS, m.bos_id if m.add_bos else None)
        return perplexity(lambda c: m.logits(c.tolist()), tokens, plan).ppl


def test_transcoded_w4_runs_in_llamacpp(w4_checkpoint, tmp_path):
    out = tmp_path / "w4.qf"
    convert(w4_checkpoint, out, "F16")
    with open_gguf(out) as f:
        assert PAYLOAD_TENSORS_KEY not in f.meta  # every payload became a ggml tensor
        assert f.tensors["blk.0.attn_q.weight"].type.name == "Q4_0"
    text = tmp_path / "eval.txt"
    text.write_text(evaluation_text())
    r = _llama("llama-perplexity", "-m", str(out), "-f", str(text), "-c", str(N_CTX), "--chunks", str(N_CHUNKS))
    m = _PPL.search(r.stdout + r.stderr)
    assert r.returncode == 0 and m, r.stderr[-2000:]
    theirs, ours = float(m[1]), _our_ppl(out, text.read_text())
    from qf.runtime.kernels import cpu

    parts, cpu.INT8_PARTS = cpu.INT8_PARTS, 1  # activations as llama.cpp's Q4_0 x Q8_0 dot has them
    try:
        ours_q8 = _our_ppl(out, text.read_text())
    finally:
        cpu.INT8_PARTS = parts
    print(f"\nW4 g64 sym -> Q4_0, {N_CHUNKS} x {N_CTX}: llama-perplexity {theirs:.4f}; qf {ours:.4f} "
          f"({ours / theirs - 1:+.5f}); qf with one 8-bit activation part as llama.cpp {ours_q8:.4f} "
          f"({ours_q8 / theirs - 1:+.5f})", file=sys.stderr)
    # like for like: llama.cpp rounds each activation block to Q8_0 for its Q4_0 dot products; our default two
    # 8-bit parts are closer to f32 and land ~0.5% away on these chunks (a figure, not the contract)
    assert abs(ours_q8 / theirs - 1) <= 0.005 and abs(ours / theirs - 1) <= 0.01


def test_native_payload_file_is_refused_by_llamacpp(w4_checkpoint, tmp_path):
    out = tmp_path / "native.qf"
    convert(w4_checkpoint, out, "F16", keep_payload=True)
    with open_gguf(out) as f:
        assert PAYLOAD_TENSORS_KEY in f.meta and "blk.0.attn_q.weight" not in f.tensors
    r = _llama("llama-completion", "-m", str(out), "-p", "The Jargon File", "-n", "4", "-no-cnv", "--temp", "0")
    log = r.stdout + r.stderr
    print("\nllama-completion on a native payload file (exit %d):\n%s" % (
        r.returncode, "\n".join(ln for ln in log.splitlines() if re.search(r"error|failed|missing|wrong", ln, re.I))),
        file=sys.stderr)
    assert r.returncode != 0  # the loader refuses the file: nothing is generated from misread tensors
    assert re.search(r"error loading model: check_tensor_dims: tensor 'blk\.0\.attn_q\.weight' not found", log), log
    assert "failed to load model" in log
