"""The per-device ops a forward pass calls, and the CPU implementation (numba kernels over the mmap).

A forward pass (runtime/arch/*.py) only talks to a `Backend`: it asks the backend to place each layer's
weights, then calls the ops below on arrays the backend owns. A planner can give each layer its own backend
(CPU now, a torch/CUDA one later); only the hidden state crosses between them, via `to_host`/`from_host`.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Protocol, Sequence

import numba
import numpy as np

from qf.format.errors import ModelError
from qf.format.ggml_types import GGMLType
from qf.runtime.kernels import cpu as kernels
from qf.runtime.kernels import cpu_attention as attn
from qf.runtime.kernels import cold, cpu_blas, cpu_payload, cpu_repack
from qf.runtime.kernels.cpu_simd import vadd, vdiv, vexp, vfma, vload, vmul, vsplat, vstore
from qf.runtime.kv_cache import KVSpec, LayerKV, hadamard
from qf.runtime.weights import PayloadRef, TensorRef, WeightRef

# Plain float types that a 1-D weight can be viewed as without a codec.
_NUMPY_DTYPES: dict[GGMLType, type] = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}


class Backend(Protocol):
    """Ops over one device's arrays: weights placed once, then called per layer per step."""

    name: str

    def matrix(self, t: TensorRef) -> Any:
        """Place a 2-D weight [n_out, n_in] for `linear`/`embed`."""

    def vector(self, t: TensorRef) -> Any:
        """Place a 1-D weight as f32 [n]."""

    def kv_layer(self, spec: KVSpec) -> LayerKV:
        """Allocate one layer's KV cache (every slot and position) as the spec says, on this device."""

    def set_threads(self, n: int) -> None:
        """Use n threads for the calling thread's next ops."""

    def from_host(self, x: np.ndarray) -> Any:
        """Bring a host hidden state [M, n_embd] onto this device."""

    def to_host(self, x: Any) -> np.ndarray:
        """Bring a hidden state back to host memory as f32 numpy."""

    def embed(self, w: Any, ids: np.ndarray) -> Any:
        """Rows of an embedding matrix: ids [M] -> [M, n_embd]."""

    def rms_norm(self, x: Any, w: Any, eps: float) -> Any:
        """x / rms(x) * w over the last axis: [M, n] -> [M, n]."""

    def linear(self, w: Any, x: Any, bias: Any | None = None, exact_rows: bool = False) -> Any:
        """x @ w.T (+ bias): [M, n_in] -> [M, n_out]; exact_rows: each row as it would be alone (bit for bit)."""

    def rope(self, x: Any, cos: Any, sin: Any, pos: np.ndarray, neox: bool) -> None:
        """Rotate x [M, H, D] in place: row m by the angles cos/sin [n_ctx, n_rot / 2] of position pos[m]."""

    def swiglu(self, gate: Any, up: Any) -> Any:
        """silu(gate) * up, elementwise: [M, n_ff]."""

    def geglu(self, gate: Any, up: Any) -> Any:
        """gelu_tanh(gate) * up, elementwise: [M, n_ff] (gemma's GEGLU feed-forward)."""

    def add_(self, x: Any, y: Any) -> None:
        """x += y in place (the residual stream)."""

    def scale_(self, x: Any, s: float) -> None:
        """x *= s in place."""


# ---------------------------------------------------------------------------------------------------------
# CPU ops that are not matrix products: small fused numba loops, one call per op per layer.


@numba.njit(cache=True, fastmath=True, error_model="numpy")
def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w; x, out: [M, n], w: [n]."""
    n = x.shape[1]
    for m in range(x.shape[0]):
        acc = 0.0  # f64 accumulation, as ggml does
        for i in range(n):
            acc += np.float64(x[m, i]) * x[m, i]
        scale = np.float32(1.0 / math.sqrt(acc / n + eps))
        for i in range(n):
            out[m, i] = x[m, i] * scale * w[i]


@numba.njit(cache=True, fastmath=True, error_model="numpy")
def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: np.ndarray, neox: bool) -> None:
    """Rotate pairs of x [M, H, D] in place by position pos[m]'s angles (cos/sin [n_ctx, P]): pairs
    (2i, 2i+1) in ggml's normal mode, (i, i + P) in NEOX mode."""
    n_pairs = cos.shape[1]
    for m in range(x.shape[0]):
        p = pos[m]
        for h in range(x.shape[1]):
            for i in range(n_pairs):
                a = i if neox else 2 * i
                b = i + n_pairs if neox else 2 * i + 1
                x0 = x[m, h, a]
                x1 = x[m, h, b]
                x[m, h, a] = x0 * cos[p, i] - x1 * sin[p, i]
                x[m, h, b] = x0 * sin[p, i] + x1 * cos[p, i]


PARALLEL_ATTENTION_MIN = 1 << 12  # (row, kv head, key) triples from which attention runs in parallel
FLASH_MIN_ROWS = 16  # rows of one sequence's chunk from which attention runs tiled (cpu_attention.attention_flash)


@numba.njit(cache=True, fastmath=True, error_model="numpy")
def _silu_mul(g: float, z: float, u: float) -> float:
    """g * sigmoid(z) * u for one element (the tails of the vector loops)."""
    return g / (np.float32(1.0) + np.exp(-z)) * u


GELU_C = math.sqrt(2.0 / math.pi)  # tanh approximation of GELU (ggml_gelu, torch approximate="tanh")
GELU_A = 0.044715
PARALLEL_GLU_ROWS = 8  # SwiGLU / GeGLU of this many rows or more run on the kernel threads (decode: serial)


@numba.njit(inline="always", cache=True, fastmath=True, error_model="numpy")
def _glu_row(g_row: np.ndarray, u_row: np.ndarray, gelu: bool) -> None:
    """g_row = act(g_row) * u_row, 16 lanes at a time (vexp): silu(g) = g sigmoid(g); gelu_tanh(g) =
    0.5 g (1 + tanh(v)) = g sigmoid(2v), v = c g (1 + a g^2)."""
    n = g_row.shape[0]
    c2, a = np.float32(-2.0 * GELU_C), np.float32(GELU_A)
    one = vsplat(1.0)
    for i in range(0, n - n % 16, 16):
        g = vload(g_row, i)
        if gelu:
            z = vmul(vmul(vsplat(c2), g), vfma(vmul(vsplat(a), g), g, one))  # -2v
        else:
            z = vmul(g, vsplat(-1.0))
        vstore(g_row, i, vmul(vdiv(g, vadd(one, vexp(z))), vload(u_row, i)))
    for i in range(n - n % 16, n):
        g = g_row[i]
        g_row[i] = _silu_mul(g, -c2 * g * (np.float32(1.0) + a * g * g) if gelu else g, u_row[i])


@numba.njit(cache=True, fastmath=True, error_model="numpy")
def _glu_serial(gate: np.ndarray, up: np.ndarray, gelu: bool) -> None:
    """gate = act(gate) * up in place, both [M, n], in this thread."""
    for m in range(gate.shape[0]):
        _glu_row(gate[m], up[m], gelu)


@numba.njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def _glu_parallel(gate: np.ndarray, up: np.ndarray, gelu: bool) -> None:
    """gate = act(gate) * up in place, both [M, n], rows on the kernel threads."""
    for m in numba.prange(gate.shape[0]):
        _glu_row(gate[m], up[m], gelu)


def _glu(gate: np.ndarray, up: np.ndarray, gelu: bool) -> None:
    """gate = silu(gate) * up (gelu: gelu_tanh) in place; both [M, n]."""
    (_glu_parallel if gate.shape[0] >= PARALLEL_GLU_ROWS else _glu_serial)(gate, up, gelu)


def linears(be: Backend, ws: Sequence[Any], x: Any, biases: Sequence[Any], exact_rows: bool = False) -> list[Any]:
    """The products of several weights with the same rows x (Q, K, V; gate, up): the backend's merged
    `linears` when it has one, else one `linear` each."""
    merged = getattr(be, "linears", None)
    if merged is not None:
        return merged(ws, x, biases, exact_rows)
    return [be.linear(w, x, b, exact_rows) for w, b in zip(ws, biases)]


def vector_f32(t: TensorRef) -> np.ndarray:
    """A 1-D weight as f32 [n]: a zero-copy view for F32, converted otherwise."""
    dtype = _NUMPY_DTYPES.get(t.type)
    if dtype is not None:
        return np.ascontiguousarray(t.data.view(dtype).reshape(-1), dtype=np.float32)
    from qf.quant.codecs import get_codec

    return get_codec(t.type).dequantize(t.data).reshape(-1).astype(np.float32)


class CpuBackend:
    """Backend over numpy arrays: quantized weights stay in the mmap, numba kernels compute on them."""

    name = "cpu"

    def __init__(self, n_threads: int | None = None, repack: bool = False) -> None:
        """repack: keep each quantized weight of cpu_repack.DEFAULT_TYPES as integer panels in RAM
        (kernels/cpu_repack.py), built the first time the weight is multiplied (an embedding table that is
        only looked up is never repacked); decode steps then run on 8-bit activations and merged Q/K/V and
        gate/up calls. It costs `repacked_bytes` of RAM beyond the mmap (Q4_0, Q4_1, Q8_0: the file's size;
        Q4_K 1.33x, Q6_K 1.52x)."""
        # numba cannot use more threads than its pool was started with (NUMBA_NUM_THREADS)
        self.n_threads = None if n_threads is None else max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS))
        self.repack = bool(repack)
        self._packed: dict[kernels.QMatrix, cpu_repack.RepackedMatrix] = {}
        self._merged: dict[tuple[Any, ...], cpu_repack.MergedCall] = {}  # the merged calls of linears()
        self._pack_lock = threading.Lock()

    @property
    def repacked_bytes(self) -> int:
        """RAM the repacked panels take so far."""
        return sum(r.nbytes for r in list(self._packed.values()))

    def _packed_of(self, w: Any) -> cpu_repack.RepackedMatrix | None:
        """w's repacked panels (built on first use) when repacking is on and w's type is repacked, else None."""
        if not self.repack or not isinstance(w, kernels.QMatrix) or w.type not in cpu_repack.DEFAULT_TYPES:
            return None
        r = self._packed.get(w)
        if r is None:
            with self._pack_lock:
                r = self._packed.get(w)
                if r is None:
                    r = self._packed[w] = cpu_repack.repack(w)
        return r

    def _tiles(self, w: Any, n_tok: int) -> bool:
        """Whether a product of w with n_tok tokens runs on the AMX-BF16 tiles (reading the mmap) rather than on
        w's repacked panels or the other matmul paths."""
        if n_tok < kernels.cpu_amx_bf16.MIN_TOKENS:  # decode steps and short batches: the cheap answer first
            return False
        repacked = self.repack and isinstance(w, kernels.QMatrix) and w.type in cpu_repack.DEFAULT_TYPES
        return kernels.tiles_bf16(w, n_tok, repacked)

    def matrix(self, t: WeightRef) -> Any:
        """Wrap the mapped bytes of a 2-D weight in a kernel matrix (never copied); a payload weight gets its
        scheme's kernel (kernels/cpu_payload.py)."""
        if isinstance(t, PayloadRef):
            return cpu_payload.payload_matrix(t)
        try:
            return kernels.QMatrix(t.type, t.data, t.n_in, t.n_out)
        except (ValueError, KeyError, NotImplementedError, TypeError) as e:
            raise ModelError(f"tensor {t.name!r} ({t.type.name}): not supported by the CPU kernels: {e}") from e

    def vector(self, t: TensorRef) -> np.ndarray:
        """A 1-D weight as f32."""
        return vector_f32(t)

    def kv_layer(self, spec: KVSpec) -> "CpuKV":
        """One layer's cache in host memory (pages are only touched as positions fill)."""
        return CpuKV(spec)

    def set_threads(self, n: int | None = None) -> None:
        """Set the kernel thread count for the calling thread."""
        n = n or self.n_threads
        if n:
            kernels.set_threads(int(n))

    def from_host(self, x: np.ndarray) -> np.ndarray:
        """Host arrays are already CPU arrays."""
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        """Identity on CPU."""
        return x

    def embed(self, w: Any, ids: np.ndarray) -> np.ndarray:
        """ids [M] -> rows [M, n_embd] (dequantized on the fly)."""
        return np.ascontiguousarray(kernels.get_rows(w, ids), dtype=np.float32)

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        """[M, n] -> [M, n]."""
        out = np.empty_like(x)
        _rms_norm(x, w, eps, out)
        return out

    def linear(self, w: Any, x: np.ndarray, bias: np.ndarray | None = None, exact_rows: bool = False) -> np.ndarray:
        """[M, n_in] -> [M, n_out]: matvec for one row (decode), matmul for a batch (prefill).

        exact_rows: every row's result bit for bit what it would be alone (the fused kernel, never BLAS):
        a decode step of several sequences gives each the logits it would get alone.
        """
        r = None if not exact_rows and self._tiles(w, x.shape[0]) else self._packed_of(w)
        if r is not None:
            y = cpu_repack.matmul(r, x)  # rows depend on their own token only: exact_rows holds
        elif isinstance(w, cpu_payload.PayloadMatrix):
            y = w.linear(x, exact_rows)
        elif x.shape[0] == 1:
            y = kernels.matvec(w, x[0]).reshape(1, -1)
        elif exact_rows and w.type in kernels.INT8_DECODE_TYPES:  # each row what its decode step gives alone
            y = np.stack([kernels.matvec(w, xi) for xi in x])
        else:
            y = kernels.matmul(w, x, blas=False if exact_rows else None)
        if bias is not None:
            y += bias
        return y

    def linears(self, ws: Sequence[Any], x: np.ndarray, biases: Sequence[np.ndarray | None],
                exact_rows: bool = False) -> list[np.ndarray]:
        """[linear(w, x, b) for w, b in zip(ws, biases)] for weights that read the same rows x: a prefill batch
        quantizes x once and runs the weights of one type in one parallel call (kernels.matmul_many); each
        result is what `linear` gives, bit for bit."""
        repack = self.repack and (exact_rows or not all(self._tiles(w, x.shape[0]) for w in ws))
        merged = self._merged.get(tuple(ws)) if repack else None
        if merged is None and repack:
            packed = [self._packed_of(w) for w in ws]
            if all(r is not None for r in packed) and len({r.n_in for r in packed}) == 1:
                merged = self._merged[tuple(ws)] = cpu_repack.MergedCall(packed)
        if merged is not None:  # decode steps too: one parallel call for Q, K and V
            ys = merged(x)
        elif exact_rows or x.shape[0] == 1 or not all(isinstance(w, kernels.QMatrix) for w in ws):
            return [self.linear(w, x, b, exact_rows) for w, b in zip(ws, biases)]
        else:
            ys = kernels.matmul_many(ws, x)
        for y, b in zip(ys, biases):
            if b is not None:
                y += b
        return ys

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: np.ndarray, neox: bool) -> None:
        """In place on x [M, H, D], row m at position pos[m]."""
        _rope(x, cos, sin, pos, neox)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """silu(gate) * up, computed into gate."""
        _glu(gate, up, False)
        return gate

    def geglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """gelu_tanh(gate) * up, computed into gate."""
        _glu(gate, up, True)
        return gate

    def add_(self, x: np.ndarray, y: np.ndarray) -> None:
        """Residual add in place."""
        x += y

    def scale_(self, x: np.ndarray, s: float) -> None:
        """x *= s in place."""
        x *= np.float32(s)


# host storage of each KV type: (data dtype, data columns per head_dim value, has fp16 scales)
_CPU_KV_STORAGE: dict[str, tuple[type, int, bool]] = {
    "f32": (np.float32, 1, False), "f16": (np.uint16, 1, False),
    "q8_0": (np.int8, 1, True), "q4_0": (np.uint8, 2, True),
}
_NO_SCALES = np.zeros((1, 1, 1, 1), dtype=np.uint16)


def _one_chunk(slots: np.ndarray, pos: np.ndarray) -> bool:
    """Whether rows are a prefill chunk for the tiled attention: >= FLASH_MIN_ROWS consecutive positions of one slot."""
    n = slots.shape[0]
    return (n >= FLASH_MIN_ROWS and int(pos[-1]) - int(pos[0]) == n - 1 and bool((slots == slots[0]).all())
            and bool((np.diff(pos) == 1).all()))


class CpuKV:
    """One layer's K and V in host memory: data [slots, Hkv, n_ctx, cols] (+ fp16 block scales); see
    kernels/cpu_attention.py for the layouts."""

    def __init__(self, spec: KVSpec) -> None:
        self.spec = spec
        self.k, self.k_scales = self._alloc(spec.type_k, spec.head_dim_k)
        self.v, self.v_scales = self._alloc(spec.type_v, spec.head_dim_v)
        self.rot_k = hadamard(spec.head_dim_k) if spec.rotates("k") else None  # [Dk, Dk]
        self.rot_v = hadamard(spec.head_dim_v) if spec.rotates("v") else None  # [Dv, Dv]
        self.nbytes = sum(int(a.nbytes) for a in (self.k, self.v, self.k_scales, self.v_scales)
                          if a is not _NO_SCALES)

    def _alloc(self, type_name: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed data and scales for one of K / V (np.zeros: pages are touched only as positions fill)."""
        s = self.spec
        dtype, per_byte, scaled = _CPU_KV_STORAGE[type_name]
        data = np.zeros((s.n_slots, s.n_head_kv, s.n_ctx, dim // per_byte), dtype=dtype)
        scales = (np.zeros((s.n_slots, s.n_head_kv, s.n_ctx, dim // attn.QBLOCK), dtype=np.uint16)
                  if scaled else _NO_SCALES)
        return data, scales

    def store(self, k: np.ndarray, v: np.ndarray, slots: np.ndarray, pos: np.ndarray) -> None:
        """k [M, Hkv, Dk], v [M, Hkv, Dv] -> (slots[m], :, pos[m]) (rotated first when the spec says so)."""
        k = k if self.rot_k is None else k @ self.rot_k
        v = v if self.rot_v is None else v @ self.rot_v
        self._put(self.spec.type_k, self.k, self.k_scales, k, slots, pos)
        self._put(self.spec.type_v, self.v, self.v_scales, v, slots, pos)

    def _cold(self, kernel_set: str) -> bool:
        """Whether ops of a kernel set ("decode": row attention, quantized stores; "prefill": the tiled
        attention of a prompt chunk) run on numpy (ColdKV); never here."""
        return False

    @staticmethod
    def _tiled(q: np.ndarray, slots: np.ndarray, pos: np.ndarray) -> bool:
        """Whether the rows take the tiled prefill attention (cpu_attention.attention_flash)."""
        return _one_chunk(slots, pos) and q.shape[2] % 16 == 0

    def _cold_keys(self, slot: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions 0 .. n - 1 of a slot's K and V as f32 [Hkv, n, D] (for the numpy attention)."""
        s = self.spec
        return (cold.read_keys(s.type_k, self.k, self.k_scales, slot, n),
                cold.read_keys(s.type_v, self.v, self.v_scales, slot, n))

    def _put(self, type_name: str, data: np.ndarray, scales: np.ndarray, x: np.ndarray, slots: np.ndarray,
             pos: np.ndarray) -> None:
        """Write rows x [M, Hkv, D] in the cache type (quantized per 32 values for q8_0 / q4_0)."""
        if type_name in ("f32", "f16"):
            if self._cold("decode"):
                data[slots, :, pos, :] = x if type_name == "f32" else x.astype(np.float16).view(np.uint16)
            else:
                attn.store_rows(np.ascontiguousarray(x, dtype=np.float32), data, slots, pos)
        else:
            x = np.ascontiguousarray(x, dtype=np.float32)
            if self._cold("decode"):  # ggml's reference quantizers in numpy, the same bytes
                q, d = (cold.quantize_q8_0 if type_name == "q8_0" else cold.quantize_q4_0)(x)
                data[slots, :, pos, :] = q
            else:
                d = np.empty((x.shape[0], x.shape[1], x.shape[2] // attn.QBLOCK), dtype=np.float32)
                (attn.store_q8_0 if type_name == "q8_0" else attn.store_q4_0)(x, data, d, slots, pos)
            scales[slots, :, pos, :] = d.astype(np.float16).view(np.uint16)

    def attend(self, q: np.ndarray, slots: np.ndarray, pos: np.ndarray, scale: float | None = None,
               window: int = 0) -> np.ndarray:
        """q [M, H, D] -> [M, H * D]; scale defaults to 1/sqrt(D); window > 0: sliding window of that many keys."""
        if self.rot_k is not None:
            q = np.ascontiguousarray(q @ self.rot_k)  # (q H) . (k H) = q . k
        out = np.empty_like(q)
        last = int(pos[0]) if pos.shape[0] == 1 else int(pos.max())  # numpy's max costs ~1.5 us per decode call
        keys = last + 1 if window <= 0 else min(last + 1, window)
        work = q.shape[0] * self.spec.n_head_kv * keys
        sc = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
        tiled = self._tiled(q, slots, pos)
        if self._cold("prefill" if tiled else "decode"):
            out = cold.attend(q, self._cold_keys, slots, pos, sc, int(window))
        elif tiled:
            attn.attention_flash(q, self.k, self.k_scales, self.v, self.v_scales, attn.F16_TABLE, int(slots[0]),
                                 int(pos[0]), sc, int(window), out, numba.get_num_threads())
        else:
            kernel = attn.attention_parallel if work >= PARALLEL_ATTENTION_MIN else attn.attention_serial
            kernel(q, self.k, self.k_scales, self.v, self.v_scales, attn.F16_TABLE, slots, pos, sc, int(window), out)
        if self.rot_v is not None:
            out = out @ self.rot_v  # sum p (v H) = (sum p v) H; H H = I
        return out.reshape(q.shape[0], -1)


class ColdKV(CpuKV):
    """A CpuKV whose stores and attention run on numpy (kernels/cold.py) while its gate says their compiled
    kernels are not in numba's disk cache yet; same arrays, same layout."""

    def __init__(self, spec: KVSpec, gate: Any) -> None:
        super().__init__(spec)
        self.gate = gate

    def _cold(self, kernel_set: str) -> bool:
        """Whether the gate says that set is not compiled yet."""
        return not getattr(self.gate, kernel_set)


class ColdStartBackend(CpuBackend):
    """The CPU backend of a fresh install: each op runs on numpy + BLAS (kernels/cold.py, nothing to compile)
    until the compiled kernels it needs are in numba's disk cache, then on them (qf.runtime.coldstart).

    The gate is read once per forward pass, at the embedding lookup (a pass runs on one set of kernels): the
    matvec set serves one-row products (most of a decode step's time); the decode set row gathers, norms,
    RoPE, activations, row attention and quantized KV stores; the prefill set the products of several rows
    and the tiled attention of a prompt chunk.
    """

    name = "cpu"

    def __init__(self, gate: Any, n_threads: int | None = None, repack: bool = False,
                 wait_decode: bool = False) -> None:
        """wait_decode: a one-token pass (a decode step) waits for the compiled one-row products instead of
        running on numpy (a large model, where decoding every weight per token costs more than the wait)."""
        super().__init__(n_threads, repack)
        self.gate = gate
        self.wait_decode = bool(wait_decode)

    def _matrix_cold(self, w: Any, m: int) -> bool:
        """Whether a product of m rows with w runs on numpy now (payload weights always run compiled)."""
        return isinstance(w, kernels.QMatrix) and not (self.gate.prefill if m > 1 else self.gate.matvec)

    def set_threads(self, n: int | None = None) -> None:
        """As CpuBackend's, one thread fewer while the compile process runs (it holds a core: a fork-join
        kernel whose thread shares that core waits for it at every barrier)."""
        n = n or self.n_threads
        if n and not self.gate.warm:
            n = max(1, int(n) - 1)
        super().set_threads(n)

    def kv_layer(self, spec: KVSpec) -> CpuKV:
        """One layer's cache, on numpy while the gate says so."""
        return ColdKV(spec, self.gate)

    def embed(self, w: Any, ids: np.ndarray) -> np.ndarray:
        """ids [M] -> rows [M, n_embd]; first re-reads the gate (a forward pass starts here)."""
        self.gate.refresh()
        if self.wait_decode and not self.gate.matvec and np.size(ids) == 1:
            self.gate.wait_decode()
        if self.gate.decode or not isinstance(w, kernels.QMatrix):
            return super().embed(w, ids)
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= w.n_out)):
            return super().embed(w, ids)  # its error message
        return cold.get_rows(w.type, w.data, w.n_in, ids)

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        """[M, n] -> [M, n]."""
        return super().rms_norm(x, w, eps) if self.gate.decode else cold.rms_norm(x, w, eps)

    def linear(self, w: Any, x: np.ndarray, bias: np.ndarray | None = None, exact_rows: bool = False) -> np.ndarray:
        """[M, n_in] -> [M, n_out]; on numpy: a BLAS product per decoded tile (row by row for exact_rows)."""
        if not self._matrix_cold(w, x.shape[0]):
            return super().linear(w, x, bias, exact_rows)
        x = np.ascontiguousarray(x, dtype=np.float32)
        f = cold.matmul_rows if exact_rows and x.shape[0] > 1 else cold.matmul
        with cpu_blas.single_threaded():  # the compile process holds a core: a fork-join BLAS would wait on it
            y = f(w.type, w.data, w.n_in, x)
        if bias is not None:
            y += bias
        return y

    def linears(self, ws: Sequence[Any], x: np.ndarray, biases: Sequence[np.ndarray | None],
                exact_rows: bool = False) -> list[np.ndarray]:
        """One `linear` each while cold, the merged calls once compiled."""
        if any(self._matrix_cold(w, x.shape[0]) for w in ws):
            return [self.linear(w, x, b, exact_rows) for w, b in zip(ws, biases)]
        return super().linears(ws, x, biases, exact_rows)

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: np.ndarray, neox: bool) -> None:
        """In place on x [M, H, D]."""
        (super().rope if self.gate.decode else cold.rope)(x, cos, sin, pos, neox)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """silu(gate) * up, into gate."""
        return super().swiglu(gate, up) if self.gate.decode else cold.swiglu(gate, up)

    def geglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """gelu_tanh(gate) * up, into gate."""
        return super().geglu(gate, up) if self.gate.decode else cold.geglu(gate, up)
