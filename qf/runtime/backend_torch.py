"""The torch backend: the `Backend` ops on one torch device (CUDA for GPU layers; the CPU in tests).

Weights are uploaded once per placed layer and stay packed (kernels/torch_dequant.py); a linear layer
dequantizes tiles of rows into a per-call scratch and multiplies. Precision, by device type (DTYPES):
- cuda: weights are dequantized to fp16 and multiplied with the activations cast to fp16 (cuBLAS, f32
  accumulation); attention runs in fp16 over the KV cache (types from the KVSpec). The residual stream,
  norms, RoPE and logits stay f32, as in llama.cpp's CUDA path.
- cpu: everything f32; each dequantized weight is bit-identical to qf.quant.codecs, so a layer differs
  from the numba CPU backend only by summation order.
torch is imported by this module only: the rest of qf runs without it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from qf.format.errors import ModelError
from qf.runtime.kernels import torch_dequant as tq
from qf.runtime.kernels import torch_payload as tp
from qf.runtime.kv_cache import KVSpec, hadamard
from qf.runtime.weights import PayloadRef, TensorRef, WeightRef

# device type -> (weight/matmul dtype, KV cache dtype)
DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "cuda": (torch.float16, torch.float16),
    "cpu": (torch.float32, torch.float32),
}
# KV cache types stored as plain torch floats (q8_0 / q4_0 are stored as int8 / uint8 blocks + fp16 scales)
KV_FLOAT_DTYPES: dict[str, torch.dtype] = {"f16": torch.float16, "f32": torch.float32}
QBLOCK = 32
# Values dequantized per tile of a linear: the per-call scratch, about 4-5 bytes per value at its peak (the
# unpacked codes, then the fp16 values). The planner budgets 2 bytes per value of the largest quantized weight
# plus its margin; 2^24 values (~80 MiB) keep big models inside that and cover a 4096 x 4096 weight at once.
TILE_ELEMS: dict[str, int] = {"cuda": 1 << 24, "cpu": 1 << 20}

_HAS_GQA_SDPA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class TorchBackend:
    """Backend over torch tensors on `device`; weights packed on the device, activations f32."""

    def __init__(self, device: str | torch.device = "cuda", weight_dtype: torch.dtype | None = None,
                 tile_elems: int | None = None, compile: bool = False, n_threads: int | None = None,
                 kernels: str = "auto") -> None:
        self.device = torch.device(device)
        self.fused = _fused_kernels(kernels, self.device)  # qtype -> fused matmul for M <= its max rows
        self.n_threads = n_threads
        kind = self.device.type if self.device.type in DTYPES else "cuda"
        default_w, self.attn_dtype = DTYPES[kind]
        self.weight_dtype = weight_dtype or default_w
        self.tile_elems = int(tile_elems or TILE_ELEMS.get(self.device.type, TILE_ELEMS["cuda"]))
        self._dequant = tq.compiled if compile else None
        self._uploaded: dict[tuple[str, int, tuple[int, ...]], tq.PackedWeight] = {}  # tied weights: one copy
        self.weight_bytes = 0  # device bytes of the weights uploaded so far
        self.name = f"torch:{self.device}"

    # -- placement --------------------------------------------------------------------------------------

    def matrix(self, t: WeightRef) -> tq.PackedWeight | tp.TorchPayload:
        """Upload a 2-D weight [n_out, n_in] packed (its blocks split into fields; a payload weight by its
        scheme's packer, kernels/torch_payload.py); a tensor asked for twice (token_embd as embedding and tied
        head) is uploaded once."""
        first = t.arrays[min(t.arrays)] if isinstance(t, PayloadRef) else t.data
        key = (t.name, first.__array_interface__["data"][0], tuple(first.shape))
        w = self._uploaded.get(key)
        if w is None:
            w = self._uploaded[key] = (tp.pack(t, self.device) if isinstance(t, PayloadRef)
                                       else self._pack(t, t.data, t.n_in))
            self.weight_bytes += w.nbytes
        return w

    def vector(self, t: TensorRef) -> torch.Tensor:
        """A 1-D weight as f32 [n] on the device."""
        n = int(np.prod(t.ne))
        v = tq.dequantize(self._pack(t, np.asarray(t.data).reshape(1, -1), n)).reshape(n)
        self.weight_bytes += v.numel() * v.element_size()
        return v

    def _pack(self, t: TensorRef, data: np.ndarray, n_in: int) -> tq.PackedWeight:
        """Upload rows of t; ModelError naming the tensor when the type or shape is not supported."""
        try:
            return tq.pack(t.type, data, n_in, self.device)
        except (ValueError, NotImplementedError) as e:
            raise ModelError(f"tensor {t.name!r} ({t.type.name}): not supported by the torch backend: {e}") from e

    def kv_layer(self, spec: KVSpec) -> "TorchKV":
        """One layer's cache on the device, in the spec's types (attention runs in attn_dtype)."""
        return TorchKV(spec, self.device, self.attn_dtype)

    def set_threads(self, n: int | None = None) -> None:
        """torch's intra-op threads on a CPU device (process-wide); nothing on a GPU."""
        n = n or self.n_threads
        if n and self.device.type == "cpu":
            torch.set_num_threads(int(n))

    # -- crossing devices -------------------------------------------------------------------------------

    def from_host(self, x: np.ndarray) -> torch.Tensor:
        """A host array as f32 on the device (always a copy: the host buffer stays the caller's)."""
        a = np.array(x, dtype=np.float32, copy=True, order="C")
        return torch.from_numpy(a).to(self.device)

    def to_host(self, x: torch.Tensor) -> np.ndarray:
        """An f32 numpy copy of a device tensor (never a view of the device's buffer)."""
        y = x.detach().to("cpu", torch.float32)
        return y.numpy().copy() if y.data_ptr() == x.data_ptr() else y.numpy()

    # -- ops --------------------------------------------------------------------------------------------

    def embed(self, w: tq.PackedWeight, ids: np.ndarray) -> torch.Tensor:
        """ids [M] -> rows f32 [M, n_embd], only those rows dequantized."""
        idx = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        return tq.dequantize_t(w, idx, torch.float32, self._dequant).T.contiguous()  # [M, n_embd]

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * w over the last axis, f32: [M, n] -> [M, n]."""
        return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps) * w

    def linear(self, w: tq.PackedWeight, x: torch.Tensor, bias: torch.Tensor | None = None,
               exact_rows: bool = False) -> torch.Tensor:
        """x [M, n_in] @ w.T (+ bias) -> f32 [M, n_out]: the fused Triton kernel for decode-sized M, else
        w dequantized tile by tile (exact_rows: best effort; GEMM libraries may sum a row differently for
        different M)."""
        if isinstance(w, tp.TorchPayload):
            y = tp.matmul(w, x, self.weight_dtype, self.tile_elems)
            return y if bias is None else y.add_(bias)
        fused = self.fused.get(w.qtype)
        if fused is not None and x.shape[0] <= fused[1]:
            y = fused[0](w, x)
        else:
            y = tq.matmul(w, x, self.weight_dtype, self.tile_elems, self._dequant)
        return y if bias is None else y.add_(bias)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: np.ndarray, neox: bool) -> None:
        """Rotate x [M, H, D] in place, row m by position pos[m]'s angles (cos/sin [n_ctx, P]): pairs
        (2i, 2i+1), or (i, i + P) in NEOX mode."""
        idx = torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64)).to(self.device)
        cos, sin = cos.index_select(0, idx), sin.index_select(0, idx)  # [M, P]
        p = cos.shape[-1]
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [M, 1, P]
        if neox:
            a, b = x[..., :p], x[..., p:2 * p]
        else:
            pairs = x[..., :2 * p].unflatten(-1, (p, 2))  # [M, H, P, 2] view
            a, b = pairs[..., 0], pairs[..., 1]
        a0 = a.clone()
        a.mul_(c).addcmul_(b, s, value=-1.0)  # a = a c - b s
        b.mul_(c).addcmul_(a0, s)  # b = a s + b c

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, computed into gate."""
        return F.silu(gate, inplace=True).mul_(up)

    def geglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gelu_tanh(gate) * up (gemma's GEGLU)."""
        return F.gelu(gate, approximate="tanh").mul_(up)

    def add_(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Residual add in place."""
        x.add_(y)

    def scale_(self, x: torch.Tensor, s: float) -> None:
        """x *= s in place."""
        x.mul_(float(s))


KERNEL_CHOICES = ("auto", "triton", "torch")


def _fused_kernels(kernels: str, device: torch.device) -> dict:
    """The fused matmuls to use: Triton's for its types on CUDA ("auto"), or anywhere ("triton": on a CPU
    device that needs TRITON_INTERPRET=1), or none ("torch": dequantized tiles only)."""
    if kernels not in KERNEL_CHOICES:
        raise ModelError(f"torch kernels {kernels!r}: use one of {', '.join(KERNEL_CHOICES)}")
    if kernels == "torch" or (kernels == "auto" and device.type != "cuda"):
        return {}
    try:
        from qf.runtime.kernels import triton_qmm
    except ImportError as e:
        if kernels == "triton":
            raise ModelError(f"torch kernels 'triton': Triton is not importable ({e})") from e
        return {}
    return {t: (triton_qmm.qmm, triton_qmm.MAX_M) for t in triton_qmm.SUPPORTED}


def _runs(slots: np.ndarray, pos: np.ndarray) -> list[tuple[int, int, int]]:
    """Rows grouped into runs (first row, end row, slot) of one slot at consecutive positions."""
    runs, start = [], 0
    for m in range(1, len(slots) + 1):
        if m == len(slots) or slots[m] != slots[m - 1] or pos[m] != pos[m - 1] + 1:
            runs.append((start, m, int(slots[start])))
            start = m
    return runs


class TorchKV:
    """One layer's K and V on a torch device: [slots, Hkv, n_ctx, D] floats, or q8_0 / q4_0 blocks
    (int8 quants, or two 4-bit quants per byte, + fp16 scales per 32 values) dequantized per attention call."""

    def __init__(self, spec: KVSpec, device: torch.device, attn_dtype: torch.dtype) -> None:
        self.spec, self.device, self.attn_dtype = spec, device, attn_dtype
        self.k = self._alloc(spec.type_k, spec.head_dim_k)
        self.v = self._alloc(spec.type_v, spec.head_dim_v)
        rot = lambda d: torch.from_numpy(hadamard(d)).to(device)  # noqa: E731
        self.rot_k = rot(spec.head_dim_k) if spec.rotates("k") else None  # [Dk, Dk] f32
        self.rot_v = rot(spec.head_dim_v) if spec.rotates("v") else None
        self.nbytes = sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def _alloc(self, type_name: str, dim: int) -> tuple[torch.Tensor, ...]:
        """Zeroed storage of K or V: (values,) for floats, (quants, fp16 scales) for q8_0 / q4_0."""
        s = self.spec
        lead = (s.n_slots, s.n_head_kv, s.n_ctx)
        z = lambda n, dt: torch.zeros((*lead, n), dtype=dt, device=self.device)  # noqa: E731
        if type_name in KV_FLOAT_DTYPES:
            return (z(dim, KV_FLOAT_DTYPES[type_name]),)
        if type_name == "q8_0":
            return z(dim, torch.int8), z(dim // QBLOCK, torch.float16)
        return z(dim // 2, torch.uint8), z(dim // QBLOCK, torch.float16)

    def store(self, k: torch.Tensor, v: torch.Tensor, slots: np.ndarray, pos: np.ndarray) -> None:
        """k [M, Hkv, Dk], v [M, Hkv, Dv] -> (slots[m], :, pos[m])."""
        si = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)
        pi = torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64)).to(self.device)
        k = k if self.rot_k is None else k.to(torch.float32) @ self.rot_k
        v = v if self.rot_v is None else v.to(torch.float32) @ self.rot_v
        for store, x, type_name in ((self.k, k, self.spec.type_k), (self.v, v, self.spec.type_v)):
            for dst, val in zip(store, _quantize(x, type_name)):
                dst[si, :, pi] = val.to(dst.dtype)

    def _read(self, store: tuple[torch.Tensor, ...], type_name: str, slot: int, t0: int, t1: int) -> torch.Tensor:
        """Positions t0..t1-1 of a slot as attn_dtype [Hkv, t1 - t0, D]."""
        if len(store) == 1:
            return store[0][slot, :, t0:t1].to(self.attn_dtype)
        q, d = store[0][slot, :, t0:t1], store[1][slot, :, t0:t1].to(torch.float32)
        if type_name == "q8_0":
            vals = q.to(torch.float32).unflatten(-1, (-1, QBLOCK))
        else:
            b = q.to(torch.int16).unflatten(-1, (-1, QBLOCK // 2))  # [..., nb, 16]
            vals = (torch.cat([b & 15, b >> 4], dim=-1) - 8).to(torch.float32)  # [..., nb, 32]
        return (vals * d.unsqueeze(-1)).flatten(-2).to(self.attn_dtype)

    def attend(self, q: torch.Tensor, slots: np.ndarray, pos: np.ndarray, scale: float | None = None,
               window: int = 0) -> torch.Tensor:
        """Causal GQA attention of rows q [M, H, D] -> f32 [M, H * D], one SDPA call per run of rows."""
        if self.rot_k is not None:
            q = q.to(torch.float32) @ self.rot_k
        outs = [self._attend_run(q[a:b], slot, int(pos[a]), scale, window) for a, b, slot in _runs(slots, pos)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # [M, H * Dv]
        if self.rot_v is not None:
            out = (out.unflatten(-1, (-1, self.rot_v.shape[0])) @ self.rot_v).flatten(-2)
        return out

    def _attend_run(self, q: torch.Tensor, slot: int, pos0: int, scale: float | None, window: int) -> torch.Tensor:
        """Rows q [m, H, D] of one slot at positions pos0.. (bottom-right aligned causal mask)."""
        m, n_head, _ = q.shape
        t = pos0 + m
        t0 = max(0, t - m - window + 1) if window > 0 else 0  # first key any query of the run can see
        qh = q.transpose(0, 1).unsqueeze(0).to(self.attn_dtype)  # [1, H, m, D]
        k = self._read(self.k, self.spec.type_k, slot, t0, t).unsqueeze(0)  # [1, Hkv, T - t0, D]
        v = self._read(self.v, self.spec.type_v, slot, t0, t).unsqueeze(0)
        mask = None
        if m > 1:
            kpos = torch.arange(t0, t, device=q.device)
            qpos = torch.arange(pos0, t, device=q.device)[:, None]
            mask = kpos[None, :] <= qpos  # [m, T - t0]
            if window > 0:
                mask &= kpos[None, :] > qpos - window
        group = n_head // k.shape[1]
        if group > 1 and not _HAS_GQA_SDPA:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        extra = {"enable_gqa": True} if group > 1 and _HAS_GQA_SDPA else {}
        if scale is not None:
            extra["scale"] = float(scale)
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, **extra)  # [1, H, m, D]
        return out[0].transpose(0, 1).reshape(m, -1).to(torch.float32)


def _quantize(x: torch.Tensor, type_name: str) -> tuple[torch.Tensor, ...]:
    """Rows x [M, H, D] in a cache type: (values,) or (quants, fp16 scales [M, H, D / 32]) as ggml's
    reference quantizers compute them (q8_0: round half away from zero; q4_0: d = signed absmax / -8)."""
    if type_name in KV_FLOAT_DTYPES:
        return (x,)
    b = x.to(torch.float32).unflatten(-1, (-1, QBLOCK))  # [M, H, nb, 32]
    if type_name == "q8_0":
        d = b.abs().amax(dim=-1, keepdim=True) / 127.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.trunc(b * inv + torch.copysign(torch.full_like(b, 0.5), b)).to(torch.int8)
        return q.flatten(-2), d.squeeze(-1).to(torch.float16)
    idx = b.abs().argmax(dim=-1, keepdim=True)
    d = b.gather(-1, idx) / -8.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc(b * inv + 8.5), max=15).to(torch.uint8)  # [M, H, nb, 32]
    packed = q[..., :QBLOCK // 2] | (q[..., QBLOCK // 2:] << 4)
    return packed.flatten(-2), d.squeeze(-1).to(torch.float16)


def cuda_available() -> bool:
    """True when torch sees at least one CUDA device."""
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except (RuntimeError, AssertionError):
        return False
