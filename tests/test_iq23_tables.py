"""IQ2 / IQ3 grids and search tables against references that are not ours.

- every grid (iq2xxs, iq2xs, iq2s, iq3xxs, iq3s) and ksigns equal gguf-py's (gguf.quants), which carries
  ggml-common.h's tables in its own encoding;
- the neighbour tables equal ggml's own (iq2xs_init_impl / iq3xs_init_impl compiled from $QF_GGML_SRC), and,
  without ggml, a brute-force sort of (distance, index) on sampled lattice points.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import subprocess

import numpy as np
import pytest
from gguf import quants

from qf.quant import iq_grids
from qf.quant.iq_neighbours import KMAP_SIZE, NWANT, search_tables

GRIDS = {"iq2xxs": (quants.IQ2_XXS, (256, 8)), "iq2xs": (quants.IQ2_XS, (512, 8)), "iq2s": (quants.IQ2_S, (1024, 8)),
         "iq3xxs": (quants.IQ3_XXS, (256, 4)), "iq3s": (quants.IQ3_S, (512, 4))}


@pytest.mark.parametrize("name", GRIDS)
def test_grid_equals_gguf(name: str) -> None:
    cls, shape = GRIDS[name]
    cls.init_grid()
    ours = getattr(iq_grids, f"{name}_grid")()
    assert ours.shape == shape and ours.dtype == np.uint8 and not ours.flags.writeable
    assert np.array_equal(ours.astype(np.float32), np.asarray(cls.grid).reshape(shape))
    assert len(np.unique(ours.view(np.uint64 if shape[1] == 8 else np.uint32))) == shape[0]


def test_signs_equal_gguf() -> None:
    assert np.array_equal(iq_grids.ksigns_iq2xs(), np.frombuffer(quants.IQ2_XXS.ksigns, np.uint8))
    assert np.array_equal(iq_grids.kmask_iq2xs(), [1, 2, 4, 8, 16, 32, 64, 128])


def test_importing_builds_nothing() -> None:
    code = ("import qf.quant.iq_grids, qf.quant.iq_neighbours as n; "
            "assert n.search_tables.cache_info().currsize == 0; "
            "assert qf.quant.iq_grids.kgrid.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True)


def _brute_force(points: np.ndarray, u: int, bits: int, nwant: int) -> list[int]:
    """ggml's neighbour list of lattice point u: sort (d2, j), keep the first nwant distinct distances."""
    pos = 2 * ((u >> (bits * np.arange(points.shape[1]))) & ((1 << bits) - 1)) + 1
    d2 = ((points.astype(np.int64) - pos) ** 2).sum(axis=1)
    order = np.lexsort((np.arange(len(d2)), d2))
    keep = np.unique(d2)[:nwant]
    return [int(j) for j in order if d2[j] <= keep[-1]]


@pytest.mark.parametrize("name", GRIDS)
def test_neighbours_brute_force(name: str) -> None:
    t = search_tables(name)
    codes = iq_grids.kgrid(name).astype(np.int64)
    assert np.array_equal(t.kmap[codes], np.arange(len(codes)))
    assert np.array_equal(t.points, iq_grids.quant_points(name))
    off = np.flatnonzero(t.kmap < 0)
    assert len(off) == KMAP_SIZE[name] - len(codes)
    rng = np.random.default_rng(0)
    for u in rng.choice(off, 300, replace=False):
        at = -int(t.kmap[u]) - 1
        n = int(t.neighbours[at])
        got = t.neighbours[at + 1:at + 1 + n].tolist()
        assert got == _brute_force(t.points, int(u), iq_grids.BITS[name], NWANT[name])


_WRAP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include "ggml-quants.c"
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
size_t ggml_type_size(enum ggml_type t) { (void)t; return 0; }
size_t ggml_row_size(enum ggml_type t, int64_t ne) { (void)t; (void)ne; return 0; }
const char * ggml_type_name(enum ggml_type t) { (void)t; return "?"; }
int qf_tables(int which, int32_t * kmap, uint16_t * nb, int nb_cap) {
    const int * m; const uint16_t * n; int ks;
    if (which < 10) { m = iq2_data[which].map; n = iq2_data[which].neighbours; ks = 43692; }
    else { m = iq3_data[which - 10].map; n = iq3_data[which - 10].neighbours; ks = 4096; }
    int total = 0;
    for (int i = 0; i < ks; ++i) {
        kmap[i] = m[i];
        if (m[i] < 0) { int off = -m[i] - 1; int e = off + 1 + n[off]; if (e > total) total = e; }
    }
    if (total > nb_cap) return -total;
    for (int i = 0; i < total; ++i) nb[i] = n[i];
    return total;
}
"""


@pytest.fixture(scope="module")
def ggml_tables_lib(tmp_path_factory):
    """ggml-quants.c from $QF_GGML_SRC with an accessor for its static tables, or skip."""
    src = os.environ.get("QF_GGML_SRC")
    if not src or not os.path.isfile(os.path.join(src, "src", "ggml-quants.c")) or not shutil.which("gcc"):
        pytest.skip("set QF_GGML_SRC to a llama.cpp ggml/ folder (and have gcc) to compare with ggml itself")
    d = tmp_path_factory.mktemp("ggml-iq")
    (d / "wrap.c").write_text(_WRAP)
    so = d / "libiqtables.so"
    subprocess.run(["gcc", "-O2", "-DNDEBUG", "-fPIC", "-shared", f"-I{src}/src", f"-I{src}/include",
                    str(d / "wrap.c"), "-o", str(so), "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    lib.iq2xs_init_impl.argtypes = [ctypes.c_int]
    lib.iq3xs_init_impl.argtypes = [ctypes.c_int]
    lib.qf_tables.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


# grid -> (init function, its argument (ggml type id or grid size), iq2_data / iq3_data slot (+10))
_GGML_INIT = {"iq2xxs": ("iq2xs_init_impl", 16, 0), "iq2xs": ("iq2xs_init_impl", 17, 1),
              "iq2s": ("iq2xs_init_impl", 22, 3), "iq3xxs": ("iq3xs_init_impl", 256, 10),
              "iq3s": ("iq3xs_init_impl", 512, 11)}


@pytest.mark.parametrize("name", GRIDS)
def test_neighbours_equal_ggml(ggml_tables_lib, name: str) -> None:
    fn, arg, slot = _GGML_INIT[name]
    getattr(ggml_tables_lib, fn)(arg)
    kmap = np.empty(KMAP_SIZE[name], np.int32)
    nb = np.empty(1 << 21, np.uint16)
    n = ggml_tables_lib.qf_tables(slot, kmap.ctypes.data, nb.ctypes.data, nb.size)
    assert n > 0
    t = search_tables(name)
    assert np.array_equal(t.kmap, kmap)
    assert np.array_equal(t.neighbours, nb[:n])
