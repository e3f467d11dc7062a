"""compressed-tensors checkpoints (made by the compressed-tensors package) -> .qf payloads -> the runtime, against
compressed-tensors' own decompression run through transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("compressed_tensors")

from payload_fixtures import SCHEMES, ct_checkpoint, reference_logits  # noqa: E402

from qf.convert.pipeline import convert  # noqa: E402
from qf.format.errors import ConvertError  # noqa: E402
from qf.format.reader import open_gguf  # noqa: E402
from qf.quant.formats import PAYLOAD_SCHEMES_KEY, PAYLOAD_TENSORS_KEY  # noqa: E402
from qf.runtime import Model  # noqa: E402

IDS = [1, 17, 42, 99, 7, 250, 3, 64]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's Q/K row permutation (the reference restated)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def made(tiny_checkpoint_module, tmp_path_factory):
    """scheme -> (source folder, quantized folder, reference weights), made once per scheme."""
    cache = {}

    def get(scheme: str):
        if scheme not in cache:
            src = tiny_checkpoint_module(tied=False)
            out = tmp_path_factory.mktemp(scheme)
            cache[scheme] = (src, out, ct_checkpoint(src, out, scheme))
        return cache[scheme]

    return get


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_payload_weights_and_logits(made, tmp_path, scheme):
    src, qdir, ref = made(scheme)
    out = tmp_path / "m.qf"
    convert(qdir, out, "F32")  # the unquantized tensors (embeddings, lm_head) exactly as the reference has them
    with open_gguf(out) as f:
        names = f.meta.get_array(PAYLOAD_TENSORS_KEY)
        schemes = f.meta.get_array(PAYLOAD_SCHEMES_KEY)
        assert len(names) == 14 and len(set(schemes)) == 1
        assert "blk.0.attn_q.weight" not in f.tensors
    with Model.load(out, n_ctx=64, type_k="f32", type_v="f32") as m:
        logits = m.logits(IDS)
    want = reference_logits(src, ref, IDS)
    assert np.abs(logits - want).max() < 1e-4 * max(1.0, np.abs(want).max()), scheme


@pytest.mark.parametrize("scheme", ["w4a16_g32_asym", "fp8_block"])
def test_dequantized_equal_reference(made, tmp_path, scheme):
    from qf.format.model_check import architecture
    from qf.runtime.hparams import hparams_from_metadata
    from qf.runtime.weights import load_tensors

    src, qdir, ref = made(scheme)
    out = tmp_path / "m.qf"
    convert(qdir, out)
    with open_gguf(out) as f:
        hp = hparams_from_metadata(f.meta, architecture(f.meta, str(out)), str(out))
        t = load_tensors(f, hp, str(out))
        q = t.layers[1].wq.dequantize()
        k = t.layers[1].wk.dequantize()
        d = t.layers[1].w_down.dequantize()
    assert np.array_equal(q, _permute(ref["model.layers.1.self_attn.q_proj.weight"], 4))
    assert np.array_equal(k, _permute(ref["model.layers.1.self_attn.k_proj.weight"], 2))
    assert np.array_equal(d, ref["model.layers.1.mlp.down_proj.weight"])


def _edit(qdir, tmp_path, change):
    """A copy of a quantized folder with its tensors (dict name -> numpy) or config changed."""
    import shutil

    from safetensors.numpy import load_file, save_file

    d = tmp_path / "bad"
    shutil.copytree(qdir, d)
    sd = load_file(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    change(sd, cfg)
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg))
    return d


BAD = {
    "missing scale": (lambda sd, c: sd.pop("model.layers.0.mlp.up_proj.weight_scale"),
                      "model.layers.0.mlp.up_proj.weight_packed"),
    "wrong scale shape": (lambda sd, c: sd.__setitem__("model.layers.0.mlp.up_proj.weight_scale",
                                                       sd["model.layers.0.mlp.up_proj.weight_scale"][:, :1].copy()),
                          "weight_scale"),
    "lying group size": (lambda sd, c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
                         .__setitem__("group_size", 16), "weight_scale"),
    "lying bits": (lambda sd, c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
                   .__setitem__("num_bits", 8), "weight_packed"),
    "unsupported bits": (lambda sd, c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
                         .__setitem__("num_bits", 3), "num_bits"),
    "zero point packing": (lambda sd, c: sd.__setitem__("model.layers.1.self_attn.o_proj.weight_zero_point",
                                                        np.zeros((1, 2), np.int32)), "weight_zero_point"),
    "g_idx out of range": (lambda sd, c: sd.__setitem__("model.layers.0.self_attn.v_proj.weight_g_idx",
                                                        np.full(64, 7, np.int32)), "weight_g_idx"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_is_convert_error(made, tmp_path, case):
    change, needle = BAD[case]
    _, qdir, _ = made("w4a16_g32_asym")
    bad = _edit(qdir, tmp_path, change)
    out = tmp_path / "m.qf"
    with pytest.raises(ConvertError, match=needle):
        convert(bad, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("scheme", ["w4a16_g32_asym", "w8a16_channel_sym", "fp8_block", "fp8_tensor"])
def test_kernels_cpu_and_torch(made, tmp_path, scheme):
    """CPU (numba) decode, batch and exact-rows paths and the torch backend's packed payload, against the
    format's reference dequantizer."""
    import torch

    from qf.format.model_check import architecture
    from qf.runtime.backend import CpuBackend
    from qf.runtime.backend_torch import TorchBackend
    from qf.runtime.hparams import hparams_from_metadata
    from qf.runtime.weights import load_tensors, row_slices

    _, qdir, _ = made(scheme)
    out = tmp_path / "m.qf"
    convert(qdir, out, "F32")
    rng = np.random.default_rng(0)
    with open_gguf(out) as f:
        t = load_tensors(f, hparams_from_metadata(f.meta, architecture(f.meta, str(out)), str(out)), str(out))
        cpu, tb = CpuBackend(), TorchBackend("cpu")
        for ref in (t.layers[0].w_up, t.layers[1].w_down, *row_slices(t.layers[0].w_gate, (64, 64))):
            w = ref.dequantize()
            for m in (1, 5):
                x = rng.standard_normal((m, ref.n_in)).astype(np.float32)
                want = x.astype(np.float64) @ w.T.astype(np.float64)
                tol = 1e-5 * np.abs(x).sum(1, keepdims=True) * np.abs(w).max()
                for exact in (False, True):
                    assert np.all(np.abs(cpu.linear(cpu.matrix(ref), x, exact_rows=exact) - want) <= tol)
                y = tb.to_host(tb.linear(tb.matrix(ref), torch.from_numpy(x)))
                assert np.all(np.abs(y - want) <= tol)
            pm = cpu.matrix(ref)
            x = rng.standard_normal((3, ref.n_in)).astype(np.float32)
            assert np.array_equal(cpu.linear(pm, x, exact_rows=True)[1], cpu.linear(pm, x[1:2])[0])


def test_qinspect_groups_payloads(made, tmp_path):
    from click.testing import CliRunner

    from qf.tools.qinspect import main

    _, qdir, _ = made("w4a16_g32_asym")
    out = tmp_path / "m.qf"
    convert(qdir, out)
    r = CliRunner().invoke(main, [str(out)])
    assert r.exit_code == 0, r.output
    assert "int;bits=4;group=32;sym=0;g_idx=0: 14 linear weights" in r.output
    assert "llama.cpp cannot run this file" in r.output
