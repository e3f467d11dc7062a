"""Importance matrices: both llama.cpp formats, hostile files, and the quantizers they weight."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from click.testing import CliRunner

from imatrix_files import random_imatrix, write_dat, write_gguf
from qf.convert.pipeline import convert
from qf.format.errors import FormatError
from qf.format.reader import open_gguf
from qf.quant.codecs import get_codec
from qf.quant.imatrix import KV_FILE, KV_N_CHUNKS, KV_N_ENTRIES, load_imatrix
from qf.quant.requantize import requantize

V1 = np.array([1.0, 4.0, 9.0, 0.5], np.float32)


def test_legacy_dat_is_values_over_ncall(tmp_path):
    m = load_imatrix(write_dat(tmp_path / "a.dat", {"blk.0.ffn_up.weight": (4, V1), "x": (0, V1)}))
    assert np.array_equal(m.entries["blk.0.ffn_up.weight"], (V1 / np.float32(4)).reshape(1, 4))
    assert np.array_equal(m.entries["x"], V1.reshape(1, 4))  # ncall 0: as stored
    assert m.chunk_count == 3 and m.datasets == ["calib.txt"]
    bare = load_imatrix(write_dat(tmp_path / "b.dat", {"x": (2, V1)}, chunks=None))
    assert bare.chunk_count == 0 and bare.datasets == []


def test_gguf_is_sums_over_counts_per_matrix(tmp_path):
    sums = np.stack([V1 * 10, V1 * 20])
    m = load_imatrix(write_gguf(tmp_path / "a.gguf", {"blk.0.ffn_up.weight": (sums, np.array([10.0, 0.0]))},
                                chunks=7, datasets=("wiki.txt", "code.txt")))
    imp = m.entries["blk.0.ffn_up.weight"]
    assert np.array_equal(imp[0], V1) and np.array_equal(imp[1], np.ones(4, np.float32))  # count 0 -> 1
    assert m.chunk_count == 7 and m.datasets == ["wiki.txt", "code.txt"]
    assert m.kv()[:2] == [(KV_FILE, str(tmp_path / "a.gguf"), m.kv()[0][2]), ("quantize.imatrix.dataset",
                                                                             "wiki.txt", m.kv()[1][2])]


def test_for_tensor_checks_the_size(tmp_path):
    m = load_imatrix(write_dat(tmp_path / "a.dat", {"blk.0.ffn_up.weight": (1, V1), "token_embd.weight": (1, V1)}))
    assert np.array_equal(m.for_tensor("blk.0.ffn_up.weight", (4, 8)), V1)
    assert m.for_tensor("blk.0.ffn_down.weight", (4, 8)) is None
    with pytest.raises(FormatError, match="another model"):
        m.for_tensor("blk.0.ffn_up.weight", (8, 4))
    assert m.for_tensor("token_embd.weight", (8, 4)) is None  # skipped, as llama-quantize does


I32 = lambda v: struct.pack("<i", v)  # noqa: E731


@pytest.mark.parametrize("data,match", [
    (b"", "truncated"),
    (I32(0), "no entries"),
    (I32(1) + I32(5) + b"abc", "truncated"),
    (I32(1) + I32(-3), "truncated"),
    (I32(1) + I32(1) + b"x" + I32(1) + I32(0), "0 values"),
    (I32(1) + I32(1) + b"x" + I32(1) + I32(1 << 30) + b"\0" * 8, "truncated"),
    (I32(2) + (I32(1) + b"x" + I32(1) + I32(1) + b"\0" * 4) * 2, "twice"),
    (I32(1) + I32(1) + b"x" + I32(1) + I32(1) + struct.pack("<f", float("nan")), "non-finite"),
])
def test_hostile_legacy_files_are_clear_errors(tmp_path, data, match):
    p = tmp_path / "bad.dat"
    p.write_bytes(data)
    with pytest.raises(FormatError, match=match) as e:
        load_imatrix(p)
    assert str(p) in str(e.value)


def test_hostile_gguf_files_are_clear_errors(tmp_path):
    ok = {"w": (V1.reshape(1, 4), np.array([1.0]))}
    with pytest.raises(FormatError, match="missing imatrix.datasets"):
        load_imatrix(write_gguf(tmp_path / "a.gguf", ok, meta=False))
    from qf.format import GGMLType, QFWriter
    with QFWriter(tmp_path / "b.gguf", checksums=False) as w:
        w.add_kv("imatrix.datasets", ["d"])
        w.add_kv("imatrix.chunk_count", 1)
        w.add_kv("imatrix.chunk_size", 512)
        w.add_tensor_info("w.in_sum2", ne=(4, 1), type=GGMLType.F32)
        w.write_tensor("w.in_sum2", V1.reshape(1, 4))
    with pytest.raises(FormatError, match="must both be present"):
        load_imatrix(tmp_path / "b.gguf")
    with pytest.raises(FormatError, match="non-finite"):
        load_imatrix(write_gguf(tmp_path / "c.gguf", {"w": (np.array([[1, np.inf, 1, 1]]), np.array([1.0]))}))


@pytest.fixture
def tiny_f16(tiny_checkpoint, tmp_path):
    """A tiny 8-layer llama with 256-wide rows, as an F16 .qf (K types apply to every matrix)."""
    src = tiny_checkpoint(layers=8, config={"hidden_size": 256, "intermediate_size": 512})
    return convert(src, tmp_path / "f16.qf", "F16").path


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_requantize_weights_every_matrix_by_its_importance(tiny_f16, tmp_path, fmt):
    imx = load_imatrix(random_imatrix(tmp_path / f"imx.{fmt}", tiny_f16, fmt=fmt))
    requantize(tiny_f16, tmp_path / "w.qf", "Q4_K_M", imatrix=imx)
    requantize(tiny_f16, tmp_path / "plain.qf", "Q4_K_M")
    with open_gguf(tiny_f16) as src, open_gguf(tmp_path / "w.qf") as w, open_gguf(tmp_path / "plain.qf") as p:
        weighted = 0
        for name, t in w.tensors.items():
            imp = imx.for_tensor(name, t.ne)
            if imp is None or t.type.name in ("F32", "F16"):
                assert np.array_equal(w.raw(name), p.raw(name)), name
                continue
            x = src.dequantize(name).reshape(-1, t.ne[0])
            assert np.array_equal(w.raw(name), get_codec(t.type).quantize(x, imp)), name
            weighted += not np.array_equal(w.raw(name), p.raw(name))
        assert weighted >= 50  # 8 layers x 7 matrices, each now quantized differently
        assert w.meta.get_int(KV_N_ENTRIES) == len(imx.entries) and w.meta.get_int(KV_N_CHUNKS) == 3
        assert w.meta.get_str(KV_FILE) == str(tmp_path / f"imx.{fmt}")


def test_an_imatrix_switches_llama_cpp_s_q4_0_ffn_down_rule(tiny_f16, tmp_path):
    """With an imatrix, llama.cpp gives ffn_down of the first n_layer/8 layers Q4_1 in Q4_0 files."""
    imx = load_imatrix(random_imatrix(tmp_path / "imx.gguf", tiny_f16))
    requantize(tiny_f16, tmp_path / "w.qf", "Q4_0", imatrix=imx)
    with open_gguf(tmp_path / "w.qf") as f:
        assert f.tensors["blk.0.ffn_down.weight"].type.name == "Q4_1"
        assert f.tensors["blk.1.ffn_down.weight"].type.name == "Q4_0"


def test_cli_imatrix_options(tiny_checkpoint, tmp_path):
    """qconvert --imatrix from an F16 checkpoint == qquantize --imatrix from its F16 .qf; a bad file exits 2."""
    from qf.tools.qconvert import main as qconvert
    from qf.tools.qquantize import main as qquantize

    src = tiny_checkpoint(layers=8, dtype="F16", config={"hidden_size": 256, "intermediate_size": 512})
    f16 = convert(src, tmp_path / "f16.qf", "F16").path
    imx = random_imatrix(tmp_path / "imx.gguf", f16)
    r = CliRunner().invoke(qquantize, [str(f16), str(tmp_path / "a.qf"), "--type", "Q4_K_M",
                                       "--imatrix", str(imx), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(qconvert, [str(src), str(tmp_path / "b.qf"), "--type", "Q4_K_M", "--imatrix", str(imx), "-q"])
    assert r.exit_code == 0, r.output
    with open_gguf(tmp_path / "a.qf") as a, open_gguf(tmp_path / "b.qf") as b:
        assert [n for n in a.tensors if not np.array_equal(a.raw(n), b.raw(n))] == []
    bad = tmp_path / "bad.dat"
    bad.write_bytes(I32(0))
    r = CliRunner().invoke(qquantize, [str(f16), str(tmp_path / "c.qf"), "--type", "Q4_K_M", "--imatrix", str(bad)])
    assert r.exit_code == 2 and "no entries" in r.output and not (tmp_path / "c.qf").exists()
