"""IQ2 / IQ3 quantization speed: our numba search against ggml-quants.c itself, interleaved, same input.

    QF_GGML_SRC=/path/to/llama.cpp/ggml python benchmarks/bench_iq23.py [--rows 256] [--cols 4096] [--repeat 3]
    QF_LLAMA_QUANTIZE=/path/to/llama-quantize python benchmarks/bench_iq23.py --model   # whole-file, SmolLM2 --pure

The codec table gives MB/s of f32 input for ggml's quantize_iq* (one thread, compiled -O3 as ggml-base is) and
ours with one numba thread and with all of them, each best of --repeat, the three timed in turn per repeat.
--model quantizes SmolLM2-135M F16 --pure with a random importance matrix through llama-quantize (all threads)
and through qf's requantize (all threads), in turn, and checks the bytes are equal.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from qf.format.ggml_types import GGMLType
from qf.quant.codecs import get_codec

NAMES = ["IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS"]
_WRAP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include "ggml-quants.c"
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
size_t ggml_type_size(enum ggml_type t) { (void)t; return 0; }
size_t ggml_row_size(enum ggml_type t, int64_t ne) { (void)t; (void)ne; return 0; }
const char * ggml_type_name(enum ggml_type t) { (void)t; return "?"; }
"""


def ggml_lib(src: str, work: Path) -> ctypes.CDLL:
    """ggml-quants.c built as ggml-base builds it, its IQ2 / IQ3 tables initialised."""
    (work / "wrap.c").write_text(_WRAP)
    so = work / "libiq23.so"
    subprocess.run(["gcc", "-O3", "-DNDEBUG", "-fPIC", "-shared", f"-I{src}/src", f"-I{src}/include",
                    str(work / "wrap.c"), "-o", str(so), "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    lib.iq2xs_init_impl.argtypes = [ctypes.c_int]
    lib.iq3xs_init_impl.argtypes = [ctypes.c_int]
    for t in (GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S):
        lib.iq2xs_init_impl(int(t))
    for size in (256, 512):
        lib.iq3xs_init_impl(size)
    return lib


def timed(fn) -> float:
    """Seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def codec_table(rows: int, cols: int, repeat: int) -> None:
    """MB/s per type: ggml (1 thread), ours (1 thread), ours (all threads); bytes checked equal."""
    src = os.environ.get("QF_GGML_SRC")
    if not src:
        sys.exit("set QF_GGML_SRC to a llama.cpp ggml/ folder")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2, (rows, 1))).astype(np.float32)
    imp = rng.gamma(1, 1, cols).astype(np.float32)
    mb = x.nbytes / 1e6
    n_threads = numba.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        lib = ggml_lib(src, Path(d))
        print(f"{rows} x {cols} f32 ({mb:.1f} MB), importance given; MB/s, best of {repeat}")
        print(f"{'type':8} {'ggml 1t':>9} {'ours 1t':>9} {f'ours {n_threads}t':>9} {'1t ratio':>9}")
        for name in NAMES:
            codec = get_codec(GGMLType[name])
            out = np.zeros((rows, cols // 256 * codec.type_size), np.uint8)
            fn = getattr(lib, "quantize_" + name.lower())
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

            def ggml() -> None:
                fn(x.ctypes.data, out.ctypes.data, rows, cols, imp.ctypes.data)

            def ours(threads: int) -> np.ndarray:
                numba.set_num_threads(threads)
                try:
                    return codec.quantize(x, imp)
                finally:
                    numba.set_num_threads(n_threads)

            ggml()
            assert np.array_equal(ours(1), out), f"{name}: bytes differ from ggml"
            best = [float("inf")] * 3
            for _ in range(repeat):
                for k, f in enumerate((ggml, lambda: ours(1), lambda: ours(n_threads))):
                    best[k] = min(best[k], timed(f))
            g, o1, on = (mb / s for s in best)
            print(f"{name:8} {g:9.2f} {o1:9.2f} {on:9.2f} {o1 / g:8.2f}x")


def model_table(repeat: int) -> None:
    """SmolLM2 F16 --pure with a random imatrix: llama-quantize vs requantize, seconds, bytes compared."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from imatrix_files import random_imatrix

    from qf.convert.pipeline import convert
    from qf.format.reader import open_gguf
    from qf.quant.imatrix import load_imatrix
    from qf.quant.mixes import Overrides
    from qf.quant.requantize import requantize
    from qf.convert.export import export_hf
    from qf.tools.fetch import fetch_model

    lq = os.environ.get("QF_LLAMA_QUANTIZE")
    if not lq:
        sys.exit("set QF_LLAMA_QUANTIZE to a llama-quantize binary")
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src = convert(export_hf(fetch_model(), d / "hf"), d / "smollm2-f16.qf", "F16").path
        imx = random_imatrix(d / "imx.gguf", src, fmt="gguf")
        print(f"SmolLM2-135M F16 --pure, random imatrix, {threads} threads; seconds, best of {repeat}")
        print(f"{'type':8} {'llama-quantize':>15} {'qf':>8} {'ratio':>7}")
        for name in NAMES:
            args = ["--pure", "--imatrix", str(imx)]
            ov = Overrides(pure=True)
            if name in ("IQ2_XXS", "IQ2_XS"):
                args += ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
                ov = Overrides(pure=True, output_type=GGMLType.Q8_0, token_embd_type=GGMLType.Q8_0)

            def theirs() -> None:
                subprocess.run([lq, *args, str(src), str(d / "lc.gguf"), name, str(threads)], check=True,
                               capture_output=True)

            def ours() -> None:
                (d / "ours.qf").unlink(missing_ok=True)
                requantize(src, d / "ours.qf", name, ov, imatrix=load_imatrix(str(imx)))

            ours()  # compiles (numba cache) and builds the tables once
            best = [float("inf")] * 2
            for _ in range(repeat):
                for k, f in enumerate((theirs, ours)):
                    best[k] = min(best[k], timed(f))
            with open_gguf(d / "lc.gguf") as a, open_gguf(d / "ours.qf") as b:
                same = all(np.array_equal(a.raw(n), b.raw(n)) for n in a.tensors)
            print(f"{name:8} {best[0]:15.2f} {best[1]:8.2f} {best[1] / best[0]:6.2f}x"
                  + ("" if same else "  BYTES DIFFER"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", action="store_true", help="whole SmolLM2 file against llama-quantize")
    a = ap.parse_args()
    if a.model:
        model_table(a.repeat)
    else:
        codec_table(a.rows, a.cols, a.repeat)


if __name__ == "__main__":
    main()
