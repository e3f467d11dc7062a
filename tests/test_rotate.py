"""Residual-stream rotation (qf.eval.rotate): same logits, weights moved off the grid, clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qf.convert.checkpoint import Checkpoint
from qf.convert.pipeline import convert
from qf.eval.rotate import random_orthogonal, rotate_checkpoint
from qf.format.errors import ConvertError
from qf.runtime.api import Model

TOKENS = [5, 17, 3, 42, 8, 11, 29, 7, 2, 13]


def _strong_norms(d) -> None:
    """Scale every norm weight of a tiny checkpoint into [0.3, 3] so that folding them is really tested."""
    from conftest import write_weights

    ck = Checkpoint(d)
    w = {n: np.array(ck.to_f32(n)) for n in ck.names()}
    ck.close()
    rng = np.random.default_rng(1)
    for n in w:
        if n.endswith("norm.weight"):
            w[n] = rng.uniform(0.3, 3.0, w[n].shape).astype(np.float32)
    write_weights(d, w)


def _logits(model_dir, out) -> np.ndarray:
    """F32 conversion of a checkpoint, run by our CPU runtime; logits [n, vocab]."""
    convert(model_dir, out, "F32")
    m = Model.load(out, n_ctx=64, n_threads=1)
    try:
        return m.logits(TOKENS)
    finally:
        m.close()


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(48, seed=3)
    assert np.abs(q @ q.T - np.eye(48)).max() < 1e-12
    assert np.array_equal(q, random_orthogonal(48, seed=3))
    assert not np.allclose(q, random_orthogonal(48, seed=4))


@pytest.mark.parametrize("arch,tied,bias", [("LlamaForCausalLM", True, False), ("LlamaForCausalLM", False, False),
                                            ("Qwen2ForCausalLM", True, True)])
def test_rotated_checkpoint_computes_the_same_logits(tiny_checkpoint, tmp_path, arch, tied, bias):
    src = tiny_checkpoint(arch=arch, tied=tied, bias=bias)
    _strong_norms(src)
    dst = rotate_checkpoint(src, tmp_path / "rot", seed=7)
    ref, rot = _logits(src, tmp_path / "a.qf"), _logits(dst, tmp_path / "b.qf")
    assert np.abs(ref - rot).max() < 1e-4 * np.abs(ref).max()
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    a, b = Checkpoint(src), Checkpoint(dst)
    try:  # every matrix changed; norms are folded into the readers
        assert "lm_head.weight" in b.names()
        for n in a.names():
            if n.endswith("norm.weight"):
                assert np.array_equal(b.to_f32(n), np.ones_like(a.to_f32(n)))
            elif n.endswith("proj.weight") or n == "model.embed_tokens.weight":
                assert np.abs(a.to_f32(n) - b.to_f32(n)).max() > 1e-3, n
    finally:
        a.close()
        b.close()


def test_rotation_moves_weights_off_a_quantization_grid(tiny_checkpoint, tmp_path):
    """Weights snapped to a 16-level grid per 32-block come back no longer on it."""
    from conftest import write_weights

    src = tiny_checkpoint()
    ck = Checkpoint(src)
    w = {n: np.array(ck.to_f32(n)) for n in ck.names()}
    ck.close()
    x = w["model.layers.0.mlp.up_proj.weight"].reshape(-1, 32)
    lo, step = x.min(1, keepdims=True), (x.max(1, keepdims=True) - x.min(1, keepdims=True)) / 15
    w["model.layers.0.mlp.up_proj.weight"] = (lo + np.round((x - lo) / step) * step).reshape(128, 64)
    write_weights(src, w)
    dst = rotate_checkpoint(src, tmp_path / "rot")
    y = Checkpoint(dst).to_f32("model.layers.0.mlp.up_proj.weight").reshape(-1, 32)
    lo, step = y.min(1, keepdims=True), (y.max(1, keepdims=True) - y.min(1, keepdims=True)) / 15
    off = np.abs((y - lo) / step - np.round((y - lo) / step))
    assert off.mean() > 0.2  # on-grid would be ~0; uniform residue is 0.25


def test_rotate_refuses_other_architectures_and_existing_output(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint()
    cfg = json.loads((src / "config.json").read_text())
    dst = rotate_checkpoint(src, tmp_path / "rot")
    with pytest.raises(ConvertError, match="already exists"):
        rotate_checkpoint(src, dst)
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["Gemma3ForCausalLM"]}))
    with pytest.raises(ConvertError, match="cannot rotate Gemma3ForCausalLM"):
        rotate_checkpoint(src, tmp_path / "rot2")
    assert not (tmp_path / "rot2").exists()
