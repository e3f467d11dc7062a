"""qimatrix / qf.eval.imatrix: input statistics of every blk.* matrix product, in llama.cpp's file format."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from qf.convert.pipeline import convert
from qf.eval.imatrix import compute_imatrix, save_imatrix
from qf.format.reader import open_gguf
from qf.quant.imatrix import load_imatrix
from qf.runtime.api import Model

TEXT = " ".join(f"the cat sat on mat number {i} and then the dog ran home" for i in range(60))
N_CTX = 32


@pytest.fixture
def tiny_f32(tiny_checkpoint, tmp_path):
    return convert(tiny_checkpoint(layers=2), tmp_path / "tiny.qf", "F32").path


def test_statistics_are_the_sums_of_input_squares(tiny_f32, tmp_path):
    stats, n_chunks = compute_imatrix(tiny_f32, TEXT, n_ctx=N_CTX, max_chunks=3, n_threads=1)
    assert n_chunks == 3
    names = {f"blk.{b}.{w}.weight" for b in range(2)
             for w in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(stats.sums) == names  # token_embd / output are not collected
    assert all(c == 3 * N_CTX for c in stats.counts.values())
    for b in range(2):  # the products that read the same input saw the same rows
        assert np.array_equal(stats.sums[f"blk.{b}.attn_q.weight"], stats.sums[f"blk.{b}.attn_v.weight"])
        assert np.array_equal(stats.sums[f"blk.{b}.ffn_gate.weight"], stats.sums[f"blk.{b}.ffn_up.weight"])
    # layer 0's attention input, by hand: RMSNorm(embedding rows) * attn_norm, over the same chunks
    with Model.load(tiny_f32, n_ctx=N_CTX) as m:
        ids = np.asarray(m.tokenize(TEXT))
        bos = m.bos_id if m.add_bos else None
    with open_gguf(tiny_f32) as f:
        emb, g = f.dequantize("token_embd.weight"), f.dequantize("blk.0.attn_norm.weight")
        eps = float(f.meta.raw("llama.attention.layer_norm_rms_epsilon")[1])
    chunks = ids[:3 * N_CTX].reshape(3, N_CTX).copy()
    if bos is not None:
        chunks[:, 0] = bos
    x = emb[chunks.reshape(-1)].astype(np.float64)  # [3 * N_CTX, n_embd]
    x = x / np.sqrt((x * x).mean(1, keepdims=True) + eps) * g
    want = (x * x).sum(0)
    assert np.allclose(stats.sums["blk.0.attn_q.weight"], want, rtol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_merged_products_are_collected(tiny_checkpoint, tmp_path, qtype):
    """Quantized weights take the backend's merged Q/K/V and gate/up products: each weight still gets its rows."""
    path = convert(tiny_checkpoint(layers=2), tmp_path / f"tiny-{qtype}.qf", qtype).path
    stats, _ = compute_imatrix(path, TEXT, n_ctx=N_CTX, max_chunks=2, n_threads=1)
    names = {f"blk.{b}.{w}.weight" for b in range(2)
             for w in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(stats.sums) == names and all(c == 2 * N_CTX for c in stats.counts.values())
    for b in range(2):
        assert np.array_equal(stats.sums[f"blk.{b}.attn_q.weight"], stats.sums[f"blk.{b}.attn_k.weight"])
        assert np.array_equal(stats.sums[f"blk.{b}.ffn_gate.weight"], stats.sums[f"blk.{b}.ffn_up.weight"])


def test_file_round_trips_with_process_output(tiny_checkpoint, tmp_path):
    untied = convert(tiny_checkpoint(tied=False), tmp_path / "untied.qf", "F32").path
    stats, n = compute_imatrix(untied, TEXT, n_ctx=N_CTX, max_chunks=2, n_threads=1, process_output=True)
    assert stats.counts["output.weight"] == 2 * N_CTX  # every position's logits were computed
    path = save_imatrix(tmp_path / "imx.gguf", stats, n, N_CTX, "text.txt")
    m = load_imatrix(path)
    assert m.chunk_count == 2 and m.datasets == ["text.txt"]
    for name, s in stats.sums.items():
        assert np.allclose(m.entries[name][0], (s / stats.counts[name]).astype(np.float32), rtol=1e-6)


def test_cli(tiny_f32, tmp_path):
    from qf.tools.qimatrix import main

    text = tmp_path / "calib.txt"
    text.write_text(TEXT, encoding="utf-8")
    r = CliRunner().invoke(main, [str(tiny_f32), "-f", str(text), "-o", str(tmp_path / "i.gguf"), "-c", str(N_CTX),
                                  "--chunks", "2", "-t", "1"])
    assert r.exit_code == 0, r.output
    assert "14 weights, 2 chunks" in r.output and load_imatrix(tmp_path / "i.gguf").chunk_count == 2
    text.write_text("too short", encoding="utf-8")
    r = CliRunner().invoke(main, [str(tiny_f32), "-f", str(text), "-o", str(tmp_path / "j.gguf"), "-c", str(N_CTX)])
    assert r.exit_code == 2 and "at least" in r.output and not (tmp_path / "j.gguf").exists()
