"""Calibrated conversion (qf.calib, `qconvert --type GPTQ-... --calib FILE`): bad calibration input is refused
before anything is written; GPTQ files of a tiny llama run in our runtime with logits close to F32; GPTQ over
ggml mixes writes ordinary blocks gguf decodes; a group the rows cannot take says why."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from qf.calib.data import CalibOptions, read_documents, sample_windows
from qf.calib.driver import convert_calibrated
from qf.convert.pipeline import convert
from qf.format.errors import ConvertError, QFError
from qf.quant.codecs import get_codec
from qf.quant.methods import get_spec
from qf.runtime.api import Model
from qf.tools.qconvert import main as qconvert

TEXT = ("The quick brown fox jumps over the lazy dog while the calibration text goes on about hackers, "
        "jargon and the lore of computing. ") * 40
PROMPT = [5, 9, 3, 17, 2, 11, 8, 4, 13, 6]


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def _logits(path: Path) -> np.ndarray:
    """Our runtime's logits for PROMPT, f32 [len, n_vocab]."""
    m = Model.load(path, n_ctx=64, warmup=False)
    try:
        return np.asarray(m.logits(PROMPT), np.float32)
    finally:
        m.close()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("content,match", [
    (b"", "empty"), (b"   \n\n", "empty"), (b"\x00\x01binary\x00" * 50, "binary"), (b"\xff\xfe" * 100, "UTF-8"),
    (b"too short", "characters"), (b'{"messages": 3}\n', "expected"), (b'{"messages": [\n', "not JSON"),
])
def test_bad_calibration_text_is_refused(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(ConvertError, match=match):
        read_documents(p)


def test_bad_calibration_fails_before_writing(tiny_checkpoint, tmp_path: Path) -> None:
    d = tiny_checkpoint()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(range(256)) * 8)
    out = tmp_path / "out.qf"
    r = CliRunner().invoke(qconvert, [str(d), str(out), "--type", "GPTQ-W4G32", "--calib", str(bad)])
    assert r.exit_code == 2 and "binary" in r.output
    assert not out.exists() and not list(tmp_path.glob(".out.qf*"))
    r = CliRunner().invoke(qconvert, [str(d), str(out), "--type", "GPTQ-W4G32"])
    assert r.exit_code == 2 and "--calib" in r.output and not out.exists()


def test_fewer_tokens_than_a_window_is_an_error(tiny_checkpoint, tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("a short text that tokenizes to fewer tokens than the window " * 2)
    with pytest.raises(ConvertError, match="fewer than one window"):
        convert_calibrated(tiny_checkpoint(), tmp_path / "o.qf", get_spec("GPTQ-W4G32"),
                           CalibOptions(p, 4, 4096), log=lambda s: None)
    assert not (tmp_path / "o.qf").exists()


def test_windows_are_seeded() -> None:
    docs = [np.arange(1000, dtype=np.int64) + 10]
    a = sample_windows(docs, CalibOptions(Path("x"), 8, 16, seed=3), bos=1)
    b = sample_windows(docs, CalibOptions(Path("x"), 8, 16, seed=3), bos=1)
    c = sample_windows(docs, CalibOptions(Path("x"), 8, 16, seed=4), bos=1)
    assert a.shape == (8, 16) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert (a[:, 0] == 1).all() and np.all(np.diff(a[:, 1:], axis=1) == 1)


@pytest.mark.parametrize("qtype,act,expect", [
    ("GPTQ-W4G32", "static", {"Q4_0"}),  # symmetric, contiguous groups: exact Q4_0
    ("GPTQ-W4G32-ASYM", "none", {"I32", "F16", "I16"}),  # the int payload with zero points
    ("GPTQ-W8G64", "g_idx", {"I32", "F16"}),  # act-order with g_idx: payload
])
def test_gptq_file_runs_close_to_f32(tiny_checkpoint, tmp_path: Path, calib_file: Path, qtype: str, act: str,
                                     expect: set[str]) -> None:
    d = tiny_checkpoint(seed=1)
    ref = tmp_path / "f32.qf"
    convert(d, ref, "F32")
    out = tmp_path / "gptq.qf"
    r = CliRunner().invoke(qconvert, [str(d), str(out), "--type", qtype, "--calib", str(calib_file),
                                      "--calib-samples", "8", "--calib-seqlen", "32", "--act-order", act])
    assert r.exit_code == 0, r.output
    assert "layer 2/2" in r.output and "per-layer relative output error" in r.output
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) > 1 or t.name.endswith("idx")}
    assert expect <= types
    assert _rel(_logits(out), _logits(ref)) < (0.05 if "W8" in qtype else 0.35)  # random weights: 4 bits move them


def test_gptq_beats_rtn_end_to_end(tiny_checkpoint, tmp_path: Path, calib_file: Path) -> None:
    d = tiny_checkpoint(seed=2)
    ref = tmp_path / "f32.qf"
    convert(d, ref, "F32")
    base = _logits(ref)
    opts = CalibOptions(calib_file, 16, 32)
    errs = {}
    for t in ("RTN-W4G32", "GPTQ-W4G32"):
        convert_calibrated(d, tmp_path / f"{t}.qf", get_spec(t), opts, log=lambda s: None)
        errs[t] = _rel(_logits(tmp_path / f"{t}.qf"), base)
    assert errs["GPTQ-W4G32"] < errs["RTN-W4G32"], errs


def test_chat_jsonl_calibration(tiny_checkpoint, tmp_path: Path) -> None:
    p = tmp_path / "chat.jsonl"
    convs = [{"messages": [{"role": "user", "content": f"question {i} about the jargon file and hackers"},
                           {"role": "assistant", "content": "an answer about hacker lore " * 5}]} for i in range(20)]
    p.write_text("\n".join(json.dumps(c) for c in convs), encoding="utf-8")
    out = tmp_path / "o.qf"
    s = convert_calibrated(tiny_checkpoint(), out, get_spec("GPTQ-W4G32"), CalibOptions(p, 4, 32), log=lambda s: None)
    assert out.exists() and any("calibration" in n for n in s.notes)


def test_gptq_over_k_quants_decodes_with_gguf(tiny_checkpoint, tmp_path: Path, calib_file: Path) -> None:
    d = tiny_checkpoint(config={"hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 4,
                                "num_key_value_heads": 2}, seed=3, tied=False)
    ref, out = tmp_path / "f32.qf", tmp_path / "q4km-gptq.qf"
    convert(d, ref, "F32")
    r = CliRunner().invoke(qconvert, [str(d), str(out), "--type", "Q4_K_M", "--method", "gptq", "--calib",
                                      str(calib_file), "--calib-samples", "8", "--calib-seqlen", "32"])
    assert r.exit_code == 0, r.output
    plain = tmp_path / "q4km.qf"
    convert(d, plain, "Q4_K_M")
    want = {t.name: t.tensor_type for t in gguf.GGUFReader(plain).tensors}
    seen = set()
    for t in gguf.GGUFReader(out).tensors:
        assert t.tensor_type == want[t.name], t.name  # llama.cpp's per-tensor types, as the mix chooses
        if t.name.startswith("blk.") and len(t.shape) > 1:
            codec = get_codec(int(t.tensor_type))
            ours = codec.dequantize(np.asarray(t.data).reshape(t.shape[1] if len(t.shape) > 1 else 1, -1))
            theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            assert np.array_equal(ours.reshape(theirs.shape), theirs)
            seen.add(t.tensor_type.name)
    assert {"Q4_K", "Q6_K"} <= seen
    assert _rel(_logits(out), _logits(ref)) < 0.35


def test_group_that_does_not_divide_rows_says_why(tiny_checkpoint, tmp_path: Path, calib_file: Path) -> None:
    d = tiny_checkpoint(config={"hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 4,
                                "num_key_value_heads": 2})
    out = tmp_path / "o.qf"
    with pytest.raises(QFError, match=r"96 inputs, not a whole number of groups of 64 \(96 = 1.5 x 64\)"):
        convert_calibrated(d, out, get_spec("GPTQ-W4G64"), CalibOptions(calib_file, 4, 32), log=lambda s: None)
    assert not out.exists()


def test_calibration_windows_are_the_ones_qconvert_samples(tiny_checkpoint, calib_file: Path) -> None:
    """calibration_windows (for feeding another tool the same tokens) = the driver's own windows."""
    from qf.calib.data import tokenize
    from qf.calib.driver import calibration_windows
    from qf.calib.model import CalibModel
    from qf.convert.pipeline import plan_conversion
    d = tiny_checkpoint()
    opts = CalibOptions(calib_file, 4, 16, seed=5)
    got = calibration_windows(d, opts)
    plan, ckpt = plan_conversion(Path(d), "F16")
    try:
        m = CalibModel(plan, ckpt, Path(d), 1)
        ids = tokenize([TEXT], None, m.encode_text, m.render)
        want = sample_windows(ids, opts, m.tokenizer.bos_id if m.tokenizer.vocab.add_bos else None)
    finally:
        ckpt.close()
    assert got.shape == (4, 16) and np.array_equal(got, want)
