"""IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S: layouts against gguf.quants, ggml's search against ggml-quants.c.

- dequantize == gguf.quants.dequantize bit for bit on random bytes (every grid index, sign, scale and f16
  pattern) and on the bytes our quantizer writes;
- quantization error orders the types as their bits do (IQ3_S < IQ3_XXS < IQ2_S < IQ2_XS < IQ2_XXS) on
  Gaussian rows, importance lowers the importance-weighted error, IQ2_XXS / IQ2_XS refuse to run without it;
- bytes equal ggml-quants.c's own quantize_iq* (compiled from $QF_GGML_SRC) on several distributions, with
  and without importance, including all-zero sub-blocks and importance with zero columns.
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
from qf.format.ggml_types import GGMLType
from qf.quant.codecs import get_codec

NAMES = ["IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS"]  # best to worst
NEEDS_IMPORTANCE = {"IQ2_XXS", "IQ2_XS"}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte-for-byte equality (NaN payloads and signed zeros count)."""
    return a.shape == b.shape and bool(np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                                      np.ascontiguousarray(b).view(np.uint8)))


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_random_bytes_like_gguf(name: str) -> None:
    codec = get_codec(GGMLType[name])
    b = np.random.default_rng(3).integers(0, 256, (400, codec.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        assert same_bits(codec.dequantize(b), quants.dequantize(b, GT[name]))


def _rows(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return (rng.standard_normal(shape) * rng.uniform(0.01, 2, (shape[0], 1))).astype(np.float32)


@pytest.mark.parametrize("name", NAMES)
def test_our_bytes_dequantize_like_gguf(name: str) -> None:
    codec = get_codec(GGMLType[name])
    rng = np.random.default_rng(4)
    x = _rows(rng, (16, 512))
    q = codec.quantize(x, rng.gamma(1, 1, 512).astype(np.float32))
    assert q.shape == (16, 2 * codec.type_size)
    assert same_bits(codec.dequantize(q), quants.dequantize(q, GT[name]))


def test_error_orders_by_bits() -> None:
    """RMS error relative to the signal on Gaussian rows, importance uniform: strictly increasing along NAMES."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    imp = np.ones(1024, np.float32)
    errs = []
    for name in NAMES:
        codec = get_codec(GGMLType[name])
        y = codec.dequantize(codec.quantize(x, imp))
        errs.append(float(np.sqrt(np.mean((x - y) ** 2))))
    assert all(a < b for a, b in zip(errs, errs[1:])), dict(zip(NAMES, errs))
    assert 0.1 < errs[0] and errs[-1] < 0.6, dict(zip(NAMES, errs))


@pytest.mark.parametrize("name", NAMES)
def test_importance_lowers_weighted_error(name: str) -> None:
    codec = get_codec(GGMLType[name])
    rng = np.random.default_rng(6)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    imp = (rng.gamma(0.3, 1, 512) ** 2).astype(np.float32)

    def werr(q: np.ndarray) -> float:
        return float(np.sum(imp * (x - codec.dequantize(q)) ** 2))

    assert werr(codec.quantize(x, imp)) < 0.9 * werr(codec.quantize(x, np.ones(512, np.float32)))


@pytest.mark.parametrize("name", NAMES)
def test_importance_requirement(name: str) -> None:
    codec = get_codec(GGMLType[name])
    x = _rows(np.random.default_rng(7), (2, 256))
    assert codec.strategy.uses_importance
    assert codec.strategy.requires_importance == (name in NEEDS_IMPORTANCE)
    if name in NEEDS_IMPORTANCE:
        with pytest.raises(QFError, match="requires an importance matrix"):
            codec.quantize(x)
    else:
        y = codec.dequantize(codec.quantize(x))
        assert np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2)) < 0.6


@pytest.mark.parametrize("name", NAMES)
def test_zero_blocks_and_nonfinite(name: str) -> None:
    codec = get_codec(GGMLType[name])
    imp = np.ones(256, np.float32)
    q = codec.quantize(np.zeros((2, 256), np.float32), imp)
    assert not q.any()
    x = _rows(np.random.default_rng(8), (2, 512))
    x[1, 300] = np.nan
    with pytest.raises(QFError, match="super-block 3"):
        codec.quantize(x, np.ones(512, np.float32))
    with pytest.raises(QFError, match="importance"):
        codec.quantize(x[:1], -np.ones(512, np.float32))


# ------------------------------------------------------------------------------------------ ggml itself

_STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include "ggml-quants.c"
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
size_t ggml_type_size(enum ggml_type t) { (void)t; return 0; }
size_t ggml_row_size(enum ggml_type t, int64_t ne) { (void)t; (void)ne; return 0; }
const char * ggml_type_name(enum ggml_type t) { (void)t; return "?"; }
"""


@pytest.fixture(scope="module")
def ggml_lib(tmp_path_factory):
    """ggml-quants.c from $QF_GGML_SRC built as in ggml-base (-O3 -DNDEBUG, no -march), tables initialised."""
    src = os.environ.get("QF_GGML_SRC")
    if not src or not os.path.isfile(os.path.join(src, "src", "ggml-quants.c")) or not shutil.which("gcc"):
        pytest.skip("set QF_GGML_SRC to a llama.cpp ggml/ folder (and have gcc) to compare with ggml itself")
    d = tmp_path_factory.mktemp("ggml-iq23")
    (d / "wrap.c").write_text(_STUBS)
    so = d / "libiq23.so"
    subprocess.run(["gcc", "-O3", "-DNDEBUG", "-fPIC", "-shared", f"-I{src}/src", f"-I{src}/include",
                    str(d / "wrap.c"), "-o", str(so), "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    lib.iq2xs_init_impl.argtypes = [ctypes.c_int]
    lib.iq3xs_init_impl.argtypes = [ctypes.c_int]
    for t in (GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S):
        lib.iq2xs_init_impl(int(t))
    for size in (256, 512):
        lib.iq3xs_init_impl(size)
    return lib


def ggml_quantize(lib, name: str, x: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    """ggml's quantize_<type>(src, dst, nrow, n_per_row, quant_weights) on x: f32 [rows, ne0]."""
    codec = get_codec(GGMLType[name])
    fn = getattr(lib, "quantize_" + name.lower())
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // 256 * codec.type_size), np.uint8)
    imp = None if imp is None else np.ascontiguousarray(imp, np.float32)
    fn(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], None if imp is None else imp.ctypes.data)
    return out


def synthetic(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of 1024 that exercise ggml's branches: scales, heavy tails, zero and tiny sub-blocks, constants."""
    gauss = _rows(rng, (24, 1024))
    heavy = (rng.standard_t(3, (24, 1024)) * rng.uniform(0.01, 2, (24, 1))).astype(np.float32)
    holes = gauss.copy()
    holes[0, :256] = 0  # a whole super-block
    holes[1, 256:300] = 0  # whole 16/32-element sub-blocks inside a non-zero super-block (IQ3_S shifts bytes)
    holes[2, 512:560] = 1e-9  # sub-blocks below the IQ3_XXS / IQ2_S thresholds
    holes[3, :] = 0.5  # constant
    holes[4, ::2] = 0  # every other element
    sparse = np.where(rng.random((24, 1024)) < 0.1, gauss, 0).astype(np.float32)
    return {"gauss": gauss, "heavy": heavy, "holes": holes, "sparse": sparse}


@pytest.mark.parametrize("name", NAMES)
def test_bit_exact_with_ggml(ggml_lib, name: str) -> None:
    codec = get_codec(GGMLType[name])
    rng = np.random.default_rng(9)
    imps = {"none": None, "gamma": rng.gamma(1, 1, 1024).astype(np.float32),
            "zeros": np.where(rng.random(1024) < 0.3, 0, rng.gamma(1, 1, 1024)).astype(np.float32)}
    for label, x in synthetic(rng).items():
        for ilabel, imp in imps.items():
            if imp is None and name in NEEDS_IMPORTANCE:
                continue
            ours = codec.quantize(x, imp)
            assert same_bits(ours, ggml_quantize(ggml_lib, name, x, imp)), f"{name} {label} importance={ilabel}"
