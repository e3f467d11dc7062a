"""Classic GPTQ (GPTQModel's packing), AWQ GEMM (GPTQModel's AutoAWQ packing) and Hugging Face fp8 (transformers'
own FP8 quantizer) checkpoints -> .qf -> the runtime, against those libraries' own dequantization.

GPTQModel declares a CUDA torch; it runs here installed with `pip install --no-deps gptqmodel` (plus its small
pure-python imports): these tests skip where it is not installed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from payload_fixtures import awq_checkpoint, gptq_checkpoint, hf_fp8_checkpoint, reference_logits

from qf.convert.pipeline import convert
from qf.format.errors import ConvertError
from qf.format.model_check import architecture
from qf.format.reader import open_gguf
from qf.quant.formats import PAYLOAD_SCHEMES_KEY
from qf.runtime import Model
from qf.runtime.hparams import hparams_from_metadata
from qf.runtime.weights import load_tensors

# The GPTQModel modules the fixtures pack with: a partial install (its dependencies are not installed with
# it, see .ci/run) skips these tests instead of failing inside a fixture.
GPTQMODEL_MODULES = ("gptqmodel.nn_modules.qlinear.torch", "gptqmodel.nn_modules.qlinear.torch_awq",
                     "gptqmodel.quantization.quantizer", "gptqmodel.utils.model")


def _need_gptqmodel() -> None:
    """Skip unless GPTQModel's packing modules import."""
    for name in GPTQMODEL_MODULES:
        pytest.importorskip(name)


IDS = [1, 17, 42, 99, 7, 250, 3, 64]
HEADS = {"q_proj": 4, "k_proj": 2}
LAYER_ATTRS = {"self_attn.q_proj": "wq", "self_attn.k_proj": "wk", "self_attn.v_proj": "wv",
               "self_attn.o_proj": "wo", "mlp.gate_proj": "w_gate", "mlp.up_proj": "w_up", "mlp.down_proj": "w_down"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's Q/K row permutation (the reference restated)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_dequantize(f, name: str) -> np.ndarray:
    """A ggml tensor of the file as gguf-py dequantizes it."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    ti = f.tensors[name]
    return dequantize(np.asarray(f.raw(name)), GGMLQuantizationType[ti.type.name]).reshape(ti.shape)


def _check(src, qdir, ref, out, keep_payload=True, scheme_has=""):
    """Every dequantized weight equals the reference bit for bit; logits as transformers with those weights."""
    convert(qdir, out, "F32", keep_payload=keep_payload)
    with open_gguf(out) as f:
        if keep_payload:
            assert all(scheme_has in s for s in f.meta.get_array(PAYLOAD_SCHEMES_KEY))
        t = load_tensors(f, hparams_from_metadata(f.meta, architecture(f.meta, str(out)), str(out)), str(out))
        for hf, w in ref.items():
            parts = hf.split(".")
            proj = parts[-2]
            r = getattr(t.layers[int(parts[2])], LAYER_ATTRS[".".join(parts[3:-1])])
            got = r.dequantize() if hasattr(r, "dequantize") else _gguf_dequantize(f, r.name)
            assert np.array_equal(got, _permute(w, HEADS[proj]) if proj in HEADS else w), hf
    with Model.load(out, n_ctx=64, type_k="f32", type_v="f32") as m:
        logits = m.logits(IDS)
    want = reference_logits(src, ref, IDS)
    assert np.abs(logits - want).max() < 1e-4 * max(1.0, np.abs(want).max())


GPTQ_CASES = [(4, 32, True, False, "gptq"), (4, 32, False, True, "gptq"), (4, 64, True, True, "gptq_v2"), (8, -1, True, False, "gptq"),
              (2, 32, False, False, "gptq"), (8, 64, False, False, "gptq_v2")]


@pytest.mark.parametrize("bits,group,sym,desc_act,fmt", GPTQ_CASES)
def test_gptq(tiny_checkpoint, tmp_path, bits, group, sym, desc_act, fmt):
    _need_gptqmodel()
    src = tiny_checkpoint(tied=False)
    ref = gptq_checkpoint(src, tmp_path / "q", bits, group, sym, desc_act, fmt)
    want = f"int;bits={bits};group={group};sym={int(sym)};"
    _check(src, tmp_path / "q", ref, tmp_path / "m.qf", scheme_has=want)


def test_gptq_sym_transcodes_to_q4_0(tiny_checkpoint, tmp_path):
    """Symmetric 4-bit GPTQ without act-order (fp16 scales) is Q4_0 exactly: the default output runs in llama.cpp."""
    _need_gptqmodel()
    src = tiny_checkpoint(tied=False)
    ref = gptq_checkpoint(src, tmp_path / "q", 4, 64, True, False)
    s = convert(tmp_path / "q", tmp_path / "m.qf", "F32")
    assert s.types["Q4_0"] == 14, s.notes
    _check(src, tmp_path / "q", ref, tmp_path / "m.qf", keep_payload=False)


def test_awq_gemm(tiny_checkpoint, tmp_path):
    _need_gptqmodel()
    src = tiny_checkpoint(tied=False)
    ref = awq_checkpoint(src, tmp_path / "q", 32)
    _check(src, tmp_path / "q", ref, tmp_path / "m.qf", scheme_has="int;bits=4;group=32;sym=0;g_idx=0")


@pytest.mark.parametrize("block", [[32, 32], [16, 64], None])
def test_hf_fp8(tiny_checkpoint, tmp_path, block):
    src = tiny_checkpoint(tied=False)
    ref = hf_fp8_checkpoint(src, tmp_path / "q", block)
    _check(src, tmp_path / "q", ref, tmp_path / "m.qf", scheme_has="fp8;scale=" + ("block" if block else "tensor"))


def _config_edit(tmp_path, src, change, make):
    """A checkpoint whose config.json was changed after it was made."""
    d = tmp_path / "q"
    make(src, d)
    cfg = json.loads((d / "config.json").read_text())
    change(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    return d


REFUSED = {
    "gptq 3-bit": (lambda qc: qc.update(bits=3), "3-bit codes straddle"),
    "gptq marlin": (lambda qc: qc.update(checkpoint_format="marlin"), "checkpoint_format"),
    "gptq lying group": (lambda qc: qc.update(group_size=64), "qzeros"),
    "gptq lying sym": (lambda qc: qc.update(sym=True), "config says sym"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_gptq_refused(tiny_checkpoint, tmp_path, case):
    _need_gptqmodel()
    change, needle = REFUSED[case]
    d = _config_edit(tmp_path, tiny_checkpoint(tied=False), change,
                     lambda s, d: gptq_checkpoint(s, d, 4, 32, False, False))
    with pytest.raises(ConvertError, match=needle):
        convert(d, tmp_path / "m.qf")
    assert not (tmp_path / "m.qf").exists()


@pytest.mark.parametrize("version", ["gemv", "marlin", "exllama"])
def test_awq_other_layouts_refused(tiny_checkpoint, tmp_path, version):
    _need_gptqmodel()
    d = _config_edit(tmp_path, tiny_checkpoint(tied=False), lambda qc: qc.update(version=version),
                     lambda s, d: awq_checkpoint(s, d, 32))
    with pytest.raises(ConvertError, match=f"'{version}'.*AWQ GEMM"):
        convert(d, tmp_path / "m.qf")
    assert not (tmp_path / "m.qf").exists()
