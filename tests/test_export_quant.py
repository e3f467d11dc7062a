"""qexport: quantized .qf files -> Hugging Face quantized folders, judged by the libraries that read them.

- compressed-tensors payloads go back bit for bit to the checkpoint compressed-tensors wrote, transformers loads
  the export (compressed-tensors decompresses on load) with our runtime's logits, and qconvert of the export gives
  the same .qf tensors;
- classic GPTQ (v1 and v2) and AWQ GEMM payloads go back bit for bit to the checkpoints GPTQModel packed;
- ggml Q4_0 / Q8_0 go out as symmetric int groups that transformers (compressed-tensors), GPTQModel's TorchLinear
  and AutoAWQ's GEMM unpacking dequantize to exactly the ggml values; a W4 g64 checkpoint transcoded to Q4_0 goes
  back as groups of 64;
- what no layout holds is a ConvertError naming the tensor, with nothing left at the output path.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("compressed_tensors")

from payload_fixtures import (  # noqa: E402
    awq_checkpoint, ct_checkpoint, gptq_checkpoint, hf_fp8_checkpoint,
)

from qf.convert.checkpoint import Checkpoint  # noqa: E402
from qf.convert.export_quant import export_quantized  # noqa: E402
from qf.convert.pipeline import convert  # noqa: E402
from qf.format.errors import ConvertError  # noqa: E402
from qf.format.reader import open_gguf  # noqa: E402
from qf.runtime import Model  # noqa: E402

IDS = [1, 17, 42, 99, 7, 250, 3, 64]
HEADS = {"q_proj": 4, "k_proj": 2}
GPTQMODEL_MODULES = ("gptqmodel.nn_modules.qlinear.torch", "gptqmodel.quantization.awq.utils.packing_utils",
                     "gptqmodel.utils.model")


def _need_gptqmodel() -> None:
    """Skip unless GPTQModel's packing modules import (installed --no-deps, see .ci/run)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    for name in GPTQMODEL_MODULES:
        pytest.importorskip(name)


def _same_tensors(a, b, names=None) -> None:
    """Every tensor of checkpoint folder a is in b with the same dtype, shape and bytes."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    names = names or ca.names()
    assert set(names) <= set(cb.names()), sorted(set(names) - set(cb.names()))
    for n in names:
        ea, eb = ca.entry(n), cb.entry(n)
        assert (ea.dtype, tuple(ea.shape)) == (eb.dtype, tuple(eb.shape)), n
        assert np.asarray(ca.raw(n)).tobytes() == np.asarray(cb.raw(n)).tobytes(), n


def _same_qf_tensors(a, b) -> None:
    """Two .qf files hold the same tensors (names, types, shapes, bytes)."""
    with open_gguf(a) as fa, open_gguf(b) as fb:
        assert set(fa.tensors) == set(fb.tensors)
        for n, ti in fa.tensors.items():
            tj = fb.tensors[n]
            assert (ti.type, tuple(ti.ne)) == (tj.type, tuple(tj.ne)), n
            assert np.asarray(fa.raw(n)).tobytes() == np.asarray(fb.raw(n)).tobytes(), n


def _qc(d) -> dict:
    """quantization_config of a folder."""
    return json.loads((d / "config.json").read_text())["quantization_config"]


def _runtime_logits(path) -> np.ndarray:
    """Our runtime's logits of IDS."""
    with Model.load(path, n_ctx=64, type_k="f32", type_v="f32") as m:
        return m.logits(IDS)


def _load_hf(folder):
    """transformers' model of a folder (f32); compressed-tensors checkpoints decompressed on load (run_compressed
    keeps CompressedLinear modules, which transformers 5.24 cannot build for asymmetric pack-quantized ones, the
    checkpoints compressed-tensors itself writes included: a weight_zero_point size mismatch)."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if (
        _qc(folder)["quant_method"] == "compressed-tensors") else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def _transformers_logits(folder) -> np.ndarray:
    """transformers' logits of IDS, loading the exported folder itself."""
    import torch

    with torch.no_grad():
        return _load_hf(folder)(torch.tensor([IDS])).logits[0].float().numpy()


def _close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    """Max abs difference within rel of the logits' scale."""
    assert np.abs(got - want).max() <= rel * max(1.0, np.abs(want).max()), np.abs(got - want).max()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Invert convert_hf_to_gguf's Q/K row permutation (the reference restated)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _ggml_weights(path) -> dict[str, np.ndarray]:
    """HF name -> each layer linear of a ggml file as gguf-py dequantizes it, in HF row order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    out = {}
    with open_gguf(path) as f:
        for n, ti in f.tensors.items():
            parts = n.split(".")
            if parts[0] != "blk" or parts[2] not in names:
                continue
            w = dequantize(np.asarray(f.raw(n)), GGMLQuantizationType[ti.type.name]).reshape(ti.shape)
            proj = names[parts[2]].split(".")[1]
            out[f"model.layers.{parts[1]}.{names[parts[2]]}.weight"] = (
                _unpermute(w, HEADS[proj]) if proj in HEADS else w)
    return out


@pytest.fixture(scope="module")
def src_dir(tiny_checkpoint_module):
    """A tiny random llama (F32, untied)."""
    return tiny_checkpoint_module(tied=False)


# --------------------------------------------------------------------------------------- compressed-tensors

CT_SCHEMES = ["w4a16_g32_asym", "w8a16_channel_sym", "w2_g16_asym", "fp8_tensor", "fp8_channel", "fp8_block"]


@pytest.mark.parametrize("scheme", CT_SCHEMES)
def test_compressed_tensors_round_trip(src_dir, tmp_path, scheme):
    qdir = tmp_path / "ct"
    ref = ct_checkpoint(src_dir, qdir, scheme)
    qf = tmp_path / "m.qf"
    convert(qdir, qf, "F32", keep_payload=True)
    out = tmp_path / "export"
    s = export_quantized(qf, out, dtype="float32")  # default: the layout the payload came from
    assert s.layout == "compressed-tensors" and sum(s.linears.values()) == 14
    _same_tensors(qdir, out)  # every tensor compressed-tensors wrote, bit for bit
    want, got = _qc(qdir), _qc(out)
    (w0,), (g0,) = ([g["weights"] for g in x["config_groups"].values()] for x in (want, got))
    for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "block_structure"):
        assert w0.get(k) == g0.get(k), k
    assert got["ignore"] == ["lm_head"] and got["format"] == want["format"]
    qf2 = tmp_path / "again.qf"
    convert(out, qf2, "F32", keep_payload=True)  # export -> qconvert reproduces the same tensors
    _same_qf_tensors(qf, qf2)
    sd = _load_hf(out).state_dict()
    for n, w in ref.items():  # transformers' load of the export: compressed-tensors' decompression of its checkpoint
        assert np.array_equal(sd[n].numpy(), w), n
    _close(_runtime_logits(qf), _transformers_logits(out), 1e-4)


def test_g64_checkpoint_via_q4_0_goes_back_as_groups_of_64(src_dir, tmp_path):
    qdir = tmp_path / "ct"
    ct_checkpoint(src_dir, qdir, "w4a16_g64_sym", f16_scales=True)
    qf = tmp_path / "m.qf"
    convert(qdir, qf, "F32")  # transcoded: every linear is Q4_0
    with open_gguf(qf) as f:
        assert f.tensors["blk.0.attn_q.weight"].type.name == "Q4_0"
    out = tmp_path / "export"
    s = export_quantized(qf, out, "compressed-tensors", dtype="float32")
    assert s.linears == {"Q4_0": 14} and "groups of 64" in s.group_note
    (g0,) = _qc(out)["config_groups"].values()
    assert g0["weights"]["group_size"] == 64 and g0["weights"]["symmetric"] is True
    _same_tensors(qdir, out)  # codes and (f32) scales bit for bit, as compressed-tensors wrote them


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_ggml_blocks_load_in_transformers_as_the_same_weights(src_dir, tmp_path, qtype):
    qf = tmp_path / "m.qf"
    convert(src_dir, qf, qtype)
    out = tmp_path / "export"
    s = export_quantized(qf, out, "compressed-tensors", dtype="float32")
    assert s.linears == {qtype: 14} and "groups of 32" in s.group_note  # random weights: no two scales agree
    sd = _load_hf(out).state_dict()  # compressed-tensors decompresses on load
    for n, w in _ggml_weights(qf).items():
        assert np.array_equal(sd[n].float().numpy(), w), n
    # runtime vs transformers: the runtime quantizes activations for its integer dot products
    _close(_transformers_logits(out), _runtime_logits(qf), 2e-2)


# ------------------------------------------------------------------------------------------------ GPTQ / AWQ

def _gptq_dequantize(folder, module: str, bits: int, group: int, sym: bool, desc_act: bool, fmt: str) -> np.ndarray:
    """GPTQModel's TorchLinear dequantization of one exported module (v1 zero points converted by GPTQModel)."""
    import torch
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    c = Checkpoint(folder)
    t = {s: torch.from_numpy(np.array(c.raw(f"{module}.{s}"))) for s in ("qweight", "qzeros", "scales", "g_idx")}
    n_out, n_in = t["scales"].shape[1], t["g_idx"].shape[0]
    ql = TorchLinear(bits=bits, group_size=group, sym=sym, desc_act=desc_act, in_features=n_in, out_features=n_out,
                     bias=False, pack_dtype=torch.int32, register_buffers=True)
    for s, v in t.items():
        getattr(ql, s).copy_(v.view(getattr(ql, s).dtype))
    if fmt == "gptq":
        convert_gptq_v1_to_v2_format_module(ql, bits, torch.int32)
    ql.post_init()
    ql.scales = ql.scales.float()
    return ql.dequantize_weight().T.float().numpy()


GPTQ_CASES = [(4, 32, True, False, "gptq"), (4, 32, False, True, "gptq"), (4, 64, True, True, "gptq_v2"),
              (8, -1, True, False, "gptq"), (2, 32, False, False, "gptq")]


@pytest.mark.parametrize("bits,group,sym,desc_act,fmt", GPTQ_CASES)
def test_gptq_round_trip(src_dir, tmp_path, bits, group, sym, desc_act, fmt):
    _need_gptqmodel()
    qdir = tmp_path / "gptq"
    ref = gptq_checkpoint(src_dir, qdir, bits, group, sym, desc_act, fmt)
    qf = tmp_path / "m.qf"
    convert(qdir, qf, "F32", keep_payload=True)
    out = tmp_path / "export"
    s = export_quantized(qf, out, "gptq", dtype="float32", checkpoint_format=fmt)
    assert s.layout == "gptq"
    _same_tensors(qdir, out)  # qweight, qzeros (v1: minus one), scales, g_idx, and the float tensors
    got = _qc(out)
    assert (got["bits"], got["group_size"], got["checkpoint_format"]) == (bits, group, fmt)
    assert got["desc_act"] == desc_act and got["sym"] == sym
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(_gptq_dequantize(out, name[:-7], bits, group, sym, desc_act, fmt), ref[name])


def test_q4_0_exports_as_gptq_that_gptqmodel_reads(src_dir, tmp_path):
    _need_gptqmodel()
    qf = tmp_path / "m.qf"
    convert(src_dir, qf, "Q4_0")
    out = tmp_path / "export"
    export_quantized(qf, out, "gptq", dtype="float32")
    assert _qc(out)["sym"] is True and _qc(out)["group_size"] == 32
    for n, w in _ggml_weights(qf).items():
        np.testing.assert_array_equal(_gptq_dequantize(out, n[:-7], 4, 32, True, False, "gptq"), w, err_msg=n)


def test_awq_round_trip(src_dir, tmp_path):
    _need_gptqmodel()
    qdir = tmp_path / "awq"
    awq_checkpoint(src_dir, qdir, 32)
    qf = tmp_path / "m.qf"
    convert(qdir, qf, "F32", keep_payload=True)
    out = tmp_path / "export"
    assert export_quantized(qf, out, dtype="float32").layout == "awq"
    _same_tensors(qdir, out)


def test_q4_0_exports_as_awq_that_autoawq_unpacking_reads(src_dir, tmp_path):
    _need_gptqmodel()
    import torch
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    qf = tmp_path / "m.qf"
    convert(src_dir, qf, "Q4_0")
    out = tmp_path / "export"
    export_quantized(qf, out, "awq", dtype="float32")
    c = Checkpoint(out)
    for n, w in _ggml_weights(qf).items():
        m = n[:-7]
        t = [torch.from_numpy(np.array(c.raw(f"{m}.{s}"))) for s in ("qweight", "qzeros", "scales")]
        got = dequantize_gemm(t[0], t[1], t[2].float(), 4, 32).T.numpy()
        np.testing.assert_array_equal(got, w, err_msg=n)


@pytest.mark.parametrize("block", [[32, 32], None])
def test_hf_fp8_round_trip(src_dir, tmp_path, block):
    qdir = tmp_path / "fp8"
    hf_fp8_checkpoint(src_dir, qdir, block)
    qf = tmp_path / "m.qf"
    convert(qdir, qf, "F32", keep_payload=True)
    out = tmp_path / "export"
    assert export_quantized(qf, out, dtype="float32").layout == "fp8"
    _same_tensors(qdir, out)
    assert _qc(out)["weight_block_size"] == block


# ---------------------------------------------------------------------------------------------------- refusals

def test_a_type_no_layout_holds_is_refused_naming_the_tensor(src_dir, tmp_path):
    qf = tmp_path / "m.qf"
    convert(src_dir, qf, "Q5_0")
    out = tmp_path / "export"
    with pytest.raises(ConvertError, match=r"blk\.0\.\w+\.weight.*Q5_0"):
        export_quantized(qf, out, "compressed-tensors")
    assert not out.exists() and not list(tmp_path.glob(".export*"))


def test_awq_refuses_8_bit_naming_the_tensor(src_dir, tmp_path):
    qf = tmp_path / "m.qf"
    convert(src_dir, qf, "Q8_0")
    out = tmp_path / "export"
    with pytest.raises(ConvertError, match=r"model\.layers\.0\.\w+\.\w+_proj\.weight.*not 4-bit"):
        export_quantized(qf, out, "awq")
    assert not out.exists()


def test_float_file_has_nothing_to_export_quantized(src_dir, tmp_path):
    qf = tmp_path / "m.qf"
    convert(src_dir, qf, "F16")
    with pytest.raises(ConvertError, match="stored as F16"):
        export_quantized(qf, tmp_path / "export")


def test_qexport_cli(src_dir, tmp_path):
    from click.testing import CliRunner

    from qf.tools.qexport import main

    qf = tmp_path / "m.qf"
    convert(src_dir, qf, "Q4_0")
    r = CliRunner().invoke(main, [str(qf), str(tmp_path / "e"), "--format", "gptq"])
    assert r.exit_code == 0, r.output
    assert "14 quantized linears (Q4_0 x14)" in r.output and _qc(tmp_path / "e")["quant_method"] == "gptq"
    r = CliRunner().invoke(main, [str(qf), str(tmp_path / "e"), "--format", "awq"])
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(main, [str(qf), str(tmp_path / "f"), "--format", "float"])
    assert r.exit_code == 0 and (tmp_path / "f" / "model.safetensors").exists()


def test_tied_embeddings_keep_lm_head_unquantized(tiny_checkpoint_module, tmp_path):
    src = tiny_checkpoint_module(tied=True)
    qf = tmp_path / "m.qf"
    convert(src, qf, "Q4_0")
    out = tmp_path / "export"
    export_quantized(qf, out, "compressed-tensors", dtype="float32")
    assert _qc(out)["ignore"] == ["lm_head"] and json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    sd = _load_hf(out).state_dict()
    for n, w in _ggml_weights(qf).items():
        assert np.array_equal(sd[n].numpy(), w), n


def test_payload_file_exports_dequantized_as_float(src_dir, tmp_path):
    qdir = tmp_path / "ct"
    ct_checkpoint(src_dir, qdir, "w4a16_g32_asym")
    qf = tmp_path / "m.qf"
    convert(qdir, qf, "F32", keep_payload=True)
    from qf.convert.export import export_hf

    out = export_hf(qf, tmp_path / "float", dtype="float32")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    _close(_transformers_logits_float(out), _runtime_logits(qf), 1e-4)


def _transformers_logits_float(folder) -> np.ndarray:
    """transformers' logits of IDS for an unquantized folder."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([IDS])).logits[0].float().numpy()
