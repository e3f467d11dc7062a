"""FP8 e4m3 quantizer (qf.quant.fp8_quant, `qconvert --type FP8-TENSOR|FP8-CHANNEL|FP8-BLOCK[-STATIC]`) against
torch's float8_e4m3fn cast and compressed-tensors' own qparams and quantize function on the same weights: codes and
scales bit-identical; the written file, exported, equals the checkpoint compressed-tensors makes of the same model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")

from payload_fixtures import ct_checkpoint  # noqa: E402

from qf.calib.data import CalibOptions  # noqa: E402
from qf.calib.driver import convert_calibrated  # noqa: E402
from qf.convert.checkpoint import Checkpoint  # noqa: E402
from qf.convert.export_quant import export_quantized  # noqa: E402
from qf.convert.pipeline import convert  # noqa: E402
from qf.format.reader import open_gguf  # noqa: E402
from qf.quant.formats.fp8 import E4M3, Fp8Params  # noqa: E402
from qf.quant.fp8_quant import dequantize_fp8, e4m3_codes, quantize_fp8  # noqa: E402
from qf.quant.methods import get_spec  # noqa: E402
from qf.runtime import Model  # noqa: E402

IDS = [1, 17, 42, 99, 7, 250, 3, 64]


def _torch_codes(x: np.ndarray) -> np.ndarray:
    """torch's float8_e4m3fn cast (round to nearest even) as bit patterns."""
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def test_rounding_matches_torch_on_every_tie_and_edge():
    finite = E4M3[np.isfinite(E4M3)].astype(np.float64)
    pos = np.unique(finite[finite >= 0])
    mids = (pos[:-1] + pos[1:]) / 2  # exact ties: even code wins
    near = np.concatenate([np.nextafter(mids.astype(np.float32), np.float32(0)),
                           np.nextafter(mids.astype(np.float32), np.float32(1000))])
    tiny = np.array([0.0, 2.0 ** -10, 2.0 ** -9, 3 * 2.0 ** -10, 2.0 ** -7 * 0.999, 447.9, 448.0, 1e-30])
    rng = np.random.default_rng(0)
    rand = rng.standard_normal(20000) * np.exp(rng.uniform(-12, 6, 20000))
    x = np.concatenate([pos, mids, near, tiny, np.clip(rand, -448, 448)]).astype(np.float32)
    x = np.concatenate([x, -x])
    np.testing.assert_array_equal(e4m3_codes(x), _torch_codes(x))
    assert e4m3_codes(np.array([-0.0], np.float32))[0] == 0x80
    assert (e4m3_codes(np.array([np.nan], np.float32))[0] & 0x7F) == 0x7F
    assert e4m3_codes(np.array([1e6, -1e6], np.float32)).tolist() == [0x7E, 0xFE]  # saturates at 448


def _ct_quantize(w: np.ndarray, p: Fp8Params) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors' calculate_qparams (min/max over each unit) and quantize() of w: (codes u8, scale)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    kw = {"block_structure": [p.block_h, p.block_w]} if p.strategy == "block" else {}
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=p.strategy, **kw)
    t = torch.from_numpy(w)
    if p.strategy == "tensor":
        lo, hi = t.amin().reshape(1), t.amax().reshape(1)
    elif p.strategy == "channel":
        lo, hi = t.amin(1, keepdim=True), t.amax(1, keepdim=True)
    else:
        bh, bw = p.block_h, p.block_w
        pad = torch.zeros(-(-w.shape[0] // bh) * bh, -(-w.shape[1] // bw) * bw)
        pad[: w.shape[0], : w.shape[1]] = t
        x = pad.unflatten(0, (-1, bh)).unflatten(-1, (-1, bw))
        lo, hi = x.amin((1, 3)), x.amax((1, 3))
    scale, zp = calculate_qparams(lo, hi, args)
    q = quantize(t, scale, zp, args, dtype=torch.float8_e4m3fn)
    return q.view(torch.uint8).numpy(), scale.numpy()


@pytest.mark.parametrize("p", [Fp8Params("tensor"), Fp8Params("channel"), Fp8Params("block", 128, 128),
                               Fp8Params("block", 32, 48)], ids=["tensor", "channel", "block128", "block32x48"])
def test_codes_and_scales_equal_compressed_tensors(p):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((200, 300)) * 0.05).astype(np.float32)
    w[3] = 0.0  # a zero row (channel scale -> eps)
    w[7, 11] = 3.5  # an outlier
    w[:, 299] *= 40
    codes, scale = quantize_fp8(w, p)
    want_codes, want_scale = _ct_quantize(w, p)
    np.testing.assert_array_equal(scale.reshape(want_scale.shape), want_scale)
    np.testing.assert_array_equal(codes, want_codes)
    err = np.abs(dequantize_fp8(codes, scale, p) - w).max()
    assert err <= np.abs(w).max() / 448 * 32  # half a step of the largest binade at most


@pytest.mark.parametrize("qtype,scheme", [("FP8-TENSOR", "fp8_tensor"), ("FP8-CHANNEL", "fp8_channel")])
def test_file_exports_to_the_checkpoint_compressed_tensors_makes(tiny_checkpoint, tmp_path: Path, qtype, scheme):
    src = tiny_checkpoint(tied=False)
    out = tmp_path / "m.qf"
    s = convert_calibrated(src, out, get_spec(qtype), None, log=lambda line: None)
    assert any("fp8;scale=" in n for n in s.notes)
    exported = tmp_path / "export"
    export_quantized(out, exported, "compressed-tensors", dtype="float32")
    ct = tmp_path / "ct"
    ct_checkpoint(src, ct, scheme)  # compressed-tensors' own quantization of the same weights
    a, b = Checkpoint(ct), Checkpoint(exported)
    for n in a.names():
        if n.endswith((".weight_scale", "_proj.weight")):
            assert np.asarray(a.raw(n)).tobytes() == np.asarray(b.raw(n)).tobytes(), n
    (g,) = json.loads((exported / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert g["weights"]["strategy"] == scheme.split("_")[1] and g["format"] == "float-quantized"


def test_block_file_runs_and_keeps_static_input_scales(tiny_checkpoint, tmp_path: Path):
    src = tiny_checkpoint(tied=False)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog, said the hacker of the jargon file. " * 40)
    ref, out = tmp_path / "f32.qf", tmp_path / "m.qf"
    convert(src, ref, "F32")
    convert_calibrated(src, out, get_spec("FP8-BLOCK-STATIC"), CalibOptions(calib, 4, 32), log=lambda line: None)
    with open_gguf(out) as f:
        s = f.tensors["blk.0.attn_q.input_scale"]
        scale = float(np.asarray(f.raw("blk.0.attn_q.input_scale")).reshape(-1).view(np.float32)[0])
        assert tuple(s.ne) == (1,) and 0 < scale < 1
    with Model.load(ref, n_ctx=64) as m:
        want = m.logits(IDS)
    with Model.load(out, n_ctx=64) as m:
        got = m.logits(IDS)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1  # e4m3: 3 mantissa bits, random tiny weights
    exported = tmp_path / "export"
    export_quantized(out, exported, dtype="float32")
    qc = json.loads((exported / "config.json").read_text())["quantization_config"]
    (g,) = qc["config_groups"].values()
    assert g["weights"]["block_structure"] == [128, 128] and g["input_activations"]["dynamic"] is False
    c = Checkpoint(exported)
    assert float(c.to_f32("model.layers.0.self_attn.q_proj.input_scale")[0]) == scale


def test_hf_fp8_layout_refuses_partial_blocks(tiny_checkpoint, tmp_path: Path):
    """transformers' FineGrainedFP8 refuses weights that are not whole blocks, so the fp8 export does too (naming the
    tensor, nothing left at the output); compressed-tensors keeps partial blocks."""
    from qf.format.errors import ConvertError

    src = tiny_checkpoint(tied=False)
    qf = tmp_path / "m.qf"
    convert_calibrated(src, qf, get_spec("FP8-BLOCK"), None, log=lambda line: None)  # 128x128 blocks, tiny rows
    out = tmp_path / "export"
    partial = r"layers\.0\.self_attn\.q_proj\.weight.* is 64x64, not whole 128x128 blocks"
    with pytest.raises(ConvertError, match=partial):
        export_quantized(qf, out, "fp8")
    assert not out.exists() and not list(tmp_path.glob(".export*"))
    assert export_quantized(qf, tmp_path / "ct", "compressed-tensors").layout == "compressed-tensors"
