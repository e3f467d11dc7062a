"""The torch backend's packed payloads (qf.runtime.kernels.torch_payload) on CPU tensors: act-order integer
groups (GPTQ's shuffled g_idx, and a g_idx with unequal groups) and FP8 scale blocks decode bit for bit as the
format's reference dequantizer, in any row tile, and TorchBackend.linear agrees with it."""

from __future__ import annotations

import numpy as np
import pytest

from qf.quant.formats import format_of
from qf.runtime.weights import PayloadRef

torch = pytest.importorskip("torch")

from test_payload_kernels import _ref  # noqa: E402  (a PayloadRef over in-memory members)


def _check(ref: PayloadRef, rng: np.random.Generator) -> None:
    """Rows (whole and in tiles that cut scale blocks) equal the reference; linear within f32 summation error."""
    from qf.runtime.backend_torch import TorchBackend
    from qf.runtime.kernels.torch_payload import pack

    w = ref.dequantize()
    tp = pack(ref, torch.device("cpu"))
    for sel in (slice(0, ref.n_out), slice(3, ref.n_out - 2), slice(ref.n_out - 1, ref.n_out)):
        got = tp.rows(sel, torch.float32).numpy()
        assert np.array_equal(got, w[sel], equal_nan=True), sel
    tb = TorchBackend("cpu")
    x = rng.standard_normal((3, ref.n_in)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    tol = 1e-5 * np.abs(x).sum(1, keepdims=True) * np.abs(w).max()
    y = tb.to_host(tb.linear(tb.matrix(ref), torch.from_numpy(x)))
    assert np.all(np.abs(y - want) <= tol)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_int_act_order(bits, sym):
    """GPTQ desc_act: every group holds `group` inputs in a shuffled order (g_idx not monotonic)."""
    rng = np.random.default_rng(bits + 10 * sym)
    n_out, n_in, group = 19, 256, 64
    a = {"weight_packed": rng.integers(-2**31, 2**31, (n_out, n_in * bits // 32)).astype(np.int32),
         "weight_scale": (rng.random((n_out, n_in // group)) * 0.01).astype(np.float16),
         "weight_g_idx": (rng.permutation(n_in) // group).astype(np.int32)}
    assert np.any(np.diff(a["weight_g_idx"]) < 0)
    if not sym:
        a["weight_zero"] = rng.integers(0, 1 << bits, (n_out, n_in // group)).astype(np.int16)
    _check(_ref(f"int;bits={bits};group={group};sym={int(sym)};g_idx=1", a, n_in, n_out), rng)


def test_int_group_index_unequal_groups():
    """A g_idx whose groups differ in size (group 2 has 128 inputs, group 3 none)."""
    rng = np.random.default_rng(3)
    n_out, n_in, group = 12, 256, 64
    g = rng.permutation(n_in) // group
    g[g == 3] = 2
    a = {"weight_packed": rng.integers(-2**31, 2**31, (n_out, n_in // 8)).astype(np.int32),
         "weight_scale": (rng.random((n_out, n_in // group)) * 0.01).astype(np.float16),
         "weight_zero": rng.integers(0, 16, (n_out, n_in // group)).astype(np.int16),
         "weight_g_idx": g.astype(np.int32)}
    _check(_ref(f"int;bits=4;group={group};sym=0;g_idx=1", a, n_in, n_out), rng)


@pytest.mark.parametrize("scale", ["channel", "tensor", "block;block=128x128", "block;block=16x40"])
def test_fp8(scale):
    """FP8 e4m3: all 254 finite patterns, scale blocks cut by the row tiles."""
    rng = np.random.default_rng(len(scale))
    n_out, n_in = 67, 200
    v = rng.integers(0, 256, (n_out, n_in)).astype(np.uint8)
    v[(v & 0x7F) == 0x7F] = 0
    p = format_of("fp8;scale=" + scale)[1]
    bh, bw = p.block(n_in, n_out)
    s_shape = {"channel": (n_out, 1), "tensor": (1,)}.get(scale, (-(-n_out // bh), -(-n_in // bw)))
    a = {"weight_fp8": v.view(np.int8), "weight_scale": (rng.random(s_shape) * 0.01 + 1e-3).astype(np.float32)}
    _check(_ref("fp8;scale=" + scale, a, n_in, n_out), rng)
