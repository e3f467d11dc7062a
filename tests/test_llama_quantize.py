"""Our qquantize against llama.cpp's own llama-quantize: the same F16 input gives byte-identical tensors.

Skipped unless QF_LLAMA_QUANTIZE names a llama-quantize binary. To build one offline from the
llama-cpp-python sdist on PyPI (its vendor/llama.cpp is the full source):

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF \\
        && cmake --build build --target llama-quantize -j2          # ~10 min on 2 cores
    export QF_LLAMA_QUANTIZE=$PWD/build/bin/llama-quantize

Two inputs: SmolLM2-135M as F16 (rows of 576: most matrices take llama.cpp's fallbacks) and a random
llama whose rows are multiples of 256 (every matrix takes the K type the mix names); each also with a
random importance matrix (GGUF and legacy .dat formats), which switches the quantizers to their weighted
searches and adds the quantize.imatrix.* keys.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qf.convert.pipeline import convert
from qf.format.checksum import RESERVED_KEYS
from qf.format.ggml_types import GGMLType
from qf.format.reader import open_gguf
from qf.quant.codecs import registered_types
from qf.quant.mixes import Overrides, get_mix, mix_names
from qf.quant.requantize import requantize

LLAMA_QUANTIZE = os.environ.get("QF_LLAMA_QUANTIZE")
pytestmark = pytest.mark.skipif(not (LLAMA_QUANTIZE and os.access(LLAMA_QUANTIZE, os.X_OK)),
                                reason="set QF_LLAMA_QUANTIZE to a llama-quantize binary to compare with llama.cpp")
# The IQ mixes of issue 12 (IQ4_NL / IQ4_XS predate it and stay in TYPES); tested with importance matrices below.
IQ_MIXES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL",
            "IQ4_XS", "Q2_K_S"]
TYPES = [t for t in mix_names() if get_mix(t).default in set(registered_types()) and t not in ("F32", "F16", "BF16")
         and (t not in IQ_MIXES or t.startswith("IQ4"))]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, smollm2_hf, tiny_checkpoint_module) -> dict[str, Path]:
    """F16 .qf inputs: SmolLM2, a 256-aligned random llama, and one with n_head / n_head_kv = 4 (attn_v rules)."""
    d = tmp_path_factory.mktemp("lq-src")
    aligned = tiny_checkpoint_module(config={"hidden_size": 256, "intermediate_size": 512,
                                             "num_attention_heads": 4, "num_key_value_heads": 2}, layers=4)
    gqa4 = tiny_checkpoint_module(config={"hidden_size": 256, "intermediate_size": 512,
                                          "num_attention_heads": 8, "num_key_value_heads": 2}, layers=4)
    out = {}
    for name, src in (("smollm2", smollm2_hf), ("aligned", aligned), ("gqa4", gqa4)):
        out[name] = convert(src, d / f"{name}-f16.qf", "F16").path
    return out


@pytest.fixture(scope="module")
def imatrices(sources, tmp_path_factory) -> dict[str, Path]:
    """Random importance for every matrix: GGUF format for the aligned model, legacy .dat for SmolLM2."""
    from imatrix_files import random_imatrix

    d = tmp_path_factory.mktemp("lq-imatrix")
    return {"aligned": random_imatrix(d / "aligned.gguf", sources["aligned"], fmt="gguf"),
            "smollm2": random_imatrix(d / "smollm2.dat", sources["smollm2"], fmt="dat")}


def _llama_quantize(src: Path, dst: Path, qtype: str, args: list[str]) -> None:
    """Run llama-quantize (1 thread); its log goes into the assertion message on failure."""
    r = subprocess.run([LLAMA_QUANTIZE, *args, str(src), str(dst), qtype, "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _compare(theirs: Path, ours: Path) -> None:
    """Same tensors (by name: llama.cpp reorders them), types and bytes; same metadata but our checksums."""
    a, b = open_gguf(theirs), open_gguf(ours)
    try:
        assert set(a.tensors) == set(b.tensors)
        bad = [n for n, t in a.tensors.items()
               if t.type != b.tensors[n].type or not np.array_equal(a.raw(n), b.raw(n))]
        assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"
        keys = (set(a.meta.keys()) | set(b.meta.keys())) - RESERVED_KEYS
        diff = [k for k in sorted(keys) if k not in a.meta or k not in b.meta
                or str(a.meta.raw(k)[1]) != str(b.meta.raw(k)[1])]
        assert not diff, f"metadata differs: {diff}"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("model", ["smollm2", "aligned"])
def test_mix_bytes_equal_llama_quantize(sources, tmp_path, model, qtype):
    _llama_quantize(sources[model], tmp_path / "lc.gguf", qtype, [])
    requantize(sources[model], tmp_path / "ours.qf", qtype)
    _compare(tmp_path / "lc.gguf", tmp_path / "ours.qf")


IQ4 = [t for t in ("IQ4_NL", "IQ4_XS") if t in TYPES]


@pytest.mark.parametrize("qtype", IQ4)
def test_iq4_gqa4_bytes_equal_llama_quantize(sources, tmp_path, qtype):
    """IQ4_NL / IQ4_XS put attn_v at Q5_K when n_gqa >= 4."""
    _llama_quantize(sources["gqa4"], tmp_path / "lc.gguf", qtype, [])
    requantize(sources["gqa4"], tmp_path / "ours.qf", qtype)
    _compare(tmp_path / "lc.gguf", tmp_path / "ours.qf")


@pytest.mark.parametrize("args,overrides", [
    (["--pure"], Overrides(pure=True)),
    (["--tensor-type", "attn_v=q8_0", "--tensor-type", "ffn_down=q5_k"],
     Overrides(tensor_types=(("attn_v", GGMLType.Q8_0), ("ffn_down", GGMLType.Q5_K)))),
])
def test_options_bytes_equal_llama_quantize(sources, tmp_path, args, overrides):
    _llama_quantize(sources["aligned"], tmp_path / "lc.gguf", "Q4_K_M", args)
    requantize(sources["aligned"], tmp_path / "ours.qf", "Q4_K_M", overrides)
    _compare(tmp_path / "lc.gguf", tmp_path / "ours.qf")


@pytest.mark.parametrize("model,qtype", [("aligned", t) for t in TYPES] + [("smollm2", "Q4_K_M"), ("smollm2", "Q4_0")]
                         + [("smollm2", t) for t in IQ4])
def test_imatrix_bytes_equal_llama_quantize(sources, imatrices, tmp_path, model, qtype):
    from qf.quant.imatrix import load_imatrix

    imx = str(imatrices[model])
    _llama_quantize(sources[model], tmp_path / "lc.gguf", qtype, ["--imatrix", imx])
    requantize(sources[model], tmp_path / "ours.qf", qtype, imatrix=load_imatrix(imx))
    _compare(tmp_path / "lc.gguf", tmp_path / "ours.qf")


# ---------------------------------------------------------------------------------------------- IQ mixes
# The 13 low-bit mixes: per-tensor types against llama-quantize --dry-run (rules only: every type taken as
# available), the refusal without an importance matrix, and whole files byte for byte with an importance
# matrix from llama-imatrix and from our qimatrix, on SmolLM2 and on an 8-layer 256-aligned llama (so the
# "first eighth" and middle-layer rules fire). A mix whose types have no codec here yet fails the byte test.

REFUSED = [t for t in IQ_MIXES if t not in ("IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS")]  # need an importance matrix


def _tool(name: str) -> str:
    """A llama.cpp tool built beside llama-quantize."""
    return str(Path(LLAMA_QUANTIZE).with_name(name))


@pytest.fixture(scope="module")
def iq_sources(sources, tmp_path_factory, tiny_checkpoint_module) -> dict[str, Path]:
    """SmolLM2 F16, and 8-layer 256-aligned llamas with n_gqa 2 and 4."""
    d = tmp_path_factory.mktemp("lq-iq-src")
    out = {"smollm2": sources["smollm2"]}
    for name, heads in (("aligned8", 4), ("gqa4_8", 8)):
        ckpt = tiny_checkpoint_module(config={"hidden_size": 256, "intermediate_size": 512,
                                              "num_attention_heads": heads, "num_key_value_heads": 2}, layers=8)
        out[name] = convert(ckpt, d / f"{name}-f16.qf", "F16").path
    return out


@pytest.fixture(scope="module")
def iq_imatrices(iq_sources, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(model, source) -> imatrix: llama-imatrix's and qimatrix's over the same calibration text."""
    from qf.eval.imatrix import compute_imatrix, save_imatrix
    from qf.eval.text import calibration_text

    d = tmp_path_factory.mktemp("lq-iq-imatrix")
    text = calibration_text()[:20000]
    (d / "calib.txt").write_text(text)
    out = {}
    for model in ("smollm2", "aligned8"):
        lc = d / f"{model}-llama.imatrix.gguf"
        r = subprocess.run([_tool("llama-imatrix"), "-m", str(iq_sources[model]), "-f", str(d / "calib.txt"),
                            "-o", str(lc), "-c", "128", "--chunks", "8", "-t", "2", "--no-ppl"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and lc.is_file(), r.stdout[-2000:] + r.stderr[-2000:]
        stats, n = compute_imatrix(iq_sources[model], text, n_ctx=128, max_chunks=8)
        out[(model, "llama-imatrix")] = lc
        out[(model, "qimatrix")] = save_imatrix(d / f"{model}-qimatrix.gguf", stats, n, 128, "calib.txt")
    return out


def _dry_run_types(src: Path, qtype: str, args: list[str]) -> dict[str, str]:
    """llama-quantize --dry-run: the type it picks for each tensor it quantizes (lower-case ggml names)."""
    import re

    r = subprocess.run([LLAMA_QUANTIZE, "--dry-run", *args, str(src), str(src) + ".dry", qtype, "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    pat = re.compile(r"\]\s+(\S+)\s+- \[.*\(\s*(\w+)\)\s*$")
    return {m.group(1): m.group(2) for m in map(pat.search, (r.stdout + r.stderr).splitlines()) if m}


@pytest.mark.parametrize("qtype", IQ_MIXES)
@pytest.mark.parametrize("model", ["smollm2", "aligned8", "gqa4_8"])
def test_iq_mix_types_equal_llama_quantize_dry_run(iq_sources, tmp_path, monkeypatch, model, qtype):
    """Rules only: every ggml type counts as available, so the types match whatever codecs exist."""
    from imatrix_files import random_imatrix

    from qf.quant import requantize as rq
    from qf.quant.imatrix import load_imatrix

    imx = random_imatrix(tmp_path / "imx.gguf", iq_sources[model])
    monkeypatch.setattr(rq, "storage_types", lambda: frozenset(GGMLType))
    for args, imatrix in (([], None), (["--imatrix", str(imx)], load_imatrix(imx))):
        if imatrix is None and qtype in REFUSED:
            continue  # refused without one (test below); llama.cpp's dry run only warns
        theirs = _dry_run_types(iq_sources[model], qtype, args)
        with open_gguf(iq_sources[model]) as f:
            plan = rq.plan_requantize(f, qtype, imatrix=imatrix)
        ours = {t.name: t.type.name.lower() for t in plan.tensors if t.name in theirs}
        assert theirs and ours == {n: t.lower() for n, t in theirs.items()}, (args, theirs, ours)


@pytest.mark.parametrize("qtype", REFUSED)
def test_iq_mix_refused_without_imatrix(iq_sources, tmp_path, qtype):
    from qf.format.errors import QFError

    r = subprocess.run([LLAMA_QUANTIZE, str(iq_sources["aligned8"]), str(tmp_path / "lc.gguf"), qtype, "1"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "requires an importance matrix" in r.stdout + r.stderr
    with pytest.raises(QFError, match="requires an importance matrix"):
        requantize(iq_sources["aligned8"], tmp_path / "ours.qf", qtype)
    assert not (tmp_path / "ours.qf").exists()


@pytest.mark.parametrize("qtype", IQ_MIXES)
@pytest.mark.parametrize("imatrix_from", ["llama-imatrix", "qimatrix"])
@pytest.mark.parametrize("model", ["aligned8", "smollm2"])
def test_iq_mix_bytes_equal_llama_quantize(iq_sources, iq_imatrices, tmp_path, model, imatrix_from, qtype):
    from qf.quant.imatrix import load_imatrix

    imx = str(iq_imatrices[(model, imatrix_from)])
    _llama_quantize(iq_sources[model], tmp_path / "lc.gguf", qtype, ["--imatrix", imx])
    requantize(iq_sources[model], tmp_path / "ours.qf", qtype, imatrix=load_imatrix(imx))
    _compare(tmp_path / "lc.gguf", tmp_path / "ours.qf")


# ------------------------------------------------------------------------------ IQ2 / IQ3 codecs, --pure
# Every quantizable tensor at the mix's default type (rows that are not a multiple of 256 take llama.cpp's
# fallback), so the bytes test the codecs rather than the mix rules. llama.cpp's IQ2_S file type defaults to
# IQ2_XS tensors and IQ2_M to IQ2_S; without an importance matrix it refuses all but IQ3_S.

IQ23 = {"IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_M", "IQ3_XXS": "IQ3_XXS", "IQ3_S": "IQ3_S"}
IQ23_CASES = [(t, src) for t in IQ23 for src in ("llama-imatrix", "qimatrix")] + [("IQ3_S", None)]


@pytest.mark.parametrize("codec,imatrix_from", IQ23_CASES)
@pytest.mark.parametrize("model", ["aligned8", "smollm2"])
def test_iq23_pure_bytes_equal_llama_quantize(iq_sources, iq_imatrices, tmp_path, model, codec, imatrix_from):
    from qf.quant.imatrix import load_imatrix

    ftype = IQ23[codec]
    imx = None if imatrix_from is None else str(iq_imatrices[(model, imatrix_from)])
    args, ov = ["--pure"] + (["--imatrix", imx] if imx else []), Overrides(pure=True)
    if codec in ("IQ2_XXS", "IQ2_XS"):  # the embeddings have no importance: ggml would assert
        args += ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
        ov = Overrides(pure=True, output_type=GGMLType.Q8_0, token_embd_type=GGMLType.Q8_0)
    _llama_quantize(iq_sources[model], tmp_path / "lc.gguf", ftype, args)
    requantize(iq_sources[model], tmp_path / "ours.qf", ftype, ov, imatrix=load_imatrix(imx) if imx else None)
    _compare(tmp_path / "lc.gguf", tmp_path / "ours.qf")
    with open_gguf(tmp_path / "ours.qf") as f:
        assert any(t.type == GGMLType[codec] for t in f.tensors.values())
