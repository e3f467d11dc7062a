"""Hostile input, round two (#16): qinspect --verify reports inf/NaN in float tensors and quantized scales."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qf.format import GGMLType, QFWriter, open_gguf
from qf.format.ggml_types import BLOCK, FLOAT_BITS, SCALE_FIELDS
from qf.quant.codecs import get_codec
from qf.tools.qinspect import main, nonfinite

NAN_F16 = np.array([np.nan], "<f2").tobytes()


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def _q4_0_with_nan_scale(rows: int = 2, blocks: int = 8, bad: tuple[int, int] = (0, 3)) -> np.ndarray:
    """Q4_0 bytes [rows, blocks * 18] of random weights, with block `bad` (row, block) given a NaN d."""
    x = np.random.default_rng(0).standard_normal((rows, 32 * blocks)).astype(np.float32)
    q = get_codec(GGMLType.Q4_0).quantize(x).copy()
    r, k = bad
    q[r, k * 18:k * 18 + 2] = np.frombuffer(NAN_F16, np.uint8)
    return q


def write_model(path: Path, tensors: dict[str, tuple[GGMLType, tuple[int, ...], np.ndarray]]) -> Path:
    """A .qf file (with checksums) holding the given tensors: name -> (type, ne, data)."""
    with QFWriter(path) as w:
        w.add_kv("general.architecture", "llama")
        for name, (t, ne, _) in tensors.items():
            w.add_tensor_info(name, ne=ne, type=t)
        for name, (_, _, data) in tensors.items():
            w.write_tensor(name, data)
    return path


def test_verify_names_an_inf_matrix_and_a_nan_scale(tmp_path: Path) -> None:
    f16 = np.full((4, 64), np.inf, np.float16)
    p = write_model(tmp_path / "bad.qf", {
        "ok.weight": (GGMLType.F32, (64, 2), np.ones((2, 64), np.float32)),
        "inf.weight": (GGMLType.F16, (64, 4), f16),
        "nan_scale.weight": (GGMLType.Q4_0, (256, 2), _q4_0_with_nan_scale()),
    })
    r = run(str(p), "--verify", "--no-tensors")
    assert r.exit_code == 1, r.output
    out = r.output
    assert "verify: 3 of 3 tensors pass" in out  # the checksums are right: the values were written this way
    assert "non-finite value: inf.weight (F16): +inf at row 0, column 0 (256 values in all)" in out
    assert ("non-finite scale: nan_scale.weight (Q4_0): d is NaN in block 3 (row 0, block 3 of the row) "
            "(1 blocks in all)") in out
    assert "ok.weight" not in out.split("checksums:")[-1]
    assert "verify: 1 of 3 tensors finite, 2 with inf/NaN" in out


def test_verify_passes_finite_files_and_files_without_checksums(tmp_path: Path) -> None:
    q = get_codec(GGMLType.Q4_K).quantize(np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32))
    p = tmp_path / "ok.gguf"
    with QFWriter(p, checksums=False) as w:
        w.add_kv("general.architecture", "llama")
        w.add_tensor_info("a", ne=(512, 3), type=GGMLType.Q4_K)
        w.add_tensor_info("b", ne=(8,), type=GGMLType.BF16)
        w.add_tensor_info("c", ne=(1,), type=GGMLType.F32)
        w.add_tensor_info("empty", ne=(0, 4), type=GGMLType.F16)
        w.write_tensor("a", q)
        w.write_tensor("b", np.full(8, 0x3F80, np.uint16))  # bf16 1.0
        w.write_tensor("c", np.array([2.0], np.float32))
        w.write_tensor("empty", np.zeros(0, np.float16))
    r = run(str(p), "--verify")
    assert r.exit_code == 0, r.output
    assert "no checksums recorded" in r.output and "verify: 4 of 4 tensors finite" in r.output


@pytest.mark.parametrize(("gtype", "bits", "want"), [
    (GGMLType.F32, np.array([1.0, 2.0, np.nan, -np.inf], "<f4").view("<u4"), "NaN at row 0, column 2 (2 values"),
    (GGMLType.F16, np.array([1.0, -np.inf, np.inf, 0.0], "<f2").view("<u2"), "-inf at row 0, column 1 (2 values"),
    (GGMLType.BF16, np.array([0x3F80, 0x3F80, 0x3F80, 0xFF80], "<u2"), "-inf at row 0, column 3 (1 values"),
    (GGMLType.BF16, np.array([0x7FC1, 0, 0, 0], "<u2"), "NaN at row 0, column 0 (1 values"),
    (GGMLType.F64, np.array([0.0, 0.0, 0.0, np.inf], "<f8").view("<u8"), "+inf at row 0, column 3 (1 values"),
])
def test_float_types(tmp_path: Path, gtype: GGMLType, bits: np.ndarray, want: str) -> None:
    p = write_model(tmp_path / "f.qf", {"t": (gtype, (4,), bits.view(np.uint8))})
    with open_gguf(p) as f:
        assert nonfinite(f, f.tensors["t"]).startswith(want)


@pytest.mark.parametrize("gtype", list(SCALE_FIELDS))
def test_scale_offsets_agree_with_gguf_py(gtype: GGMLType) -> None:
    """A NaN in each scale field we check makes gguf-py's dequantization of that block non-finite."""
    import gguf
    from gguf import quants

    try:
        gt = gguf.GGMLQuantizationType(int(gtype))
    except ValueError:
        pytest.skip(f"gguf-py has no {gtype.name}")
    _, ts = BLOCK[gtype]
    blocks = np.random.default_rng(2).integers(0, 256, (4, ts), dtype=np.uint8)
    for _, off, dt in SCALE_FIELDS[gtype]:  # every scale finite to begin with
        blocks[:, off] = 127 if dt == "e8m0" else 0
        if dt != "e8m0":
            blocks[:, off:off + np.dtype(dt).itemsize] = np.frombuffer(np.full(4, 0.25, dt).tobytes(),
                                                                        np.uint8).reshape(4, -1)
    dequantize = lambda b: quants.dequantize(b, gt)  # noqa: E731
    try:
        assert np.isfinite(dequantize(blocks)).all()
    except NotImplementedError:  # then our own codec, where there is one
        try:
            dequantize = get_codec(gtype).dequantize
        except KeyError:
            pytest.skip(f"neither gguf-py nor qf can dequantize {gtype.name}")
        assert np.isfinite(dequantize(blocks)).all()
    for _, off, dt in SCALE_FIELDS[gtype]:
        b = blocks.copy()
        if dt == "e8m0":
            b[2, off] = 0xFF
        else:
            b[2, off:off + np.dtype(dt).itemsize] = np.frombuffer(np.array([np.nan], dt).tobytes(), np.uint8)
        with np.errstate(over="ignore", invalid="ignore"):
            out = dequantize(b).reshape(4, -1)
        assert not np.isfinite(out[2]).all() and np.isfinite(np.delete(out, 2, axis=0)).all()


def test_scan_streams_in_chunks(tmp_path: Path) -> None:
    """An 8 MiB tensor scanned 256 KiB at a time: the peak stays near the chunk, far below the tensor."""
    x = np.zeros((2048, 1024), np.float32)
    x[-1, -1] = np.nan
    p = write_model(tmp_path / "big.qf", {"big": (GGMLType.F32, (1024, 2048), x),
                                          "q": (GGMLType.Q4_0, (256, 2), _q4_0_with_nan_scale(bad=(1, 7)))})
    del x
    with open_gguf(p) as f:
        tracemalloc.start()
        found = nonfinite(f, f.tensors["big"], chunk_bytes=256 << 10)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert found == "NaN at row 2047, column 1023 (1 values in all)"
        assert peak < 2 << 20, peak
        assert nonfinite(f, f.tensors["q"], chunk_bytes=1) == ("d is NaN in block 15 (row 1, block 7 of the row) "
                                                               "(1 blocks in all)")


def test_tensors_without_floats_are_skipped(tmp_path: Path) -> None:
    p = write_model(tmp_path / "i.qf", {"i": (GGMLType.I32, (4,), np.full(4, -1, np.int32))})
    with open_gguf(p) as f:
        assert GGMLType.I32 not in FLOAT_BITS and nonfinite(f, f.tensors["i"]) is None
