"""CPU compute over packed ggml blocks: `QMatrix` plus matvec (decode), matmul (prefill) and get_rows.

Weights stay in the file's mmap: matvec and small-batch matmul decode blocks into registers as they go and
never write f32 weights to memory. A matmul of M >= BLAS_MIN_TOKENS tokens (prefill) instead decodes each
thread's rows a tile at a time into a small per-thread f32 scratch (`TILE_BYTES`, reused across calls) and
multiplies the tile with numpy's BLAS sgemm in that thread (cpu_blas.py): 1.5-2x the fused kernel there. Kernels are numba (parallel, explicit SIMD, cached on disk); the per-type decoders live
in cpu_float.py, cpu_legacy.py and cpu_kquants.py (protocol: cpu_decoder.py), the parallel drivers in
cpu_drivers.py. A type is supported when it has a decoder; dispatch goes through `_KINDS`, keyed by ggml
type id.

Results equal `get_codec(t).dequantize(w) @ x` up to f32 rounding (activations are not quantized): each
weight is decoded with one fused multiply-add and each row is summed in 16 f32 lanes, so the error of a
dot product stays below (n_in / 16 + 8) * 2 eps * sum|w_i x_i| (see tests/test_kernels_cpu.py). The BLAS
path decodes the same f32 weights; its sums are OpenBLAS's (FMA chains over k blocks, in the tests well
inside the same bound).

For quantized weights, prefill batches of M >= INT8_MIN_TOKENS tokens take the integer path instead
(cpu_int8.py, cpu_idecode.py, cpu_isimd.py): the activations are quantized once per matmul to 8-bit parts
per block of 32 (`quantize_q8`; two parts by default, about 15 bits) and multiplied with integer dot
products (`vpdpbusd` where the host has AVX-512 VNNI). Its results are exact functions of those integers
(tests/test_h4_int8.py); the activation rounding moves SmolLM2's logits by a KLD of ~7e-7. Exact rows
(matmul with blas=False, and matvec) never take it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numba
import numpy as np

from qf.format.errors import QFError
from qf.format.ggml_types import GGMLType, block_size, row_bytes
from qf.runtime.kernels import cpu_amx_bf16, cpu_blas, cpu_int8, cpu_iq_dot
from qf.runtime.kernels.cpu_call import entry_point
from qf.runtime.kernels.cpu_drivers import (_STAMP, DECODERS, Kind, matmul_items, matmul_kernel, matmul_tiles_kernel,
                                            matvec_kernel, rows_kernel, tile_rows)
from qf.runtime.kernels.cpu_idecode import IDECODERS
from qf.runtime.kernels.cpu_isimd import LO_BITS, NATIVE_ISAS, Isa, best_isa

# matmul: batches of at least this many tokens go through decoded tiles + BLAS (measured crossover on
# SmolLM2 shapes, 2 threads: the fused kernel wins below 32-48 tokens); None: always the fused kernel.
BLAS_MIN_TOKENS: int | None = 48 if cpu_blas.SGEMM is not None else None

# How the integer dot product is emitted on this host (AVX-512 VNNI, AVX-VNNI or portable IR).
ISA: Isa = best_isa()

# matmul: batches of at least this many tokens of a quantized type go through 8-bit activations and integer
# dot products (cpu_int8.py) when the host has a native integer dot; None: never by default. The measured
# crossover with the fused kernel is 4-8 tokens (two parts, SmolLM2 shapes; 16 tokens: 2.4x); below 16 the
# f32 sums are kept (short prompts, tiny test models compared with f32 references).
INT8_MIN_TOKENS: int | None = 16 if ISA.name in NATIVE_ISAS else None

# 8-bit parts per activation on the integer path: 2 (about 15 bits: whole-model KLD against the f32 paths
# ~5e-7 on SmolLM2) or 1 (ggml's Q8_0, as llama.cpp: twice the speed, KLD ~4e-3).
INT8_PARTS: int = 2

# matvec: types whose decode step runs on 8-bit activations (one Q8_0 part) and integer dot products, as
# llama.cpp's vec_dot does (cpu_iq_dot.py): the grid types, where the f32 path's gather + widening costs most
# (per matvec vs Q4_K: IQ3_S 0.56 -> 0.78, IQ2_XS 0.49 -> 0.71). Results differ from the f32 product at the
# 1e-3 level, as llama.cpp's. IQ4_NL / IQ4_XS keep the f32 path (as fast, exact). Empty without a native dot.
INT8_DECODE_TYPES: frozenset[GGMLType] = frozenset(
    (GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S, GGMLType.IQ1_S,
     GGMLType.IQ1_M) if ISA.name in NATIVE_ISAS else ())

# ggml type -> compile-time tag of its decoders (the dispatch registry).
_KINDS: dict[GGMLType, Kind] = {t: Kind(t) for t in DECODERS}


class KernelError(QFError, ValueError):
    """A kernel was given arguments it cannot compute on (type, shape, dtype or index out of range)."""


def supported_types() -> list[GGMLType]:
    """ggml types the CPU kernels compute on."""
    return sorted(_KINDS)


@dataclass(frozen=True, eq=False)
class QMatrix:
    """A weight [n_out, n_in] as packed rows: data is u8 [n_out, row_bytes], a view (never a copy)."""

    type: GGMLType
    data: np.ndarray
    n_in: int
    n_out: int
    kind: Kind = field(init=False, repr=False)

    def __post_init__(self) -> None:
        t = _check_type(self.type)
        d = self.data
        rb = _row_bytes(t, self.n_in)
        if not isinstance(d, np.ndarray) or d.dtype != np.uint8 or d.shape != (self.n_out, rb):
            got = (getattr(d, "dtype", type(d).__name__), getattr(d, "shape", None))
            raise KernelError(f"{t.name} weight [{self.n_out}, {self.n_in}] needs u8 data of shape "
                              f"({self.n_out}, {rb}); got {got[0]} {got[1]}")
        if not d.flags.c_contiguous:
            raise KernelError(f"{t.name} weight data must be C-contiguous rows (strides {d.strides})")
        if d.flags.writeable:  # one numba specialisation (read-only, like the mmap) for every caller
            d = d.view()
            d.flags.writeable = False
        object.__setattr__(self, "type", t)
        object.__setattr__(self, "data", d)
        object.__setattr__(self, "kind", _KINDS[t])

    @property
    def shape(self) -> tuple[int, int]:
        """(n_out, n_in), like the numpy weight it stands for."""
        return (self.n_out, self.n_in)


def _check_type(t: GGMLType | int) -> GGMLType:
    """t as a supported GGMLType, or KernelError naming the supported ones."""
    try:
        t = GGMLType(t)
    except ValueError:
        raise KernelError(f"unknown ggml type id {t!r}") from None
    if t not in _KINDS:
        names = ", ".join(x.name for x in supported_types())
        raise KernelError(f"no CPU kernel for {t.name}; supported: {names}")
    return t


def _row_bytes(t: GGMLType, n_in: int) -> int:
    """Bytes per row, or KernelError when n_in is not a positive whole number of blocks."""
    try:
        if int(n_in) <= 0:
            raise ValueError(f"n_in must be positive, got {n_in}")
        return row_bytes(t, int(n_in))
    except ValueError as e:
        raise KernelError(str(e)) from None


_F32 = np.dtype(np.float32)


def _activations(x: np.ndarray, n_in: int, ndim: int) -> np.ndarray:
    """x as C-contiguous f32 with ndim dims and last dim n_in (copies only when needed)."""
    if x.__class__ is np.ndarray and x.dtype is _F32 and x.ndim == ndim and x.shape[-1] == n_in \
            and x.flags.c_contiguous:
        return x  # the per-token fast path: a few hundred ns
    x = np.asarray(x)
    if x.ndim != ndim or x.shape[-1] != n_in:
        want = "[n_in]" if ndim == 1 else "[M, n_in]"
        raise KernelError(f"activations must be {want} with n_in={n_in}; got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _output(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous f32 result buffer of shape (the caller's, when it fits)."""
    if out is None:
        return np.empty(shape, _F32)
    if out.shape != shape or out.dtype != _F32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise KernelError(f"out must be a writeable C-contiguous f32 array of shape {shape}")
    return out


def matvec(w: QMatrix, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """w @ x: x f32 [n_in] -> f32 [n_out] (decode step; rows in parallel; INT8_DECODE_TYPES on 8-bit activations)."""
    x = _activations(x, w.n_in, 1)
    y = _output(out, (w.n_out,))
    if w.type in INT8_DECODE_TYPES:
        return cpu_iq_dot.matvec_q8(w, quantize_q8(x[None], 1), y)
    run = _MATVEC.get(w.type) if x.flags.writeable else matvec_kernel
    if run is None:  # w.data is always read-only u8 [n_out, row_bytes], y writable: one signature per type
        run = _MATVEC[w.type] = entry_point(matvec_kernel, (w.kind, w.data, x, y))
    run(w.kind, w.data, x, y)
    return y


_MATVEC: dict[GGMLType, Callable[..., None]] = {}  # matvec_kernel's compiled entry point per type (cpu_call.py)


def matmul(w: QMatrix, x: np.ndarray, out: np.ndarray | None = None, *, blas: bool | None = None,
           int8: bool | None = None) -> np.ndarray:
    """x @ w.T: x f32 [M, n_in] -> f32 [M, n_out] (prefill).

    Paths: the fused kernel (each block decoded once per 4 tokens; row i of the result depends on x[i] only,
    bit for bit, whatever M and the thread count), decoded tiles + BLAS (f32 sums in BLAS's order), and
    integer dot products on quantized activations (`quantize_q8` + `matmul_q8`, INT8_PARTS 8-bit parts per
    value; the fastest for quantized weights; row i also depends on x[i] only). blas=None and int8=None pick by M and type: int8
    from INT8_MIN_TOKENS for the types in `int8_types()`, else tiles from BLAS_MIN_TOKENS, else fused.
    blas=False forces the fused kernel (exact rows: a row gives what matvec's sums give alone, M = 1 aside,
    INT8_DECODE_TYPES aside: their matvec runs on 8-bit activations),
    blas=True the tiles (the fused kernel when no BLAS was found), int8=True the integer path.
    For M = 1 prefer matvec (a quarter of the work; it sums in another order, so results differ in the last bits).
    """
    x = _activations(x, w.n_in, 2)
    y = _output(out, (x.shape[0], w.n_out))
    n_tok = x.shape[0]
    if not n_tok:
        return y
    if int8 is None and blas is None and tiles_bf16(w, n_tok) and y.flags.c_contiguous:
        _matmul_bf16_call((w,), cpu_amx_bf16.split(x), n_tok, (y,))
        return y
    if int8 is None:
        int8 = blas is None and INT8_MIN_TOKENS is not None and n_tok >= INT8_MIN_TOKENS and w.type in IDECODERS
    if int8:
        return matmul_q8(w, quantize_q8(x), y)
    n_threads = numba.get_num_threads()
    if blas is None:
        blas = BLAS_MIN_TOKENS is not None and n_tok >= BLAS_MIN_TOKENS
    if blas and cpu_blas.SGEMM is not None:
        tile = tile_rows(w.n_in, w.n_out, n_threads)
        scratch = _scratch(n_threads * tile * w.n_in).reshape(n_threads, tile, w.n_in)
        with cpu_blas.single_threaded():
            matmul_tiles_kernel(w.kind, w.data, x, y, scratch, cpu_blas.SGEMM.sgemm_addr)
    else:
        matmul_kernel(w.kind, w.data, x, y, matmul_items(w.n_out, n_threads))
    return y


def tiles_bf16(w: object, n_tok: int, repacked: bool = False) -> bool:
    """Whether matmul runs w (a QMatrix) with n_tok tokens on the AMX-BF16 tiles (cpu_amx_bf16.py): hosts with
    them, batches from its MIN_TOKENS (repacked: w also has integer panels, MIN_TOKENS_REPACKED), every type
    but F32 (whose BLAS product is exact)."""
    return isinstance(w, QMatrix) and w.type != GGMLType.F32 and cpu_amx_bf16.usable(w.n_in, n_tok, repacked)


def _matmul_bf16_call(ws: tuple[QMatrix, ...], halves: tuple[np.ndarray, np.ndarray], n_tok: int,
                      ys: tuple[np.ndarray, ...]) -> None:
    """ys[i] = x @ ws[i].T for 1-3 weights of one type on the bf16 tiles, x given as its split halves."""
    w = ws[0]
    n_panels = sum(-(-v.n_out // cpu_amx_bf16.PANEL) for v in ws)
    n_items = max(1, min(numba.get_num_threads(), -(-n_panels // 2)))
    d = [v.data for v in ws] + [w.data[:0]] * (3 - len(ws))
    o = list(ys) + [np.empty((n_tok, 0), _F32)] * (3 - len(ys))
    cpu_amx_bf16.matmul_kernel(w.kind, d[0], d[1], d[2], halves[0], halves[1], n_tok, o[0], o[1], o[2], n_items)


def int8_types() -> list[GGMLType]:
    """ggml types the integer (8-bit activation) matmul computes on."""
    return sorted(IDECODERS)


@dataclass(frozen=True, eq=False)
class Q8Activations:
    """Activations x [M, n_in] in 8-bit parts per block of 32 values (cpu_int8.py).

    parts = 1: ggml's Q8_0, x ~ d * q, q = planes (int8 [M, n_in]). parts = 2: planes int8 [2, M, n_in],
    x ~ d * (2^LO_BITS * planes[0] + planes[1]): the second part rounds the first one's remainder (about
    15 bits in all). d f32 [M, n_in / 32]; s16 / s32 f32 [M, n_in / 16 or 32]: d * the integer sums per 16 / 32.
    """

    planes: np.ndarray
    d: np.ndarray
    s16: np.ndarray
    s32: np.ndarray

    @property
    def parts(self) -> int:
        """1 or 2 8-bit parts per value."""
        return 2 if self.planes.ndim == 3 else 1

    @property
    def shape(self) -> tuple[int, int]:
        """(M, n_in)."""
        return self.planes.shape[-2:]

    def integers(self) -> np.ndarray:
        """The integer value of each activation (x ~ d * this), int32 [M, n_in]."""
        if self.parts == 1:
            return self.planes.astype(np.int32)
        return (self.planes[0].astype(np.int32) << LO_BITS) + self.planes[1]

    def dequantize(self) -> np.ndarray:
        """d * integers as f64 [M, n_in], exactly: the activations the integer matmul multiplies."""
        m, n = self.shape
        return (self.integers().reshape(m, -1, 32) * self.d[:, :, None].astype(np.float64)).reshape(m, n)


def quantize_q8(x: np.ndarray, parts: int | None = None) -> Q8Activations:
    """x f32 [M, n_in] (n_in a multiple of 32) -> 8-bit parts (default INT8_PARTS), once per matmul."""
    parts = INT8_PARTS if parts is None else int(parts)
    if parts not in (1, 2):
        raise KernelError(f"activations are quantized in 1 or 2 8-bit parts; got {parts}")
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] % 32:
        raise KernelError(f"activations to quantize must be [M, n_in] with n_in a multiple of 32; got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    m, n = x.shape
    planes = np.empty((m, n) if parts == 1 else (2, m, n), np.int8)
    xq = Q8Activations(planes, np.empty((m, n // 32), _F32), np.empty((m, n // 16), _F32), np.empty((m, n // 32), _F32))
    wait_precompiled()
    if m:
        cpu_int8.quantize_kernel(ISA, x, planes, xq.d, xq.s16, xq.s32)
    return xq


def matmul_q8(w: QMatrix, xq: Q8Activations, out: np.ndarray | None = None, *, isa: Isa | None = None) -> np.ndarray:
    """xq @ w.T with integer dot products: -> f32 [M, n_out]; isa picks the instruction set (default ISA)."""
    _check_q8(w, xq)
    y = _output(out, (xq.shape[0], w.n_out))
    wait_precompiled()
    if xq.shape[0]:
        _matmul_q8_call((w,), xq, (y,), isa or ISA)
    return y


def _check_q8(w: QMatrix, xq: Q8Activations) -> None:
    """KernelError unless the integer matmul computes w on xq."""
    if w.type not in IDECODERS:
        names = ", ".join(t.name for t in int8_types())
        raise KernelError(f"no integer matmul for {w.type.name}; supported: {names}")
    if xq.shape[1] != w.n_in:
        raise KernelError(f"quantized activations have n_in={xq.shape[1]}; the weight needs {w.n_in}")


def _matmul_q8_call(ws: tuple[QMatrix, ...], xq: Q8Activations, ys: tuple[np.ndarray, ...], isa: Isa) -> None:
    """ys[i] = xq @ ws[i].T for 1-3 weights of one type, in one parallel call (the missing ones: 0 rows)."""
    w = ws[0]
    n_panels = sum(-(-v.n_out // cpu_int8.PANEL) for v in ws)
    n_items = max(1, min(numba.get_num_threads(), n_panels))
    subs = IDECODERS[w.type].subs
    qbuf = _aligned_u8(n_items, w.n_in * cpu_int8.PANEL)
    fbuf = np.empty((n_items, 2, subs * w.n_in // 2), _F32)
    none_w = w.data[:0]
    none_y = np.empty((xq.shape[0], 0), _F32)
    d = [v.data for v in ws] + [none_w] * (3 - len(ws))
    o = list(ys) + [none_y] * (3 - len(ys))
    cpu_int8.matmul_kernel(w.kind, isa, d[0], d[1], d[2], xq.planes, xq.d, xq.s16, xq.s32, o[0], o[1], o[2], qbuf, fbuf)


def matmul_many(ws: Sequence[QMatrix], x: np.ndarray) -> list[np.ndarray]:
    """[matmul(w, x) for w in ws] for weights that read the same activations x f32 [M, n_in] (Q, K and V; gate
    and up): on the integer path x is quantized once and the weights of one type run in one parallel call
    (up to three per call). Each result equals matmul(w, x)'s bit for bit."""
    if not ws:
        return []
    x = _activations(x, ws[0].n_in, 2)
    n_tok = x.shape[0]
    tiles = [i for i, w in enumerate(ws) if tiles_bf16(w, n_tok) and w.n_in == x.shape[1]]
    ints = [i for i, w in enumerate(ws) if INT8_MIN_TOKENS is not None and n_tok >= INT8_MIN_TOKENS
            and w.type in IDECODERS and w.n_in == x.shape[1] and i not in tiles]
    ys = [np.empty((n_tok, w.n_out), _F32) if i in ints or i in tiles else matmul(w, x) for i, w in enumerate(ws)]
    if tiles:
        halves = cpu_amx_bf16.split(x)
        for part in _by_type(ws, tiles):
            _matmul_bf16_call(tuple(ws[i] for i in part), halves, n_tok, tuple(ys[i] for i in part))
    if ints:
        xq = quantize_q8(x)
        for part in _by_type(ws, ints):
            _matmul_q8_call(tuple(ws[i] for i in part), xq, tuple(ys[i] for i in part), ISA)
    return ys


def _by_type(ws: Sequence[QMatrix], idx: Sequence[int]) -> list[list[int]]:
    """The indices idx of ws grouped by weight type, at most three per group (one parallel call each)."""
    by_type: dict[GGMLType, list[int]] = {}
    for i in idx:
        by_type.setdefault(ws[i].type, []).append(i)
    return [v[k:k + 3] for v in by_type.values() for k in range(0, len(v), 3)]


def precompile(types: Iterable[GGMLType | int | str], parts: int | None = None) -> list[GGMLType]:
    """Compile (numba caches them on disk) the integer prefill kernels of these types now, on tiny inputs
    with the argument types real calls use, and leave a marker per type; returns the types compiled (the
    AMX-BF16 tile kernels compile on first use: the cold-start compile process runs a prompt long enough)."""
    done = []
    for t in types:
        t = GGMLType[t] if isinstance(t, str) else GGMLType(t)
        if t not in IDECODERS:
            continue
        n_in = max(32, block_size(t))
        w = QMatrix(t, np.zeros((1, row_bytes(t, n_in)), np.uint8), n_in, 1)
        matmul_q8(w, quantize_q8(np.zeros((1, n_in), np.float32), parts))
        marker = _precompiled_marker(t, parts)
        if marker is not None:
            marker.touch()
        done.append(t)
    return done


def _precompiled_marker(t: GGMLType, parts: int | None) -> Path | None:
    """The file saying that t's integer kernels are in numba's disk cache (next to that cache: cleared with
    it; the name carries the source stamp and the instruction set), or None when numba cannot cache."""
    try:
        folder = Path(cpu_int8.matmul_kernel._cache._cache_path)  # numba's cache folder of cpu_int8.py
    except AttributeError:
        return None
    return folder / f"qf-int8-{_STAMP}-{ISA.name}-{INT8_PARTS if parts is None else parts}-{t.name}.done"


def precompile_async(types: Iterable[GGMLType | int | str], parts: int | None = None) -> subprocess.Popen | None:
    """`precompile` in one background process, for the types whose kernels are not cached yet: a fresh
    install's first prompt then loads them from numba's disk cache instead of compiling them while the caller
    loads and warms up (the integer kernels wait for it, `wait_precompiled`). None when there is nothing to do
    (no integer kernel, all cached, caching off)."""
    procs = precompile_background(types, parts, processes=1)
    return procs[0] if procs else None


def precompile_background(types: Iterable[GGMLType | int | str], parts: int | None = None,
                          processes: int | None = None) -> list[subprocess.Popen]:
    """`precompile` of the uncached types in up to `processes` background processes, the types dealt in turn
    (default: one per core beyond the one the caller compiles its decode kernels on, at least one; on 2 cores
    a second one added ~4 s of CPU, imports and shared kernels compiled twice, for no better balance). The
    integer kernels of this process wait for them (`wait_precompiled`) instead of compiling the same code
    again. [] when there is nothing to do."""
    want = {GGMLType[t] if isinstance(t, str) else GGMLType(t) for t in types} & set(IDECODERS)
    todo = sorted((t for t in want - _STARTED if (m := _precompiled_marker(t, parts)) is not None and not m.exists()),
                  key=lambda t: (-IDECODERS[t].subs, t.name))
    if not todo or numba.config.DISABLE_JIT:
        return []
    _STARTED.update(todo)
    n = max(1, min(len(todo), _cores() - 1 if processes is None else int(processes)))
    shares = [todo[i::n] for i in range(n)]
    code = (f"import os, sys; os.nice({int(BACKGROUND_NICE)}); from qf.runtime.kernels import cpu; "
            "cpu.precompile(sys.argv[2:], int(sys.argv[1]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[3]),
                                                       *filter(None, [os.environ.get("PYTHONPATH")])]))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(INT8_PARTS if parts is None else parts),
                               *(t.name for t in share)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for share in shares]
    with _BG_LOCK:
        _BACKGROUND.extend(procs)
    return procs


def _cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


BACKGROUND_NICE = 0  # niceness added to precompile processes (qf.runtime.coldstart raises it in its own)
_BACKGROUND: list[subprocess.Popen] = []  # precompile processes the integer kernels wait for
_BG_LOCK = threading.Lock()
_STARTED: set[GGMLType] = set()  # types a background process of this one compiles or compiled


def wait_precompiled() -> None:
    """Wait for the background precompile processes started here (their kernels are then in the disk cache)."""
    if not _BACKGROUND:
        return
    with _BG_LOCK:
        while _BACKGROUND:
            _BACKGROUND.pop().wait()


def _aligned_u8(rows: int, cols: int) -> np.ndarray:
    """A u8 [rows, cols] scratch whose rows start on 64-byte boundaries (cols a multiple of 64)."""
    raw = np.empty(rows * cols + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip:skip + rows * cols].reshape(rows, cols)


def unpack_int8(w: QMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w as the integer matmul reads it: (q u8 [n_out, n_in], s, m f32 [n_out, sub-blocks]), w = s * q + m."""
    if w.type not in IDECODERS:
        raise KernelError(f"no integer matmul for {w.type.name}")
    per = 32 // IDECODERS[w.type].subs
    q = np.empty((w.n_out, w.n_in), np.uint8)
    s = np.empty((w.n_out, w.n_in // per), _F32)
    m = np.empty_like(s)
    cpu_int8.unpack_kernel(w.kind, w.data, q, s, m)
    return q, s, m


_LOCAL = threading.local()


def _scratch(n: int) -> np.ndarray:
    """The calling thread's f32 tile buffer, at least n elements (grown, never shrunk; a few MB at most)."""
    buf = getattr(_LOCAL, "scratch", None)
    if buf is None or buf.size < n:
        buf = np.empty(n, _F32)
        _LOCAL.scratch = buf
    return buf[:n]


def get_rows(w: QMatrix, ids: np.ndarray) -> np.ndarray:
    """Dequantized rows w[ids]: ids int [k] -> f32 [k, n_in] (embedding lookup)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise KernelError(f"row ids must be a 1-D integer array; got {ids.dtype} {ids.shape}")
    ids = np.ascontiguousarray(ids, dtype=np.intp)
    if ids.size and (ids.min() < 0 or ids.max() >= w.n_out):
        bad = ids[(ids < 0) | (ids >= w.n_out)][0]
        raise KernelError(f"row id {bad} out of range for a matrix of {w.n_out} rows")
    out = np.empty((ids.size, w.n_in), dtype=np.float32)
    if ids.size:
        rows_kernel(w.kind, w.data, ids, out)
    return out


def set_threads(n: int) -> None:
    """Use n numba threads for the calling thread's kernel calls (1 .. numba.config.NUMBA_NUM_THREADS)."""
    top = numba.config.NUMBA_NUM_THREADS
    if not 1 <= int(n) <= top:
        raise KernelError(f"thread count must be in 1..{top}; got {n}")
    numba.set_num_threads(int(n))
    _THREADS.n = int(n)
    cpu_blas.set_blas_threads(int(n))  # numpy's BLAS outside the kernels (the kernels run it per thread)


_THREADS = threading.local()  # set_threads' count per calling thread (numba's own getter costs ~1 us per call)


def get_threads() -> int:
    """Threads the calling thread's kernel calls use."""
    return getattr(_THREADS, "n", 0) or numba.get_num_threads()


__all__ = ["KernelError", "Q8Activations", "QMatrix", "get_rows", "get_threads", "int8_types", "matmul",
           "matmul_many", "matmul_q8", "matvec", "precompile", "precompile_async", "precompile_background",
           "quantize_q8", "set_threads", "supported_types", "tiles_bf16", "unpack_int8", "wait_precompiled"]
