"""Fused dequant-matmul in Triton for packed ggml weights (kernels/torch_dequant.py's layout), M = 1..16 rows.

One program owns BLOCK_N output rows and a share of the input blocks (split-K, results added atomically into
an f32 output): per ggml block it gathers the block's fields for its rows (rows are innermost in the packed
layout, so each field load is coalesced), decodes the block in registers to f32 [BS, BLOCK_N] and multiplies
it with the activations' [M, BS] slice. The packed weight is read once per call and never written out
dequantized. Element i of a block is decoded exactly as torch_dequant's dequantizers decode it (same field
bytes, shifts and scale products), so in f32 the weights equal qf.quant.codecs' dequantization.

Types: Q4_0, Q8_0, Q4_K, Q5_K, Q6_K (`SUPPORTED`); others use torch_dequant's tiles. Runs on CUDA, and on
CPU tensors in Triton's interpreter (TRITON_INTERPRET=1), which is how CI checks it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qf.format.ggml_types import GGMLType
from qf.runtime.kernels.torch_dequant import PackedWeight

# qtype -> (kernel id, block size, the packed fields it reads, in argument order)
SUPPORTED: dict[GGMLType, tuple[int, int, tuple[str, ...]]] = {
    GGMLType.Q4_0: (0, 32, ("d", "qs")),
    GGMLType.Q8_0: (1, 32, ("d", "qs")),
    GGMLType.Q4_K: (2, 256, ("d", "dmin", "sc", "mn", "qs")),
    GGMLType.Q5_K: (3, 256, ("d", "dmin", "sc", "mn", "qs", "qh")),
    GGMLType.Q6_K: (4, 256, ("d", "scales", "ql", "qh")),
}
MAX_M = 16  # rows of activations one call handles (decode and small batches); larger M: tiles + GEMM


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _field(ptr, k: tl.constexpr, b, idx, cols, cmask, N):
    """Bytes (or values) idx [BS] of block b of a field [nb, k, N], for columns cols: [BS, BLOCK_N]."""
    return tl.load(ptr + (b * k + idx[:, None]) * N + cols[None, :], mask=cmask[None, :] & (idx[:, None] >= 0),
                   other=0)


@triton.jit
def _scalar_field(ptr, b, cols, cmask, N):
    """A one-value-per-block field (an fp16 scale) for columns cols, as f32 [1, BLOCK_N]."""
    return tl.load(ptr + b * N + cols, mask=cmask, other=0).to(tl.float32)[None, :]


@triton.jit
def _decode(KIND: tl.constexpr, T: tl.constexpr, f0, f1, f2, f3, f4, f5, b, cols, cmask, N):
    """Elements 32 T .. 32 T + 31 of block b of the weight for columns cols, decoded to f32 [32, BLOCK_N]."""
    i = T * 32 + tl.arange(0, 32)
    if KIND == 0:  # Q4_0: x = d * (nibble - 8); element i < 16: low nibble of byte i, else high of i - 16
        q = _field(f1, 16, b, i % 16, cols, cmask, N).to(tl.int32)
        q = (q >> ((i // 16) * 4)[:, None]) & 15
        w = (q.to(tl.float32) - 8.0) * _scalar_field(f0, b, cols, cmask, N)
    elif KIND == 1:  # Q8_0: x = q * d
        q = _field(f1, 32, b, i, cols, cmask, N).to(tl.float32)
        w = q * _scalar_field(f0, b, cols, cmask, N)
    elif KIND == 2 or KIND == 3:  # Q4_K / Q5_K: 8 sub-blocks of 32, x = d * sc[s] * q - dmin * mn[s]
        s = i // 32
        e = i % 32
        q = _field(f4, 128, b, (s // 2) * 32 + e, cols, cmask, N).to(tl.int32)
        q = (q >> ((s % 2) * 4)[:, None]) & 15
        if KIND == 3:
            h = _field(f5, 32, b, e, cols, cmask, N).to(tl.int32)
            q = q | (((h >> s[:, None]) & 1) << 4)
        sc = _field(f2, 8, b, s, cols, cmask, N).to(tl.float32)
        mn = _field(f3, 8, b, s, cols, cmask, N).to(tl.float32)
        d = _scalar_field(f0, b, cols, cmask, N)
        dmin = _scalar_field(f1, b, cols, cmask, N)
        w = (d * sc) * q.to(tl.float32) - dmin * mn
    else:  # Q6_K: 16 sub-blocks of 16, x = d * scale[i // 16] * ((ql nibble | qh crumb << 4) - 32)
        g = i // 32
        e = i % 32
        lo = _field(f2, 128, b, (g // 4) * 64 + (g % 2) * 32 + e, cols, cmask, N).to(tl.int32)
        lo = (lo >> (((g // 2) % 2) * 4)[:, None]) & 15
        hi = _field(f3, 64, b, (g // 4) * 32 + e, cols, cmask, N).to(tl.int32)
        hi = (hi >> ((g % 4) * 2)[:, None]) & 3
        sc = _field(f1, 16, b, i // 16, cols, cmask, N).to(tl.float32)
        w = (_scalar_field(f0, b, cols, cmask, N) * sc) * ((lo | (hi << 4)) - 32).to(tl.float32)
    return w


@triton.jit
def _qmm_kernel(x_ptr, y_ptr, f0, f1, f2, f3, f4, f5, M, N, NB, CHUNK, stride_xm,
                KIND: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[M, N] += x[M, NB * BS] @ W.T over this program's columns and its CHUNK of blocks (split-K)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b0 = tl.program_id(1) * CHUNK
    for j in range(0, CHUNK):
        b = b0 + j
        cmask = (cols < N) & ((cols * 0 + b) < NB)  # (a vector compare: Triton's interpreter mis-types scalar masks)
        for t in tl.static_range(BS // 32):  # 32 elements at a time: [32, BLOCK_N] in registers
            w = _decode(KIND, t, f0, f1, f2, f3, f4, f5, b, cols, cmask, N)
            k = b * BS + t * 32 + tl.arange(0, 32)
            xmask = rmask[:, None] & (k[None, :] < NB * BS)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=xmask, other=0.0)  # [BM, 32]
            if BLOCK_M == 1:
                acc += tl.sum(tl.trans(x) * w, axis=0)[None, :]
            else:  # BLOCK_M == 16: tensor cores (fp16 in, f32 accumulate)
                acc += tl.dot(x.to(tl.float16), w.to(tl.float16), out_dtype=tl.float32)
    tl.atomic_add(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=rmask[:, None] & (cols < N)[None, :])


def launch_shape(n_out: int, n_blocks: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, SPLIT): enough programs to fill the device (split-K when the output is narrow)."""
    block_n = 32 if interpreted() else 64
    programs = max(1, -(-n_out // block_n))
    target = 4 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1)
    split = max(1, min(n_blocks, -(-target // programs)))
    return block_n, split


def qmm(w: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """x [M, n_in] f32 (M <= MAX_M) @ w.T -> f32 [M, n_out], decoded in registers."""
    kind, bs, names = SUPPORTED[w.qtype]
    m = x.shape[0]
    if not 1 <= m <= MAX_M or x.shape[1] != w.n_in:
        raise ValueError(f"qmm takes [1..{MAX_M}, {w.n_in}] activations, got {tuple(x.shape)}")
    x = x.to(torch.float32).contiguous()
    nb = w.n_in // bs
    y = torch.zeros((m, w.n_out), dtype=torch.float32, device=x.device)
    fields = [w.fields[n] for n in names]
    fields += [fields[0]] * (6 - len(fields))  # unused pointer arguments
    block_n, split = launch_shape(w.n_out, nb, x.device)
    chunk = -(-nb // split)
    block_m = 1 if m == 1 else MAX_M
    grid = (triton.cdiv(w.n_out, block_n), -(-nb // chunk))
    _qmm_kernel[grid](x, y, *fields, m, w.n_out, nb, chunk, x.stride(0), KIND=kind, BS=bs, BLOCK_M=block_m,
                      BLOCK_N=block_n)
    return y
