"""The torch backend on torch's CPU device: per-type dequantization bit-exact with gguf.quants and
qf.quant.codecs, the tiled dequant-matmul against numpy, and every other op against a numpy reference.
CUDA-only checks skip without a device."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gguf.quants as gq  # noqa: E402
from gguf.constants import GGMLQuantizationType  # noqa: E402

from qf.format.errors import ModelError  # noqa: E402
from qf.format.ggml_types import BLOCK, GGMLType  # noqa: E402
from qf.format.reader import open_gguf  # noqa: E402
from qf.quant.codecs import get_codec, registered_types  # noqa: E402
from qf.runtime.kv_cache import KVSpec  # noqa: E402
from qf.runtime.backend_torch import TorchBackend, cuda_available  # noqa: E402
from qf.runtime.kernels import torch_dequant as tq  # noqa: E402
from qf.runtime.weights import TensorRef  # noqa: E402

TYPES = tq.supported_types()
QUANTIZED = [t for t in TYPES if BLOCK[t][0] > 1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two shared cores: torch's thread pool stalls under contention, one thread is faster and steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ref_dequant(qtype: GGMLType, raw: np.ndarray, n_in: int) -> np.ndarray:
    """gguf.quants' dequantization of rows u8 [n, row_bytes] -> f32 [n, n_in]."""
    return gq.dequantize(raw, GGMLQuantizationType(int(qtype))).reshape(raw.shape[0], n_in).astype(np.float32)


def bits(a: np.ndarray) -> np.ndarray:
    """f32 values as their u32 bit patterns (compares NaN payloads and signed zeros too)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def tensor_ref(qtype: GGMLType, raw: np.ndarray, n_in: int, name: str = "w") -> TensorRef:
    return TensorRef(name=name, type=GGMLType(qtype), ne=(n_in, raw.shape[0]), data=raw)


# ------------------------------------------------------------------------------------------ dequantization


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_bit_exact_random_blocks(qtype):
    """Every bit pattern of the code bytes, random f16 scales: identical bits to gguf.quants and the codec."""
    rng = np.random.default_rng(int(qtype))
    n_in = 2 * BLOCK[qtype][0] if BLOCK[qtype][0] > 1 else 96
    raw = tq.random_packed(qtype, 9, n_in, rng)
    w = tq.pack(qtype, raw, n_in, "cpu")
    got = tq.dequantize(w).numpy()
    want = ref_dequant(qtype, raw, n_in)
    np.testing.assert_array_equal(bits(got), bits(want))
    if qtype in registered_types():
        np.testing.assert_array_equal(bits(got), bits(get_codec(qtype).dequantize(raw)))


@pytest.mark.parametrize("qtype", [GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
def test_half_floats_every_bit_pattern(qtype):
    """All 65536 patterns: identical bits, except that torch quiets F16 signalling NaNs (still NaN)."""
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(256, 512)
    got = tq.dequantize(tq.pack(qtype, raw, 256, "cpu")).numpy()
    want = get_codec(qtype).dequantize(raw)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(bits(got[~nan]), bits(want[~nan]))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_row_subsets(qtype):
    """A slice of rows (a tile) and a gathered index (embedding rows) give the same rows as the whole."""
    rng = np.random.default_rng(100 + int(qtype))
    n_in = BLOCK[qtype][0] if BLOCK[qtype][0] > 1 else 64
    raw = tq.random_packed(qtype, 11, n_in, rng)
    w = tq.pack(qtype, raw, n_in, "cpu")
    want = ref_dequant(qtype, raw, n_in)
    np.testing.assert_array_equal(bits(tq.dequantize(w, slice(3, 8)).numpy()), bits(want[3:8]))
    idx = torch.tensor([10, 0, 4, 4])
    np.testing.assert_array_equal(bits(tq.dequantize(w, idx).numpy()), bits(want[[10, 0, 4, 4]]))


@pytest.mark.parametrize("qtype", [t for t in TYPES if t in registered_types()], ids=lambda t: t.name)
def test_dequant_of_quantized_weights(qtype):
    """Weights quantized by the project's codec (realistic scales and codes) dequantize identically."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    codec = get_codec(qtype)
    raw = codec.quantize(x, np.ones(512, np.float32) if codec.strategy.requires_importance else None)
    got = tq.dequantize(tq.pack(qtype, raw, 512, "cpu")).numpy()
    np.testing.assert_array_equal(bits(got), bits(codec.dequantize(raw)))


def _real_tensors(path, want_types: set[GGMLType], per_type: int = 1):
    """(name, type, ne, raw rows) of up to per_type 2-D tensors of each wanted type (first 512 rows)."""
    found: dict[GGMLType, int] = {}
    with open_gguf(path) as f:
        for name, ti in f.tensors.items():
            t = GGMLType(int(ti.type))
            if t in want_types and found.get(t, 0) < per_type and len(ti.ne) == 2:
                found[t] = found.get(t, 0) + 1
                yield name, t, tuple(int(n) for n in ti.ne), np.array(f.raw(name)[:512])


def test_dequant_real_smollm2_tensors(smollm2_gguf):
    """Q4_1, Q8_0 and F32 tensors of the real SmolLM2 file: bit-exact with the codecs."""
    seen = set()
    for name, t, ne, raw in _real_tensors(smollm2_gguf, set(TYPES)):
        got = tq.dequantize(tq.pack(t, raw, ne[0], "cpu")).numpy()
        np.testing.assert_array_equal(bits(got), bits(get_codec(t).dequantize(raw)), err_msg=name)
        seen.add(t)
    assert {GGMLType.Q4_1, GGMLType.Q8_0} <= seen


def test_dequant_real_gemma3_kquants(gemma3_gguf):
    """Q4_K, Q6_K, Q5_0 and Q8_0 tensors of the real Gemma 3 Q4_K_M file: bit-exact with gguf.quants."""
    seen = set()
    for name, t, ne, raw in _real_tensors(gemma3_gguf, set(QUANTIZED)):
        got = tq.dequantize(tq.pack(t, raw, ne[0], "cpu")).numpy()
        np.testing.assert_array_equal(bits(got), bits(ref_dequant(t, raw, ne[0])), err_msg=name)
        if t in registered_types():
            np.testing.assert_array_equal(bits(got), bits(get_codec(t).dequantize(raw)), err_msg=name)
        seen.add(t)
    assert {GGMLType.Q4_K, GGMLType.Q6_K} <= seen


def test_layout_tables_are_consistent():
    """Every type has a dequantizer and its fields tile the block exactly, in order, without gaps."""
    assert set(tq.FIELDS) == set(tq.DEQUANT)
    for t, fields in tq.FIELDS.items():
        at = 0
        for f in fields:
            assert f.start == at and f.size % np.dtype(f.np_dtype).itemsize == 0, (t.name, f.name)
            at += f.size
        assert at == BLOCK[t][1], t.name


def test_packed_size_is_about_the_file_size():
    """Weights stay packed on the device: Q4_0 4.5 bits/weight, Q4_K 4.625 (unpacked 6-bit scales)."""
    rng = np.random.default_rng(1)
    for qtype, bpw in ((GGMLType.Q4_0, 4.5), (GGMLType.Q4_K, 4.625), (GGMLType.Q6_K, 6.5625)):
        w = tq.pack(qtype, tq.random_packed(qtype, 64, 1024, rng), 1024, "cpu")
        assert w.nbytes * 8 / (64 * 1024) == bpw


def test_pack_rejects_bad_input():
    """Unknown types and rows of the wrong size raise clear errors."""
    with pytest.raises(NotImplementedError, match="TQ2_0"):
        tq.pack(GGMLType.TQ2_0, np.zeros((2, 66), np.uint8), 256, "cpu")
    with pytest.raises(ValueError, match="bytes per row"):
        tq.pack(GGMLType.Q4_0, np.zeros((2, 17), np.uint8), 32, "cpu")


# ------------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 5])
def test_linear_matches_numpy(qtype, m):
    """Decode (M=1) and prefill (M=5), several tiles with a ragged last one, vs f64 numpy on the codec's values."""
    rng = np.random.default_rng(m * 31 + int(qtype))
    n_in = 2 * BLOCK[qtype][0] if BLOCK[qtype][0] > 1 else 128
    raw = tq.random_packed(qtype, 37, n_in, rng)
    x = rng.standard_normal((m, n_in)).astype(np.float32)
    bias = rng.standard_normal(37).astype(np.float32)
    be = TorchBackend("cpu", tile_elems=10 * n_in)  # tiles of 10 rows: 10, 10, 10, 7
    w = be.matrix(tensor_ref(qtype, raw, n_in))
    want = x.astype(np.float64) @ ref_dequant(qtype, raw, n_in).astype(np.float64).T + bias
    got = be.linear(w, torch.from_numpy(x), torch.from_numpy(bias)).numpy()
    assert got.shape == (m, 37) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    untiled = TorchBackend("cpu").linear(w, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(untiled + bias, got, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_linear_fp16_weights_stay_close():
    """The CUDA precision (fp16 dequant and matmul, f32 out), exercised on the CPU: relative error ~1e-3."""
    rng = np.random.default_rng(5)
    raw = tq.random_packed(GGMLType.Q4_K, 64, 512, rng)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    want = x.astype(np.float64) @ ref_dequant(GGMLType.Q4_K, raw, 512).astype(np.float64).T
    be = TorchBackend("cpu", weight_dtype=torch.float16)
    got = be.linear(be.matrix(tensor_ref(GGMLType.Q4_K, raw, 512)), torch.from_numpy(x)).numpy()
    assert got.dtype == np.float32
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 5e-3, err


def test_matrix_errors_name_the_tensor():
    be = TorchBackend("cpu")
    bad = TensorRef(name="blk.3.ffn_up.weight", type=GGMLType.TQ2_0, ne=(256, 2), data=np.zeros((2, 66), np.uint8))
    with pytest.raises(ModelError, match=r"blk\.3\.ffn_up\.weight.*TQ2_0"):
        be.matrix(bad)


def test_embed_and_vector():
    """Embedding rows come out of the packed matrix as f32; 1-D weights are f32 vectors on the device."""
    rng = np.random.default_rng(9)
    raw = tq.random_packed(GGMLType.Q8_0, 50, 64, rng)
    be = TorchBackend("cpu")
    rows = be.embed(be.matrix(tensor_ref(GGMLType.Q8_0, raw, 64)), np.array([3, 49, 3, 0]))
    np.testing.assert_array_equal(bits(rows.numpy()), bits(ref_dequant(GGMLType.Q8_0, raw, 64)[[3, 49, 3, 0]]))
    v = rng.standard_normal(64).astype(np.float32)
    norm = TensorRef("norm", GGMLType.F32, (64,), v.view(np.uint8).reshape(1, -1))
    got = be.vector(norm)
    assert got.dtype == torch.float32 and got.shape == (64,)
    np.testing.assert_array_equal(got.numpy(), v)


# ------------------------------------------------------------------------------------------ other ops


def test_host_round_trip_copies():
    be = TorchBackend("cpu")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = be.from_host(x)
    t.add_(1)
    assert x[0, 0] == 0  # from_host copied
    h = be.to_host(t)
    h[0, 0] = -5
    assert t[0, 0].item() == 1  # to_host copied
    np.testing.assert_array_equal(be.to_host(t), x + 1)


def test_rms_norm():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 96)).astype(np.float32) * 3
    w = rng.standard_normal(96).astype(np.float32)
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-6) * w
    be = TorchBackend("cpu")
    got = be.rms_norm(torch.from_numpy(x), torch.from_numpy(w), 1e-6).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def rope_reference(x: np.ndarray, pos: np.ndarray, n_rot: int, base: float, neox: bool) -> np.ndarray:
    """Rotate the first n_rot dims of x [M, H, D] as complex numbers (pairs (2i, 2i+1) or (i, i + n_rot/2))."""
    half = n_rot // 2
    rot = np.exp(1j * pos[:, None, None] * base ** (-2.0 * np.arange(half) / n_rot))[:, :, :]
    y = x.astype(np.float64)
    a, b = (slice(0, half), slice(half, n_rot)) if neox else (slice(0, n_rot, 2), slice(1, n_rot, 2))
    z = (y[..., a] + 1j * y[..., b]) * rot
    y[..., a], y[..., b] = z.real, z.imag
    return y


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot", [32, 16])  # 16: partial rotary, the last dims are left alone
def test_rope(neox, n_rot):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3, 32)).astype(np.float32)
    pos = np.arange(7, 12)
    theta = pos[:, None] * 10000.0 ** (-2.0 * np.arange(n_rot // 2) / n_rot)
    be = TorchBackend("cpu")
    t = torch.from_numpy(x.copy())
    be.rope(t, torch.from_numpy(np.cos(theta).astype(np.float32)), torch.from_numpy(np.sin(theta).astype(np.float32)),
            np.arange(5), neox)
    np.testing.assert_allclose(t.numpy(), rope_reference(x, pos, n_rot, 10000.0, neox), rtol=1e-5, atol=1e-5)


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int) -> np.ndarray:
    """Causal GQA attention: q [M, H, D] at positions pos0.., k/v [T, Hkv, D] at positions 0.. -> [M, H * D]."""
    m, n_head, d = q.shape
    rep = n_head // k.shape[1]
    kk, vv = np.repeat(k, rep, axis=1).astype(np.float64), np.repeat(v, rep, axis=1).astype(np.float64)
    s = np.einsum("mhd,thd->hmt", q.astype(np.float64), kk) / math.sqrt(d)
    s[:, np.arange(m)[:, None] < np.arange(k.shape[0])[None, :] - pos0] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hmt,thd->mhd", p, vv).reshape(m, -1)


@pytest.mark.parametrize("kv_type,tol", [("f32", 1e-5), ("f16", 3e-3), ("q8_0", 3e-2), ("q4_0", 0.3)])
def test_kv_cache_and_attention(kv_type, tol):
    """Prefill 4 tokens, then decode 1 and a chunk of 3 at pos0 > 0: causal GQA over the device cache."""
    rng = np.random.default_rng(4)
    n_head, n_kv, d, n_ctx = 6, 2, 32, 12
    be = TorchBackend("cpu")
    kv = be.kv_layer(KVSpec(2, n_ctx, n_kv, d, d, kv_type, kv_type))
    ks = rng.standard_normal((8, n_kv, d)).astype(np.float32)
    vs = rng.standard_normal((8, n_kv, d)).astype(np.float32)
    qs = rng.standard_normal((8, n_head, d)).astype(np.float32)
    for pos0, n in ((0, 4), (4, 1), (5, 3)):
        sl = slice(pos0, pos0 + n)
        pos, slots = np.arange(pos0, pos0 + n), np.ones(n, dtype=np.int64)  # slot 1
        kv.store(torch.from_numpy(ks[sl]), torch.from_numpy(vs[sl]), slots, pos)
        got = kv.attend(torch.from_numpy(qs[sl]), slots, pos).numpy()
        want = attention_reference(qs[sl], ks[:pos0 + n], vs[:pos0 + n], pos0)
        assert got.shape == (n, n_head * d) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert not kv.k[0][1, :, 8:].any() and not kv.k[0][0].any()  # nothing past the last position, slot 0 untouched


def test_swiglu_and_residual():
    rng = np.random.default_rng(6)
    g = rng.standard_normal((3, 40)).astype(np.float32)
    u = rng.standard_normal((3, 40)).astype(np.float32)
    be = TorchBackend("cpu")
    got = be.swiglu(torch.from_numpy(g.copy()), torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(got, g / (1 + np.exp(-g.astype(np.float64))) * u, rtol=1e-5, atol=1e-6)
    x = torch.from_numpy(g.copy())
    be.add_(x, torch.from_numpy(u))
    np.testing.assert_array_equal(x.numpy(), g + u)


# ------------------------------------------------------------------------------------------ CUDA only


@pytest.mark.skipif(not cuda_available(), reason="no CUDA device")
@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_cuda_linear_matches_cpu(qtype):
    """On a real GPU: fp16 dequant-matmul within fp16 error of the f64 reference; f32 dequant bit-exact."""
    rng = np.random.default_rng(11)
    raw = tq.random_packed(qtype, 300, 1024, rng)
    x = rng.standard_normal((2, 1024)).astype(np.float32)
    want = x.astype(np.float64) @ ref_dequant(qtype, raw, 1024).astype(np.float64).T
    be = TorchBackend("cuda")
    w = be.matrix(tensor_ref(qtype, raw, 1024))
    got = be.to_host(be.linear(w, be.from_host(x)))
    assert np.abs(got - want).max() / np.abs(want).max() < 5e-3
    exact = tq.dequantize(w).cpu().numpy()
    np.testing.assert_array_equal(bits(exact), bits(ref_dequant(qtype, raw, 1024)))
