"""K-quant codecs and ggml's scale search.

gguf-py has dequantizers but no quantizers for the K types, so:
- layout: our dequantize == gguf.quants.dequantize on every tensor of a real Q4_K_M file, and on the
  bytes our quantizer writes;
- algorithm: ggml's search beats plain rounding (RMSE) on real weights, and the importance path
  beats the plain path under the importance-weighted error;
- bit-exactness with ggml itself: when QF_GGML_SRC names a llama.cpp `ggml` folder (e.g. from the
  llama-cpp-python sdist: vendor/llama.cpp/ggml), ggml-quants.c is compiled and our bytes are
  compared with quantize_q*_K / quantize_q4_0.. (with and without importance). Skipped otherwise.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants

from qf.format.errors import QFError
from qf.format.ggml_types import QK_K, GGMLType
from qf.quant import kquant_search as ks
from qf.quant.codecs import get_codec

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte-for-byte equality (NaN payloads and signed zeros count)."""
    a8, b8 = np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)
    return a8.shape == b8.shape and bool(np.array_equal(a8, b8))


def synthetic(rng: np.random.Generator, rows: int = 16, cols: int = 1024) -> dict[str, np.ndarray]:
    """Named f32 [rows, cols] inputs, from ordinary to degenerate."""
    base = rng.standard_normal((rows, cols))
    data = {
        "normal": base * rng.uniform(0.01, 3, (rows, 1)),
        "student_t2": rng.standard_t(2, (rows, cols)),
        "positive": rng.lognormal(0, 1.5, (rows, cols)),
        "negative_shift": rng.laplace(-3, 0.5, (rows, cols)),
        "small_ints": rng.integers(-4, 5, (rows, cols)).astype(np.float64),
        "sparse": base * (rng.random((rows, cols)) < 0.03),
        "outliers": base * 1e-3 + (rng.random((rows, cols)) < 0.002) * 50,
        "zeros": np.zeros((rows, cols)),
        "constant": np.full((rows, cols), -0.37),
        "subnormal": base * 1e-40,
        "tiny": base * 1e-20,
        "huge": base * 1e25,
    }
    return {k: v.astype(np.float32) for k, v in data.items()}


# ------------------------------------------------------------------ helpers vs numpy references

def test_nearest_int_is_round_half_even() -> None:
    rng = np.random.default_rng(0)
    f = np.concatenate([rng.uniform(-4e6, 4e6, 20000), np.arange(-50, 50) + 0.5,
                        rng.uniform(-3, 3, 20000)]).astype(np.float32)
    got = np.array([ks.nearest_int(v) for v in f])
    assert np.array_equal(got, np.rint(f).astype(np.int64))


def test_nearest_int_outside_its_range_keeps_ggml_bits() -> None:
    """ggml returns mantissa bits of f + 1.5*2^23 even when |f| >= 2^22 (its assert is compiled out)."""
    f = np.array([1e7, -2e7, 3e9, -5e12, 6.5e6], np.float32)
    bits = (f + np.float32(12582912.0)).view(np.uint32).astype(np.int64)
    assert [ks.nearest_int(v) for v in f] == ((bits & 0x7FFFFF) - 0x400000).tolist()


def test_f16_round_matches_numpy_cast() -> None:
    rng = np.random.default_rng(1)
    u = rng.integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32)
    u = u[(u & 0x7F800000) != 0x7F800000]  # finite
    edges = np.array([65504, 65519.99, 65520, 65536, 6.1035156e-05, 6.1e-05, 5.96e-08, 2.98e-08, 2.99e-08,
                      1.00048828125, 1.0009765625 + 0.00048828125, -0.0, 0.0], np.float32)
    f = np.concatenate([u.view(np.float32), edges, -edges])
    got = np.array([ks.f16_round(v) for v in f], np.float32)
    with np.errstate(over="ignore"):
        assert same_bits(got, f.astype(np.float16).astype(np.float32))


# ------------------------------------------------------------------ layout: round trip through gguf

@pytest.mark.parametrize("name", K_TYPES)
def test_our_bytes_dequantize_like_gguf(name: str) -> None:
    codec = get_codec(GGMLType[name])
    rng = np.random.default_rng(2)
    w = rng.gamma(1, 1, 1024).astype(np.float32)
    for label, x in synthetic(rng).items():
        for imp in (None, w):
            with np.errstate(all="ignore"):
                q = codec.quantize(x, imp)
                ours, ref = codec.dequantize(q), quants.dequantize(q, GT[name])
            assert q.shape == (x.shape[0], x.shape[1] // QK_K * codec.type_size)
            assert same_bits(ours, ref), f"{name} {label} importance={imp is not None}"


@pytest.mark.parametrize("name", K_TYPES)
def test_dequantize_random_bytes_like_gguf(name: str) -> None:
    """Any byte pattern (scales, NaN/inf f16 scales included) decodes like gguf."""
    codec = get_codec(GGMLType[name])
    b = np.random.default_rng(3).integers(0, 256, (300, codec.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        assert same_bits(codec.dequantize(b), quants.dequantize(b, GT[name]))


@pytest.mark.parametrize("name", K_TYPES)
def test_zero_superblock_is_all_zero_bytes(name: str) -> None:
    codec = get_codec(GGMLType[name])
    q = codec.quantize(np.zeros((2, QK_K), np.float32))
    assert not q.any()
    assert not codec.dequantize(q).any()


@pytest.mark.parametrize("name", K_TYPES)
def test_codes_and_scales_in_range(name: str) -> None:
    x = np.random.default_rng(4).standard_t(3, (64, QK_K)).astype(np.float32)
    r = ks.search_k(x, BITS[name])
    top = {"Q2_K": 3, "Q3_K": 7, "Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[name]
    assert r.L.max() <= top
    assert same_bits(r.d, r.d.astype(np.float16).astype(np.float32))  # already f16 values
    assert np.all(np.isfinite(r.d)) and np.all(np.isfinite(r.dmin))


@pytest.mark.parametrize("name", K_TYPES + ["Q8_K"])
def test_nonfinite_input_and_bad_importance_are_rejected(name: str) -> None:
    codec = get_codec(GGMLType[name])
    x = np.ones((2, 2 * QK_K), np.float32)
    x[1, 300] = np.nan
    with pytest.raises(QFError, match=f"{name}.*super-block 3"):
        codec.quantize(x)
    if name != "Q8_K":
        for bad in (-1.0, np.inf):
            imp = np.ones(2 * QK_K, np.float32)
            imp[7] = bad
            with pytest.raises(QFError, match="importance"):
                codec.quantize(np.ones((2, 2 * QK_K), np.float32), imp)


def test_q8_k_round_trip_and_bsums() -> None:
    codec = get_codec(GGMLType.Q8_K)
    x = np.random.default_rng(5).standard_normal((8, QK_K)).astype(np.float32)
    b = codec.quantize(x)
    q = b[:, 4:260].view(np.int8).astype(np.int64)
    assert np.array_equal(b[:, 260:].copy().view(np.int16), q.reshape(8, 16, 16).sum(-1))
    y = codec.dequantize(b)
    d = b[:, :4].copy().view(np.float32)
    assert np.all(np.abs(x - y) <= 0.5 * np.abs(d) * 1.001)
    assert not codec.dequantize(codec.quantize(np.zeros((1, QK_K), np.float32))).any()


# ------------------------------------------------------------------ real files

@pytest.fixture(scope="module")
def gemma():
    from qf.format.reader import open_gguf
    from qf.tools.fetch import fetch_model
    with open_gguf(fetch_model("gemma3-270m-q4_k_m")) as f:
        yield f


@pytest.fixture(scope="module")
def smollm2_embd() -> np.ndarray:
    """SmolLM2's Q8_0 token embedding (near-lossless source), 1024 rows, regrouped into rows of 2304."""
    from qf.format.reader import open_gguf
    from qf.tools.fetch import fetch_model
    with open_gguf(fetch_model()) as f:
        w = get_codec(GGMLType.Q8_0).dequantize(np.array(f.raw("token_embd.weight")[:1024]))
    return w.reshape(-1, 2304)  # [256, 2304]


@pytest.mark.slow
def test_every_gemma_tensor_dequantizes_like_gguf(gemma) -> None:
    """All tensors of Gemma 3 270M Q4_K_M (F32, Q5_0, Q8_0, Q4_K, Q6_K), bit for bit, in row chunks."""
    seen = set()
    for ti in gemma.tensors.values():
        raw = gemma.raw(ti.name)  # [n_rows, row_bytes] u8
        codec = get_codec(ti.type)
        for r0 in range(0, raw.shape[0], 16384):
            chunk = raw[r0:r0 + 16384]
            assert same_bits(codec.dequantize(chunk), quants.dequantize(chunk, GT(int(ti.type)))), ti.name
        seen.add(ti.type.name)
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= seen


@pytest.mark.slow
@pytest.mark.parametrize("name", K_TYPES)
def test_search_beats_plain_rounding(smollm2_embd: np.ndarray, name: str) -> None:
    """ggml's search has lower RMSE than sub-block min/max rounding on real weights."""
    codec = get_codec(GGMLType[name])
    w = smollm2_embd[:64]
    plain = codec.dequantize(get_codec(GGMLType[name], "rtn").quantize(w)).reshape(w.shape)
    found = codec.dequantize(codec.quantize(w))
    rmse_plain = np.sqrt(np.mean((w - plain) ** 2))
    rmse_found = np.sqrt(np.mean((w - found) ** 2))
    assert rmse_found < rmse_plain * 0.99, (rmse_found, rmse_plain)


@pytest.mark.slow
@pytest.mark.parametrize("name", K_TYPES + ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_importance_lowers_weighted_error(smollm2_embd: np.ndarray, name: str) -> None:
    """With a skewed importance vector the quant_weights path wins under the importance-weighted error."""
    codec = get_codec(GGMLType[name])
    w = smollm2_embd[:64]
    imp = np.random.default_rng(6).lognormal(0, 1.5, w.shape[1]).astype(np.float32)

    def weighted_rmse(q: np.ndarray) -> float:
        return float(np.sqrt(np.mean(imp * (w - codec.dequantize(q).reshape(w.shape)) ** 2)))

    assert weighted_rmse(codec.quantize(w, imp)) < 0.95 * weighted_rmse(codec.quantize(w))


# ------------------------------------------------------------------ bit-exactness against ggml itself

_STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
static size_t ts(int t) { switch (t) { case 2: return 18; case 3: return 20; case 6: return 22; case 7: return 24;
  case 8: return 34; case 10: return 84; case 11: return 110; case 12: return 144; case 13: return 176;
  case 14: return 210;
  default: return 0; } }
size_t ggml_type_size(int t) { return ts(t); }
size_t ggml_row_size(int t, int64_t ne) { return ts(t) * ne / (t >= 10 ? 256 : 32); }
const char * ggml_type_name(int t) { (void)t; return "?"; }
"""


@pytest.fixture(scope="module")
def ggml_lib(tmp_path_factory):
    """ggml-quants.c from $QF_GGML_SRC built as in ggml-base (-O3 -DNDEBUG, no -march), or skip."""
    src = os.environ.get("QF_GGML_SRC")
    if not src or not os.path.isfile(os.path.join(src, "src", "ggml-quants.c")) or not shutil.which("gcc"):
        pytest.skip("set QF_GGML_SRC to a llama.cpp ggml/ folder (and have gcc) to compare with ggml itself")
    d = tmp_path_factory.mktemp("ggml")
    (d / "stubs.c").write_text(_STUBS)
    so = d / "libggmlq.so"
    subprocess.run(["gcc", "-O3", "-DNDEBUG", "-fPIC", "-shared", f"-I{src}/src", f"-I{src}/include",
                    f"{src}/src/ggml-quants.c", str(d / "stubs.c"), "-o", str(so), "-lm"], check=True)
    return ctypes.CDLL(str(so))


def ggml_quantize(lib, name: str, x: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    """ggml's quantize_<type>(src, dst, nrow, n_per_row, quant_weights) on x: f32 [rows, ne0]."""
    codec = get_codec(GGMLType[name])
    fn = getattr(lib, "quantize_" + name.lower().replace("_k", "_K"))
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // codec.block_size * codec.type_size), np.uint8)
    imp = None if imp is None else np.ascontiguousarray(imp, np.float32)
    fn(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], None if imp is None else imp.ctypes.data)
    return out


def zero_sign_cleared(q: np.ndarray, name: str) -> np.ndarray:
    """Legacy blocks with -0.0 scale fields (d, m) turned into +0.0: the one place gguf-py and ggml differ."""
    codec = get_codec(GGMLType[name])
    b = np.array(q, copy=True).reshape(-1, codec.type_size)
    for at in (0, 2) if name in ("Q4_1", "Q5_1") else (0,):
        f = b[:, at:at + 2].copy().view(np.uint16)[:, 0]
        b[f == 0x8000, at + 1] = 0
    return b


@pytest.mark.parametrize("name", K_TYPES + LEGACY + ["IQ4_NL", "IQ4_XS"])
def test_bit_exact_with_ggml(ggml_lib, name: str) -> None:
    """Our bytes == ggml's. Legacy round-to-nearest follows gguf-py, which differs from ggml only in the
    sign of zero scales (all-zero blocks led by -0.0; min of mixed signed zeros): compared with it cleared."""
    codec = get_codec(GGMLType[name])
    rng = np.random.default_rng(8)
    for label, x in synthetic(rng).items():
        for imp in (None, rng.gamma(1, 1, x.shape[1]).astype(np.float32)):
            with np.errstate(all="ignore"):
                ours = codec.quantize(x, imp)
            ref = ggml_quantize(ggml_lib, name, x, imp)
            if imp is None and name in LEGACY:
                ours, ref = zero_sign_cleared(ours, name), zero_sign_cleared(ref, name)
            assert same_bits(ours, ref), f"{name} {label} importance={imp is not None}"
