"""Residual-stream widening (qf.eval.widen): the same logits in our runtime and in transformers, wider rows.

A tiny llama (hidden 64, strong norm gains, and a large epsilon so that its scaling matters) widened to 96 and
to 256: transformers' logits on the widened folder equal those on the original, and so do ours after converting
both; hidden_size, head_dim, epsilon and shapes are as documented; bad widths are refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_rotate import TOKENS, _logits, _strong_norms

from qf.convert.checkpoint import Checkpoint
from qf.eval.widen import widen_checkpoint, widening_map
from qf.format.errors import ConvertError


def _hf_logits(model_dir) -> np.ndarray:
    """transformers' float64 logits [n, vocab] for TOKENS."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64)
    with torch.no_grad():
        return m(torch.tensor([TOKENS])).logits[0].numpy()


def _big_eps(d, eps: float = 0.05) -> None:
    """rms_norm_eps large enough that a wrong epsilon shows in the logits."""
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": eps}))


def test_widening_map_has_orthonormal_rows():
    p = widening_map(64, 96, seed=2)
    assert p.shape == (64, 96) and np.abs(p @ p.T - np.eye(64)).max() < 1e-12
    with pytest.raises(ConvertError, match="cannot widen"):
        widening_map(64, 32, seed=0)


@pytest.mark.parametrize("arch,tied,bias,width", [("LlamaForCausalLM", True, False, 96),
                                                  ("LlamaForCausalLM", False, False, 256),
                                                  ("Qwen2ForCausalLM", True, True, 96)])
def test_widened_checkpoint_computes_the_same_logits(tiny_checkpoint, tmp_path, arch, tied, bias, width):
    src = tiny_checkpoint(arch=arch, tied=tied, bias=bias)
    _strong_norms(src)
    _big_eps(src)
    dst = widen_checkpoint(src, tmp_path / "wide", width=width, seed=5)
    cfg0, cfg = (json.loads((d / "config.json").read_text()) for d in (src, dst))
    assert cfg["hidden_size"] == width and cfg["head_dim"] == 64 // cfg0["num_attention_heads"]
    assert cfg["intermediate_size"] == cfg0["intermediate_size"] and cfg["tie_word_embeddings"] is False
    assert cfg["rms_norm_eps"] == pytest.approx(0.05 * 64 / width)
    hf_ref, hf_wide = _hf_logits(src), _hf_logits(dst)
    assert np.abs(hf_ref - hf_wide).max() < 1e-4 * np.abs(hf_ref).max()
    ours_ref, ours_wide = _logits(src, tmp_path / "a.qf"), _logits(dst, tmp_path / "b.qf")
    assert np.abs(ours_ref - ours_wide).max() < 1e-4 * np.abs(ours_ref).max()
    assert np.abs(ours_wide - hf_ref).max() < 1e-3 * np.abs(hf_ref).max()
    ck = Checkpoint(dst)
    try:
        assert tuple(ck.entry("model.embed_tokens.weight").shape)[1] == width
        assert tuple(ck.entry("model.layers.0.self_attn.q_proj.weight").shape) == (64, width)
        assert tuple(ck.entry("model.layers.0.mlp.down_proj.weight").shape) == (width, cfg0["intermediate_size"])
        assert np.array_equal(ck.to_f32("model.norm.weight"), np.ones(width, np.float32))
    finally:
        ck.close()


def test_same_width_is_a_rotation(tiny_checkpoint, tmp_path):
    """width == hidden is a plain rotation (epsilon unchanged)."""
    src = tiny_checkpoint()
    dst = widen_checkpoint(src, tmp_path / "same", width=64)
    assert json.loads((dst / "config.json").read_text())["rms_norm_eps"] == pytest.approx(1e-5)


def test_widen_refuses_other_architectures_and_existing_output(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint()
    dst = widen_checkpoint(src, tmp_path / "wide", width=96)
    with pytest.raises(ConvertError, match="already exists"):
        widen_checkpoint(src, dst, width=96)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["Gemma3ForCausalLM"]}))
    with pytest.raises(ConvertError, match="Gemma3ForCausalLM"):
        widen_checkpoint(src, tmp_path / "wide2", width=96)
    assert not (tmp_path / "wide2").exists()
