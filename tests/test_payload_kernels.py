"""CPU payload kernels (qf.runtime.kernels.cpu_payload) on random in-memory payloads: every vector layout (bit
widths, group sizes, word tails, zero points, FP8 scale blocks and byte tails) against the format's reference
dequantizer, rows decoded bit for bit, batched rows bit for bit as alone."""

from __future__ import annotations

import numpy as np
import pytest

from qf.quant.formats import PayloadDecl, format_of
from qf.quant.formats.fp8 import E4M3
from qf.runtime.kernels.cpu_payload import payload_matrix
from qf.runtime.weights import PayloadRef


def _ref(scheme: str, arrays: dict[str, np.ndarray], n_in: int, n_out: int) -> PayloadRef:
    """A PayloadRef over in-memory members."""
    fmt, p = format_of(scheme)
    decl = PayloadDecl("w.weight", fmt.scheme(p), fmt, p, {k: k for k in arrays}, n_in, n_out)
    return PayloadRef("w.weight", decl, arrays, n_out)


def _check(ref: PayloadRef, rng: np.random.Generator) -> None:
    """Fused (1, 3 and 6 tokens, exact rows or not) within f32 summation error, rows exact, rows as alone."""
    w = ref.dequantize()
    pm = payload_matrix(ref)
    assert np.array_equal(pm.rows(0, ref.n_out), w, equal_nan=True)
    x = rng.standard_normal((6, ref.n_in)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    tol = 1e-5 * np.abs(x).sum(1, keepdims=True) * np.abs(w).max()
    for m in (1, 3, 6):
        for exact in (False, True):
            assert np.all(np.abs(pm.linear(x[:m], exact) - want[:m]) <= tol[:m])
    batch = pm.linear(x, exact_rows=True)
    for m in range(6):
        assert np.array_equal(batch[m], pm.linear(x[m:m + 1])[0])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(37, 576), (5, 128), (20, 1536)])
def test_int_group(bits, group, sym, shape):
    """Integer codes: every scale-lane layout, full vectors and masked word tails."""
    n_out, n_in = shape
    if group > 0 and n_in % group:
        pytest.skip("not a whole number of groups")
    rng = np.random.default_rng(bits * 1000 + group + n_in)
    n_groups = 1 if group <= 0 else n_in // group
    a = {"weight_packed": rng.integers(-2**31, 2**31, (n_out, n_in * bits // 32)).astype(np.int32),
         "weight_scale": (rng.random((n_out, n_groups)) * 0.01 + 1e-3).astype(np.float16)}
    if not sym:
        a["weight_zero"] = rng.integers(0, 1 << bits, (n_out, n_groups)).astype(np.int16)
    ref = _ref(f"int;bits={bits};group={group};sym={int(sym)};g_idx=0", a, n_in, n_out)
    _check(ref, rng)
    assert payload_matrix(ref).kind is not None  # the vector kernel, not the per-input fallback


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(24, 256), (7, 576)])
def test_int_act_order(bits, sym, shape):
    """A GPTQ act-order group index (equal groups in a shuffled order): inputs sorted by group at load, the
    vector kernel on repacked codes; rows come back in the file's order, bit for bit."""
    rng = np.random.default_rng(bits + 10 * sym + shape[1])
    (n_out, n_in), group = shape, 64
    a = {"weight_packed": rng.integers(-2**31, 2**31, (n_out, n_in * bits // 32)).astype(np.int32),
         "weight_scale": (rng.random((n_out, n_in // group)) * 0.01).astype(np.float16),
         "weight_g_idx": (rng.permutation(n_in) // group).astype(np.int32)}
    if not sym:
        a["weight_zero"] = rng.integers(0, 1 << bits, (n_out, n_in // group)).astype(np.int16)
    ref = _ref(f"int;bits={bits};group={group};sym={int(sym)};g_idx=1", a, n_in, n_out)
    _check(ref, rng)
    pm = payload_matrix(ref)
    assert pm.perm is not None and pm.kind is not None


def test_int_group_index_unequal_groups():
    """A group index whose groups differ in size keeps the per-input kernel, same contract."""
    rng = np.random.default_rng(3)
    n_out, n_in, group = 12, 256, 64
    g = rng.permutation(n_in) // group
    g[g == 3] = 2  # group 2 has 128 inputs, group 3 none
    a = {"weight_packed": rng.integers(-2**31, 2**31, (n_out, n_in // 8)).astype(np.int32),
         "weight_scale": (rng.random((n_out, n_in // group)) * 0.01).astype(np.float16),
         "weight_zero": rng.integers(0, 16, (n_out, n_in // group)).astype(np.int16),
         "weight_g_idx": g.astype(np.int32)}
    ref = _ref(f"int;bits=4;group={group};sym=0;g_idx=1", a, n_in, n_out)
    _check(ref, rng)
    assert payload_matrix(ref).perm is None


@pytest.mark.parametrize("scale", ["channel", "tensor", "block;block=128x128", "block;block=16x40"])
@pytest.mark.parametrize("shape", [(67, 576), (33, 200), (130, 1536)])
@pytest.mark.parametrize("normal_rows", [False, True])
def test_fp8(scale, shape, normal_rows):
    """FP8 e4m3: all 254 finite bit patterns (subnormals, -0), scale blocks that straddle vectors, byte tails;
    rows with subnormal bytes (f16 decode) and, with normal_rows, every other row without (f32 bit decode)."""
    n_out, n_in = shape
    rng = np.random.default_rng(n_in + len(scale))
    v = rng.integers(0, 256, (n_out, n_in)).astype(np.uint8)
    v[(v & 0x7F) == 0x7F] = 0
    if normal_rows:
        even = v[::2]
        even[((even & 0x78) == 0) & ((even & 7) != 0)] |= 0x08  # subnormal -> normal
        v[::2] = even
    p = format_of("fp8;scale=" + scale)[1]
    bh, bw = p.block(n_in, n_out)
    s_shape = {"channel": (n_out, 1), "tensor": (1,)}.get(scale, (-(-n_out // bh), -(-n_in // bw)))
    a = {"weight_fp8": v.view(np.int8), "weight_scale": (rng.random(s_shape) * 0.01 + 1e-3).astype(np.float32)}
    ref = _ref("fp8;scale=" + scale, a, n_in, n_out)
    _check(ref, rng)
    pm = payload_matrix(ref)
    assert not pm.kind.nan  # no NaN pattern: the decode without compare and select
    assert np.array_equal(pm.sub, np.arange(n_out) % 2 == 1) if normal_rows else pm.sub.all()


def test_fp8_nan_patterns_stay_nan():
    """S.1111.111 bytes decode to NaN, as the reference table has them, in rows and in products."""
    v = np.zeros((2, 64), np.uint8)
    v[0, 5], v[1, 40] = 0x7F, 0xFF
    ref = _ref("fp8;scale=channel", {"weight_fp8": v.view(np.int8),
                                     "weight_scale": np.ones((2, 1), np.float32)}, 64, 2)
    pm = payload_matrix(ref)
    assert pm.kind.nan and np.isnan(E4M3[0x7F]) and np.array_equal(pm.rows(0, 2), ref.dequantize(), equal_nan=True)
    assert np.all(np.isnan(pm.linear(np.ones((1, 64), np.float32))))
