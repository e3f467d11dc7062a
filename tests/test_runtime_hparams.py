"""Bad hyperparameters and missing tensors (hardening rows 20 and 21): a ModelError naming the key or tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_runtime_forward import build_tiny_gguf

from qf.format.errors import ModelError, QFError
from qf.format.reader import open_gguf
from qf.runtime import Model
from qf.runtime.hparams import hparams_from_metadata

BAD_HPARAMS = [
    ({"llama.block_count": 0}, "llama.block_count"),
    ({"llama.block_count": 100_000}, "llama.block_count"),
    ({"llama.block_count": None}, "llama.block_count"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count"),
    ({"llama.attention.head_count": 3, "llama.attention.head_count_kv": 3}, "llama.attention.head_count"),
    ({"llama.attention.head_count_kv": 3}, "llama.attention.head_count_kv"),
    ({"llama.attention.head_count_kv": 0}, "llama.attention.head_count_kv"),
    ({"llama.embedding_length": 0}, "llama.embedding_length"),
    ({"llama.context_length": 0}, "llama.context_length"),
    ({"llama.feed_forward_length": 0}, "llama.feed_forward_length"),
    ({"llama.rope.dimension_count": 7}, "llama.rope.dimension_count"),
    ({"llama.rope.dimension_count": 1024}, "llama.rope.dimension_count"),
    ({"llama.rope.freq_base": -1.0}, "llama.rope.freq_base"),
    ({"llama.attention.layer_norm_rms_epsilon": float("nan")}, "llama.attention.layer_norm_rms_epsilon"),
    ({"llama.rope.scaling.type": "yarn"}, "llama.rope.scaling.type"),
    ({"llama.vocab_size": 100}, "llama.vocab_size"),  # disagrees with the tokenizer and token_embd
    ({"tokenizer.ggml.eos_token_id": 1_000_000}, "tokenizer.ggml.eos_token_id"),
    ({"tokenizer.ggml.bos_token_id": 264}, "tokenizer.ggml.bos_token_id"),  # == n_vocab
    ({"general.architecture": "gpt-j"}, "general.architecture"),
]


@pytest.mark.parametrize("meta,key", BAD_HPARAMS, ids=[k for _, k in BAD_HPARAMS])
def test_bad_hyperparameters_name_the_key(tmp_path: Path, meta: dict, key: str) -> None:
    path = build_tiny_gguf(tmp_path / "bad.gguf", meta=meta)
    with pytest.raises(ModelError) as e:
        Model.load(path, n_ctx=32)
    assert key in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("name", ["blk.1.ffn_up.weight", "blk.0.attn_norm.weight", "output_norm.weight",
                                  "token_embd.weight"])
def test_missing_tensor_is_named(tmp_path: Path, name: str) -> None:
    path = build_tiny_gguf(tmp_path / "missing.gguf", drop=(name,))
    with pytest.raises(ModelError, match=name.replace(".", r"\.")):
        Model.load(path, n_ctx=32)


def test_misshapen_tensor_is_named(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "shape.gguf", reshape={"blk.0.attn_k.weight": (64, 48)})
    with pytest.raises(ModelError, match=r"blk\.0\.attn_k\.weight.*\(64, 48\).*\(64, 32\)"):
        Model.load(path, n_ctx=32)


def test_wrongly_typed_key_is_a_project_error(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "typed.gguf", meta={"llama.block_count": "thirty"})
    with pytest.raises(QFError, match="llama.block_count"):
        Model.load(path, n_ctx=32)


def test_good_file_derives_sizes(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "ok.gguf", n_head=8, n_head_kv=2, n_rot=4)
    with open_gguf(path) as f:
        hp = hparams_from_metadata(f.meta, "llama", str(path))
    assert (hp.head_dim, hp.n_gqa, hp.q_dim, hp.kv_dim, hp.n_rot, hp.n_vocab) == (8, 4, 64, 16, 4, 264)


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "starcoder2.gguf", arch="starcoder2")
    with pytest.raises(ModelError, match="'starcoder2' is not supported.*gemma3.*llama.*phi3.*qwen3moe.*"
                                         "forward pass .* is not implemented"):
        Model.load(path)


def test_bad_context_request(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "ok.gguf")
    with pytest.raises(ModelError, match="n_ctx"):
        Model.load(path, n_ctx=-5)


def test_linear_rope_scaling_divides_positions(tmp_path: Path) -> None:
    import numpy as np

    from qf.runtime.arch.llama import rope_angles

    path = build_tiny_gguf(tmp_path / "scaled.gguf",
                           meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    with open_gguf(path) as f:
        hp = hparams_from_metadata(f.meta, "llama", str(path))
    assert hp.rope_freq_scale == 0.25
    cos, sin = rope_angles(hp, 64, None)
    inv = 10000.0 ** (-np.arange(hp.n_rot // 2) * 2.0 / hp.n_rot)
    np.testing.assert_allclose(cos[40], np.cos(10 * inv), atol=1e-6)  # position 40 acts as position 10
    np.testing.assert_allclose(sin[40], np.sin(10 * inv), atol=1e-6)
