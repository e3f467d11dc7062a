"""Parallel numba drivers (matvec, matmul, row gather) written once and specialised per ggml type.

Each supported type registers a `Decoder` (cpu_decoder.py: block head, 32-element unit, units per block,
element decoder for float tails). A driver takes a `Kind` as its first argument: its numba type carries the
ggml type id, so `head(kind, ...)` / `unit(kind, ...)` resolve at compile time to that type's decoder and
are inlined. One compiled (and cached) driver per (driver, type); no branch on the type at run time.

numba's cache only watches the source file of the cached function, not the modules it inlines. The
kind's type name therefore carries a hash of the decoder sources (cpu_registry.source_stamp): editing a
decoder changes the signature, so a stale cached driver is never picked up.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import NativeValue, models, overload, register_model, typeof_impl, unbox

from qf.format.ggml_types import GGMLType
from qf.runtime.kernels import cpu_registry
from qf.runtime.kernels.cpu_blas import sgemm
from qf.runtime.kernels.cpu_decoder import FASTMATH, UNIT, Decoder
from qf.runtime.kernels.cpu_simd import prefetch, vadd, vfma, vload, vstore, vsum, vzero

PREFETCH = 2048  # bytes ahead of the block being decoded (rows are contiguous: reaches the next rows)
ROW_CHUNK = 64  # matmul: output rows per work item (their packed bytes stay in L1/L2 across tokens)
TILE_BYTES = 512 * 1024  # matmul by tiles: f32 bytes of one thread's decoded tile (stays in L2 for sgemm)
TILE_ROWS = 128  # ... and at most this many rows (measured: 64-128 best on SmolLM2 shapes)

# ggml type -> its decoders: the registry every driver specialises on (filled by the decoder modules,
# which register themselves; cpu_registry.MODULES lists them).
cpu_registry.load()
DECODERS: dict[GGMLType, Decoder] = cpu_registry.DECODERS

# Hash of the decoder sources and everything they, these drivers and the AMX tile products (cpu_amx_bf16.py, whose
# kernels take a kind too) inline: part of every kind's type name.
_STAMP = cpu_registry.source_stamp(extra=("cpu_drivers", "cpu_amx_bf16"))


class KindType(types.Type):
    """numba type of a Kind: one per ggml type (and decoder source version)."""

    def __init__(self, qtype: int) -> None:
        self.qtype = int(qtype)
        super().__init__(name=f"qf_kind({GGMLType(qtype).name},{_STAMP})")


register_model(KindType)(models.OpaqueModel)


@unbox(KindType)
def _unbox_kind(typ, obj, c):
    """A kind carries no run-time data: its type is the whole message."""
    return NativeValue(c.context.get_dummy_value())


class Kind:
    """Compile-time tag selecting a type's decoders inside the drivers."""

    __slots__ = ("qtype", "_numba_type_")

    def __init__(self, qtype: GGMLType) -> None:
        self.qtype = GGMLType(qtype)
        self._numba_type_ = KindType(qtype)

    def __repr__(self) -> str:
        return f"Kind({self.qtype.name})"


@typeof_impl.register(Kind)
def _typeof_kind(val, c):
    """numba type of a Kind instance."""
    return val._numba_type_


def head(kind, row, b):
    """Decoded scales of block b of a packed row."""


def unit(kind, row, b, j, h):
    """Unit j of block b (header h) as two f32x16."""


def units_per_block(kind):
    """32-element units per block of the kind's type (a compile-time constant)."""


def elem(kind, row, i):
    """Element i of a float row (0 for block types, whose rows have no tail)."""


def _decoder(kind) -> Decoder:
    return DECODERS[GGMLType(kind.qtype)]


@overload(head, inline="always")
def _ov_head(kind, row, b):
    fn = _decoder(kind).head
    return lambda kind, row, b: fn(row, b)


@overload(unit, inline="always")
def _ov_unit(kind, row, b, j, h):
    fn = _decoder(kind).unit
    return lambda kind, row, b, j, h: fn(row, b, j, h)


@overload(units_per_block, inline="always")
def _ov_units_per_block(kind):
    n = _decoder(kind).units_per_block
    return lambda kind: n


@overload(elem, inline="always")
def _ov_elem(kind, row, i):
    fn = _decoder(kind).elem
    if fn is None:
        return lambda kind, row, i: np.float32(0.0)
    return lambda kind, row, i: fn(row, i)


# ------------------------------------------------------------------ dot products of one row

@njit(inline="always", fastmath=FASTMATH, cache=True)
def _dot1(kind, row, x0):
    """row . x0; x0: [n_in]. Two accumulators (first and second half of each unit) hide the FMA latency."""
    n_in = x0.shape[0]
    upb = units_per_block(kind)
    nb = n_in // (UNIT * upb)
    acc0 = vzero()
    acc1 = vzero()
    step = row.shape[0] // nb if nb else 0  # bytes per block
    for b in range(nb):
        prefetch(row, b * step + PREFETCH)
        h = head(kind, row, b)
        for j in range(upb):
            v0, v1 = unit(kind, row, b, j, h)
            i = UNIT * (b * upb + j)
            acc0 = vfma(v0, vload(x0, i), acc0)
            acc1 = vfma(v1, vload(x0, i + 16), acc1)
    s = vsum(vadd(acc0, acc1))
    for i in range(nb * UNIT * upb, n_in):
        s += elem(kind, row, i) * x0[i]
    return s


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _dot4(kind, row, x0, x1, x2, x3):
    """row . (x0, x1, x2, x3): each unit is decoded once and used for four activation rows.

    Each token sums exactly as `_dot1` does (two accumulators, then vsum(lo + hi), then the float tail), so
    a token's result is bit for bit the same whether it is alone (matvec) or one of a batch: batched
    decoding of several sequences gives the tokens each would give alone.
    """
    n_in = x0.shape[0]
    upb = units_per_block(kind)
    nb = n_in // (UNIT * upb)
    a0 = vzero()
    b0 = vzero()
    a1 = vzero()
    b1 = vzero()
    a2 = vzero()
    b2 = vzero()
    a3 = vzero()
    b3 = vzero()
    step = row.shape[0] // nb if nb else 0  # bytes per block
    for b in range(nb):
        prefetch(row, b * step + PREFETCH)
        h = head(kind, row, b)
        for j in range(upb):
            v0, v1 = unit(kind, row, b, j, h)
            i = UNIT * (b * upb + j)
            a0 = vfma(v0, vload(x0, i), a0)
            b0 = vfma(v1, vload(x0, i + 16), b0)
            a1 = vfma(v0, vload(x1, i), a1)
            b1 = vfma(v1, vload(x1, i + 16), b1)
            a2 = vfma(v0, vload(x2, i), a2)
            b2 = vfma(v1, vload(x2, i + 16), b2)
            a3 = vfma(v0, vload(x3, i), a3)
            b3 = vfma(v1, vload(x3, i + 16), b3)
    s0 = vsum(vadd(a0, b0))
    s1 = vsum(vadd(a1, b1))
    s2 = vsum(vadd(a2, b2))
    s3 = vsum(vadd(a3, b3))
    for i in range(nb * UNIT * upb, n_in):
        e = elem(kind, row, i)
        s0 += e * x0[i]
        s1 += e * x1[i]
        s2 += e * x2[i]
        s3 += e * x3[i]
    return s0, s1, s2, s3


# ------------------------------------------------------------------ drivers (one compiled copy per kind)

@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_kernel(kind, w, x, out):
    """out = w @ x, rows split evenly over the threads; w: [n_out, row_bytes] u8, x: [n_in], out: [n_out]."""
    for r in prange(w.shape[0]):
        out[r] = _dot1(kind, w[r], x)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_kernel(kind, w, x, out, n_items):
    """out = x @ w.T; x: [M, n_in], out: [M, n_out]. Work item = a chunk of rows against all tokens.

    Tokens go in groups of four; a short last group repeats its last token and drops the extra results.
    """
    n_tok = x.shape[0]
    n_out = w.shape[0]
    size = (n_out + n_items - 1) // n_items
    for c in prange(n_items):
        r0 = c * size
        r1 = min(n_out, r0 + size)
        for m in range(0, n_tok, 4):
            k = min(4, n_tok - m)  # tokens in this group
            x0 = x[m]
            x1 = x[m + min(1, k - 1)]
            x2 = x[m + min(2, k - 1)]
            x3 = x[m + min(3, k - 1)]
            for r in range(r0, r1):
                s0, s1, s2, s3 = _dot4(kind, w[r], x0, x1, x2, x3)
                out[m, r] = s0
                if k > 1:
                    out[m + 1, r] = s1
                if k > 2:
                    out[m + 2, r] = s2
                if k > 3:
                    out[m + 3, r] = s3


def tile_rows(n_in: int, n_out: int, n_threads: int) -> int:
    """Rows per decoded tile: fits TILE_BYTES, at most TILE_ROWS and each thread's share of n_out."""
    share = -(-n_out // n_threads)
    return max(1, min(share, TILE_ROWS, max(16, TILE_BYTES // (4 * n_in) // 16 * 16)))


def matmul_items(n_out: int, n_threads: int) -> int:
    """Work items for matmul_kernel: chunks of <= ROW_CHUNK rows, a multiple of the thread count."""
    per = n_threads * ROW_CHUNK
    return max(1, min(n_out, n_threads * ((n_out + per - 1) // per)))


@njit(inline="always", fastmath=FASTMATH, cache=True)
def decode_row(kind, row, dst):
    """dst[:] = the dequantized packed row; dst: [n_in]."""
    n_in = dst.shape[0]
    upb = units_per_block(kind)
    nb = n_in // (UNIT * upb)
    for b in range(nb):
        h = head(kind, row, b)
        for j in range(upb):
            v0, v1 = unit(kind, row, b, j, h)
            i = UNIT * (b * upb + j)
            vstore(dst, i, v0)
            vstore(dst, i + 16, v1)
    for i in range(nb * UNIT * upb, n_in):
        dst[i] = elem(kind, row, i)


@njit(fastmath=FASTMATH, cache=True)
def rows_kernel(kind, w, ids, out):
    """out[k] = dequantized row ids[k] of w; ids: [k] (in range), out: [k, n_in]. Serial: a prompt's rows
    take microseconds, and a parallel loop costs a fresh install ~0.4 s of compiling."""
    for k in range(ids.shape[0]):
        decode_row(kind, w[ids[k]], out[k])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_tiles_kernel(kind, w, x, out, scratch, sgemm_fn):
    """out = x @ w.T by row tiles; x: [M, n_in], out: [M, n_out], scratch: [n_items, tile, n_in] f32.

    Work item c owns an even share of the rows; it decodes them `tile` rows at a time into scratch[c] and
    multiplies each tile with BLAS (sgemm at address sgemm_fn, run in this thread) into out[:, r0:r1].
    """
    n_items, tile, n_in = scratch.shape
    n_tok = x.shape[0]
    n_out = w.shape[0]
    size = (n_out + n_items - 1) // n_items
    for c in prange(n_items):
        s = scratch[c]
        end = min(n_out, (c + 1) * size)
        for r0 in range(c * size, end, tile):
            r1 = min(end, r0 + tile)
            for r in range(r0, r1):
                decode_row(kind, w[r], s[r - r0])
            sgemm(sgemm_fn, n_tok, r1 - r0, n_in, x.ctypes.data, n_in, s.ctypes.data, n_in,
                  out.ctypes.data + 4 * r0, n_out)
