"""IQ4_NL / IQ4_XS: layouts bit-exact with gguf.quants, ggml's search (byte identity with ggml-quants.c itself is
in tests/test_codecs_kquants.py::test_bit_exact_with_ggml when QF_GGML_SRC is set).

- dequantize == gguf.quants.dequantize bit for bit on random bytes (every index, scale code and f16 pattern)
  and on the bytes our quantizer writes;
- the search: error well under one level step, never worse than plain nearest-level rounding at the same
  scale, importance lowers the importance-weighted error; degenerate blocks (zeros) give ggml's bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants

from qf.format.errors import QFError
from qf.format.ggml_types import GGMLType
from qf.quant.codecs import get_codec
from qf.quant.iq_tables import kvalues_iq4nl
from qf.quant.strategies.iq4 import best_index

NAMES = ["IQ4_NL", "IQ4_XS"]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte-for-byte equality (NaN payloads and signed zeros count)."""
    return a.shape == b.shape and bool(np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                                      np.ascontiguousarray(b).view(np.uint8)))


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_random_bytes_like_gguf(name: str) -> None:
    codec = get_codec(GGMLType[name])
    b = np.random.default_rng(3).integers(0, 256, (500, codec.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        assert same_bits(codec.dequantize(b), quants.dequantize(b, GT[name]))


@pytest.mark.parametrize("name", NAMES)
def test_our_bytes_dequantize_like_gguf_and_round_trip(name: str) -> None:
    codec = get_codec(GGMLType[name])
    rng = np.random.default_rng(4)
    x = (rng.standard_t(4, (32, 1024)) * rng.uniform(0.01, 2, (32, 1))).astype(np.float32)
    for imp in (None, rng.gamma(1, 1, 1024).astype(np.float32)):
        q = codec.quantize(x, imp)
        assert q.shape == (32, 1024 // codec.block_size * codec.type_size)
        y = codec.dequantize(q)
        assert same_bits(y, quants.dequantize(q, GT[name]))
        rel = np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x ** 2))
        assert rel < 0.12, rel


def test_best_index_is_the_nearest_level() -> None:
    v = kvalues_iq4nl().astype(np.float32)
    xs = np.concatenate([np.linspace(-140, 130, 2001), (v[1:] + v[:-1]) / 2]).astype(np.float32)
    for x in xs:
        i = best_index(v, x)
        assert abs(x - v[i]) <= np.min(np.abs(x - v))
        if i < 15 and x - v[i] == v[i + 1] - x:  # a tie stays on the upper level (ggml's strict <)
            pytest.fail("tie resolved downwards")


@pytest.mark.parametrize("name", NAMES)
def test_importance_lowers_weighted_error(name: str) -> None:
    codec = get_codec(GGMLType[name])
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    imp = (rng.gamma(0.3, 1, 512) ** 2).astype(np.float32)

    def werr(q: np.ndarray) -> float:
        return float(np.sum(imp * (x - codec.dequantize(q)) ** 2))

    assert werr(codec.quantize(x, imp)) < 0.97 * werr(codec.quantize(x))


@pytest.mark.parametrize("name", NAMES)
def test_zero_blocks_and_nonfinite(name: str) -> None:
    codec = get_codec(GGMLType[name])
    q = codec.quantize(np.zeros((2, 256), np.float32))
    assert not codec.dequantize(q).any()
    if name == "IQ4_XS":  # ggml: d = -max_scale / 32 = -0.0, every sub-block scale code 32, index of level 1
        assert (q[:, 1] == 0x80).all()
    x = np.ones((2, 512), np.float32)
    x[1, 300] = np.nan
    with pytest.raises(QFError, match=name):
        codec.quantize(x)


def test_iq4_mix_rules() -> None:
    """llama.cpp's llama_tensor_get_type for IQ4_NL / IQ4_XS (byte identity with llama-quantize is in
    tests/test_llama_quantize.py)."""
    from qf.quant.codecs import registered_types
    from qf.quant.mixes import TensorCtx, choose_type, file_type, get_mix

    avail = registered_types()
    T = GGMLType
    for name, t in (("IQ4_NL", T.IQ4_NL), ("IQ4_XS", T.IQ4_XS)):
        mix = get_mix(name)

        def pick(tname: str, ne0: int = 512, **kw) -> GGMLType:
            return choose_type(mix, TensorCtx(tname, (ne0, 512), **kw), avail)

        assert pick("blk.3.attn_q.weight") == t
        assert pick("blk.3.attn_v.weight", n_gqa=4) == T.Q5_K
        assert pick("blk.3.attn_v.weight", n_gqa=3) == t
        assert pick("blk.0.ffn_down.weight", layer=0, n_layers=16) == T.Q5_K
        assert pick("blk.0.ffn_down.weight", layer=0, n_layers=16, has_imatrix=True) == t
        assert pick("blk.2.ffn_down.weight", layer=2, n_layers=16) == t
        assert pick("blk.2.attn_output.weight", n_expert=8) == T.Q5_K
        assert pick("output.weight") == T.Q6_K
        assert pick("output.weight", ne0=576) == T.Q8_0
        assert pick("blk.3.attn_q.weight", ne0=576) == T.IQ4_NL  # IQ4_XS falls back to IQ4_NL on 576-wide rows
        assert pick("blk.3.attn_q.weight", ne0=48) == T.F16
    assert (file_type("IQ4_NL"), file_type("IQ4_XS")) == (25, 30)
