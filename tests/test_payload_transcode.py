"""Quantized checkpoints (made by compressed-tensors) whose grid ggml has: written as Q4_0 / Q8_0 exactly, Q4_1
on request, checked with gguf-py's dequantizers against compressed-tensors' own decompression."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("compressed_tensors")

from payload_fixtures import ct_checkpoint, reference_logits  # noqa: E402

from qf.convert.pipeline import convert  # noqa: E402
from qf.format.reader import open_gguf  # noqa: E402
from qf.quant.formats import PAYLOAD_TENSORS_KEY  # noqa: E402
from qf.runtime import Model  # noqa: E402

IDS = [1, 17, 42, 99, 7, 250, 3, 64]
HEADS = {"q_proj": 4, "k_proj": 2}  # the tiny llama's Q/K heads (GGUF permutes their rows)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's Q/K row permutation (the reference restated)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    """model.layers.1.mlp.up_proj.weight -> blk.1.ffn_up.weight."""
    layer, rest = hf.split(".")[2], ".".join(hf.split(".")[3:-1])
    return f"blk.{layer}.{GGUF_NAMES[rest]}.weight"


def _expected(hf: str, w: np.ndarray) -> np.ndarray:
    """The reference weight in the file's row order."""
    proj = hf.split(".")[-2]
    return _permute(w, HEADS[proj]) if proj in HEADS else w


@pytest.fixture(scope="module")
def made(tiny_checkpoint_module, tmp_path_factory):
    """(scheme, f16 scales) -> (source folder, quantized folder, reference weights), made once each."""
    cache = {}

    def get(scheme: str, f16: bool):
        if (scheme, f16) not in cache:
            src = tiny_checkpoint_module(tied=False)
            out = tmp_path_factory.mktemp(scheme)
            cache[scheme, f16] = (src, out, ct_checkpoint(src, out, scheme, f16_scales=f16))
        return cache[scheme, f16]

    return get


@pytest.mark.parametrize("scheme,qtype", [("w4a16_g32_sym", "Q4_0"), ("w4a16_g64_sym", "Q4_0"),
                                          ("w8a16_channel_sym", "Q8_0")])
def test_exact_transcode(made, tmp_path, scheme, qtype):
    """Every linear becomes qtype; gguf-py's dequantization of it equals compressed-tensors' decompression bit for
    bit; the file has no payload keys and runs (logits as transformers with those weights)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    src, qdir, ref = made(scheme, True)
    out = tmp_path / "m.qf"
    s = convert(qdir, out, "F32")
    assert s.types[qtype] == 14 and any(f"-> {qtype} (exact" in n for n in s.notes), s.notes
    with open_gguf(out) as f:
        assert PAYLOAD_TENSORS_KEY not in f.meta
        for hf, w in ref.items():
            t = f.tensors[_gguf_name(hf)]
            assert t.type.name == qtype
            got = dequantize(np.asarray(f.raw(t.name)), GGMLQuantizationType[qtype]).reshape(w.shape)
            assert np.array_equal(got, _expected(hf, w)), hf
    with Model.load(out, n_ctx=64, type_k="f32", type_v="f32") as m:
        logits = m.logits(IDS)
    want = reference_logits(src, ref, IDS)
    assert np.abs(logits - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_inexact_scales_keep_payload(made, tmp_path):
    """f32 scales that fp16 cannot hold: the payload stays, and the summary says why."""
    _, qdir, _ = made("w4a16_g32_sym", False)
    out = tmp_path / "m.qf"
    s = convert(qdir, out)
    assert "Q4_0" not in s.types
    assert any("kept as payload" in n and "not exact in fp16" in n for n in s.notes), s.notes
    with open_gguf(out) as f:
        assert len(f.meta.get_array(PAYLOAD_TENSORS_KEY)) == 14


def test_keep_payload(made, tmp_path):
    _, qdir, _ = made("w4a16_g32_sym", True)
    out = tmp_path / "m.qf"
    s = convert(qdir, out, keep_payload=True)
    assert "Q4_0" not in s.types and any("--keep-payload" in n for n in s.notes)
    with open_gguf(out) as f:
        assert len(f.meta.get_array(PAYLOAD_TENSORS_KEY)) == 14


def test_asymmetric_lossy_on_request(made, tmp_path):
    """Asymmetric 4-bit: native by default; Q4_1 with transcode_lossy, within the worst error it reports."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    _, qdir, ref = made("w4a16_g32_asym", True)
    out = tmp_path / "m.qf"
    s = convert(qdir, out)
    assert "Q4_1" not in s.types and any("--transcode-lossy allows it" in n for n in s.notes), s.notes
    s = convert(qdir, out, transcode_lossy=True)
    assert s.types["Q4_1"] == 14
    note = next(n for n in s.notes if "-> Q4_1" in n)
    worst = float(note.split("worst |error| ")[1].split()[0])
    with open_gguf(out) as f:
        err = max(float(np.abs(dequantize(np.asarray(f.raw(_gguf_name(hf))), GGMLQuantizationType.Q4_1)
                               .reshape(w.shape) - _expected(hf, w)).max()) for hf, w in ref.items())
    assert 0 < err <= worst * 1.01 + 1e-7, (err, worst)


def test_qconvert_prints_what_was_written(made, tmp_path):
    from click.testing import CliRunner

    from qf.tools.qconvert import main

    _, qdir, _ = made("w4a16_g64_sym", True)
    r = CliRunner().invoke(main, [str(qdir), str(tmp_path / "m.qf"), "-q"])
    assert r.exit_code == 0, r.output
    assert "int;bits=4;group=64;sym=1;g_idx=0: 14 weights -> Q4_0 (exact" in r.output
    r = CliRunner().invoke(main, [str(qdir), str(tmp_path / "n.qf"), "-q", "--keep-payload"])
    assert r.exit_code == 0 and "kept as payload (--keep-payload)" in r.output, r.output
