"""AWQ (qf.quant.awq, `qconvert --type AWQ-W4G64 --calib FILE`): its grid is GPTQ/RTN's IntGrid exactly, the scale
search beats round-to-nearest on its objective (by far where input channels have outliers), the fold keeps the
block's function, clipping never hurts a group's partial outputs, and a calibrated file runs, exports as AWQ GEMM
that AutoAWQ's unpacking reads, and loads in transformers as compressed-tensors with our runtime's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qf.calib.data import CalibOptions
from qf.calib.driver import convert_calibrated
from qf.convert.pipeline import convert
from qf.quant.awq import Grid, clip_weight, fake_quant, group_loss, relative_error, search_scales
from qf.quant.gptq import rtn
from qf.quant.grids import IntGrid
from qf.quant.methods import get_spec
from qf.quant.methods.awq import SCALE_GROUPS, AwqMethod
from qf.runtime import Model

IDS = [5, 9, 3, 17, 2, 11, 8, 4, 13, 6]
TEXT = ("The quick brown fox jumps over the lazy dog while the calibration text goes on about hackers, "
        "jargon and the lore of computing. ") * 40


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 64, True), (8, 32, False), (4, 128, False)])
def test_fake_quant_is_intgrid_round_to_nearest(bits, group, sym):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 2, (48, 1))).astype(np.float32)
    w[5, :group] = 0.0  # an all-zero group
    w[7, :group] = np.abs(w[7, :group])  # a one-signed group (asym range includes 0)
    want = rtn(w, IntGrid(48, 256, bits, group, sym))
    np.testing.assert_array_equal(fake_quant(w, Grid(bits, group, sym)), want)


def _outlier_problem(seed: int = 0):
    """Inputs with a few loud channels, and two linears reading them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1024, 128)).astype(np.float32)
    x[:, [3, 40, 77]] *= 30.0
    ws = [(rng.standard_normal((96, 128)) * 0.05).astype(np.float32) for _ in range(2)]
    return x, np.abs(x).mean(axis=0), ws


@pytest.mark.parametrize("duo", [True, False])
def test_scale_search_beats_rtn_on_outlier_channels(duo):
    x, mean, ws = _outlier_problem()
    grid = Grid(4, 32, False)
    r = search_scales(x.T @ x, mean, ws, grid, duo=duo)
    assert r.alpha is not None and r.loss < 0.6 * r.loss_rtn, (r.loss, r.loss_rtn)
    # the loss from H is the output error on the rows themselves: || x W^T - (x / s) Q(W s)^T ||^2
    direct = sum(float(np.square((x / r.scales) @ fake_quant(w * r.scales, grid).T - x @ w.T, dtype=np.float64).sum())
                 for w in ws)
    assert r.loss == pytest.approx(direct, rel=1e-3)
    assert r.loss == pytest.approx(group_loss(x.T @ x, ws, r.scales, grid))


def test_scale_search_never_loses_to_rtn():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 64)).astype(np.float32)  # no outliers: s = 1 may win
    ws = [(rng.standard_normal((32, 64))).astype(np.float32)]
    r = search_scales(x.T @ x, np.abs(x).mean(0), ws, Grid(4, 32, True))
    assert r.loss <= r.loss_rtn


def test_clip_never_increases_the_partial_output_error():
    x, _, ws = _outlier_problem(1)
    w = ws[0].copy()
    w[:, 10] = 1.0  # weight outliers: clipping has something to win
    grid = Grid(4, 32, False)
    c = clip_weight(w, x.T @ x, grid)
    assert np.all(np.abs(c) <= np.abs(w) + 1e-7) and not np.array_equal(c, w)

    def err(v):
        """Each (row, group)'s partial output error on the rows themselves."""
        g = 32
        xg = x.reshape(x.shape[0], -1, g)
        return np.square(np.einsum("rgk,ngk->rgn", fake_quant(v, grid).reshape(96, -1, g), xg)
                         - np.einsum("rgk,ngk->rgn", w.reshape(96, -1, g), xg)).sum(axis=2)
    assert np.all(err(c) <= err(w) * (1 + 1e-4) + 1e-6)
    assert err(c).sum() < err(w).sum()
    assert relative_error(x.T @ x, w, fake_quant(c, grid)) < relative_error(x.T @ x, w, fake_quant(w, grid))


class _FakeLayer:
    """The weights of a CalibLayer, for the fold alone."""

    def __init__(self, weights):
        self.w = weights

    def weight(self, r):
        return self.w[r]

    def set_weight(self, r, v):
        self.w[r] = np.asarray(v, np.float32)

    def roles(self):
        return tuple(self.w)


def test_fold_keeps_the_function():
    rng = np.random.default_rng(2)
    n, h = 64, 96
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    w = {"attn_norm": rng.uniform(0.5, 1.5, n).astype(np.float32), "wq": r(n, n), "wk": r(32, n), "wv": r(32, n),
         "bv": r(32), "wo": r(n, 32), "ffn_norm": rng.uniform(0.5, 1.5, n).astype(np.float32), "w_gate": r(h, n),
         "w_up": r(h, n), "w_down": r(n, h)}
    x = r(16, n)

    def f(w):
        """q, k, o(v) of the attention norm's output; SwiGLU of the ffn norm's output."""
        y = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True))
        a, m = y * w["attn_norm"], y * w["ffn_norm"]
        v = a @ w["wv"].T + w["bv"]
        g = m @ w["w_gate"].T
        return a @ w["wq"].T, a @ w["wk"].T, v @ w["wo"].T, (g / (1 + np.exp(-g)) * (m @ w["w_up"].T)) @ w["w_down"].T

    before = f(w)
    layer = _FakeLayer(dict(w))
    for sg in SCALE_GROUPS:
        k = layer.weight(sg.linears[0]).shape[1]
        AwqMethod._fold(layer, sg, rng.uniform(0.2, 5.0, k).astype(np.float32))
    for a, b in zip(f(layer.w), before):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    assert not np.array_equal(layer.w["attn_norm"], w["attn_norm"]) and not np.array_equal(layer.w["wv"], w["wv"])


def _logits(path: Path) -> np.ndarray:
    with Model.load(path, n_ctx=64, type_k="f32", type_v="f32") as m:
        return m.logits(IDS)


def test_awq_file_runs_and_exports(tiny_checkpoint, tmp_path: Path):
    src = tiny_checkpoint(tied=False, seed=1)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    ref, out = tmp_path / "f32.qf", tmp_path / "awq.qf"
    convert(src, ref, "F32")
    s = convert_calibrated(src, out, get_spec("AWQ-W4G32"), CalibOptions(calib, 8, 32), log=lambda line: None)
    assert any("int;bits=4;group=32;sym=0" in n for n in s.notes)
    got, want = _logits(out), _logits(ref)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.15
    from qf.format.reader import open_gguf

    with open_gguf(out) as f, open_gguf(ref) as r:  # the scales were folded into the norms the file stores
        assert not np.array_equal(f.dequantize("blk.0.attn_norm.weight"), r.dequantize("blk.0.attn_norm.weight"))
    pytest.importorskip("compressed_tensors")
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qf.convert.export_quant import export_quantized

    export_quantized(out, tmp_path / "ct", "compressed-tensors", dtype="float32")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(run_compressed=False))
    with torch.no_grad():
        hf = m(torch.tensor([IDS])).logits[0].numpy()
    # the file's other tensors are F16 (the calibrated types' rest): the runtime's F16 products round activations
    assert np.abs(hf - got).max() < 1e-3 * max(1.0, np.abs(hf).max())
    export_quantized(out, tmp_path / "awq", "awq", dtype="float32")
    assert json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]["version"] == "gemm"


def test_symmetric_awq_w4_is_q4_0(tiny_checkpoint, tmp_path: Path):
    src = tiny_checkpoint(seed=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "awq.qf"
    s = convert_calibrated(src, out, get_spec("AWQ-W4G32-SYM"), CalibOptions(calib, 4, 32), log=lambda line: None)
    assert any("Q4_0" in n for n in s.notes)
    from qf.format.reader import open_gguf

    with open_gguf(out) as f:
        assert f.tensors["blk.1.ffn_down.weight"].type.name == "Q4_0"
