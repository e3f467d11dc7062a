"""qinspect: report contents, --verify exit codes, clean errors."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from qf.format import GGMLType, QFWriter, open_gguf
from qf.tools.qinspect import main


def _small(path, checksums: bool = True) -> None:
    with QFWriter(path, checksums=checksums) as w:
        w.add_kv("general.architecture", "llama")
        w.add_kv("tokenizer.ggml.model", "gpt2")
        w.add_kv("tokenizer.ggml.tokens", [f"tok{i}" for i in range(100)])
        w.add_kv("tokenizer.ggml.merges", ["a b", "c d"])
        w.add_kv("tokenizer.ggml.bos_token_id", 1)
        w.add_kv("tokenizer.chat_template", "{{ messages }}" * 20)
        w.add_tensor_info("blk.0.attn_q.weight", ne=(64, 4), type=GGMLType.Q8_0)
        w.add_tensor_info("blk.0.attn_norm.weight", ne=(64,), type=GGMLType.F32)
        w.write_tensor("blk.0.attn_q.weight", np.arange(4 * 68, dtype=np.uint8) % 7)
        w.write_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_report(tmp_path):
    p = tmp_path / "m.qf"
    _small(p)
    r = run(str(p))
    assert r.exit_code == 0, r.output
    out = r.output
    assert "[STRING x 100] ['tok0', 'tok1', 'tok2', 'tok3', ...]" in out  # long arrays summarized
    assert "(280 chars)" in out  # long strings cut
    assert "vocab size: 100" in out and "merges: 2" in out and "bos: 1 'tok1'" in out
    assert "chat template: yes (280 chars)" in out
    assert "blk.0.attn_q.weight" in out and "4x64" in out and "272" in out
    bpw = (272 + 256) * 8 / (256 + 64)
    assert f"{bpw:.3f} bits per weight" in out
    assert "crc32 for 2 tensors" in out


def test_verify_passes_then_names_the_flipped_tensor(tmp_path):
    p = tmp_path / "m.qf"
    _small(p)
    r = run(str(p), "--verify", "--no-tensors")
    assert r.exit_code == 0 and "2 of 2 tensors pass" in r.output
    with open_gguf(p) as f:
        off = f.tensors["blk.0.attn_norm.weight"].offset + 17
    b = bytearray(p.read_bytes())
    b[off] ^= 1
    p.write_bytes(bytes(b))
    r = run(str(p), "--verify", "--no-tensors")
    assert r.exit_code == 1
    assert "checksum mismatch: blk.0.attn_norm.weight" in r.output
    assert "checksum mismatch: blk.0.attn_q.weight" not in r.output


def test_verify_without_checksums_says_so(tmp_path):
    p = tmp_path / "m.gguf"
    _small(p, checksums=False)
    r = run(str(p), "--verify")
    assert r.exit_code == 0 and "no checksums recorded" in r.output
    assert "checksums: none recorded" in r.output


@pytest.mark.parametrize("data", [b"", b"GGUF\x01\x00\x00\x00" + bytes(16), b"not a model file"])
def test_bad_file_is_a_clean_error(tmp_path, data):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    r = run(str(p))
    assert r.exit_code == 2
    assert r.output.startswith("qinspect: error: ") and str(p) in r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)


def test_missing_file_is_a_clean_error(tmp_path):
    r = run(str(tmp_path / "nope.qf"))
    assert r.exit_code == 2 and "cannot open" in r.output


@pytest.mark.slow
def test_real_model():
    from qf.tools.fetch import fetch_model

    r = run(str(fetch_model()), "--verify")
    assert r.exit_code == 0, r.output
    out = r.output
    for s in ("model: gpt2", "pre: smollm", "vocab size: 49152", "merges: 48900", "bos: 1 '<|im_start|>'",
              "eos: 2 '<|im_end|>'", "chat template: yes", "tensors (272):", "Q4_1 x210, F32 x61, Q8_0 x1",
              "token_embd.weight", "49152x576", "no checksums recorded"):
        assert s in out, s


def _rewrite_like_llama_quantize(src, dst) -> None:
    """gguf-py copies every key (ours included) and writes the tensors in another order, one retyped:
    what llama-quantize does to a .qf it quantizes."""
    import gguf

    with open_gguf(src) as f:
        w = gguf.GGUFWriter(str(dst), arch="llama")
        for k in f.meta.keys():
            vtype, value = f.meta.raw(k)
            if k != "general.architecture":
                et = f.meta.elem_type(k)
                sub = None if et is None else gguf.GGUFValueType(int(et))
                w.add_key_value(k, value.tolist() if isinstance(value, np.ndarray) else value,
                                gguf.GGUFValueType(int(vtype)), sub_type=sub)
        w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
        w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 64), np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def test_checksums_copied_by_a_rewriting_tool_are_called_stale_not_corrupt(tmp_path):
    from qf.format.errors import FormatError

    src, dst = tmp_path / "m.qf", tmp_path / "requantized.gguf"
    _small(src)
    _rewrite_like_llama_quantize(src, dst)
    with open_gguf(dst) as f:
        assert f.has_checksums and f.checksums_stale
        with pytest.raises(FormatError, match="different tensor table"):
            f.verify()
    r = run(str(dst), "--verify", "--no-tensors")
    assert r.exit_code == 0, r.output
    assert "checksums: stale" in r.output and "nothing to verify" in r.output
    assert "checksum mismatch" not in r.output
    with open_gguf(src) as f:  # the original is not stale
        assert not f.checksums_stale and f.verify() == []
