"""Device placement planner: which layers go on which device, checked against free memory before any load.

Placement follows llama.cpp (llama-model.cpp, load_tensors):
- gpu_layers=N (-ngl) offloads the last N repeating layers: max(n_layer - N, 0) .. n_layer - 1. The output
  head (output_norm + output) is unit n_layer, so it is offloaded only when N > n_layer.
- The input embedding (token_embd) always stays on the CPU: a row lookup gains nothing from a GPU.
- Tied embeddings (no output.weight): llama.cpp loads the output head as a *duplicate* of token_embd
  (TENSOR_DUPLICATED) in the output layer's buffer. The CPU keeps token_embd for the lookup and an offloaded
  head holds a second copy, so token_embd's bytes count on the CPU always and on the head's GPU as well.
- Several GPUs: the offloaded units (layers, then the head) are cut into contiguous ranges in proportion to
  the tensor_split ratios (default: each GPU's budget); unit u goes to the first GPU whose cumulative share
  exceeds u / n_units (llama.cpp's upper_bound over the normalised split points), in exact fractions.

- Mixture of experts: a layer's expert tensors (ffn_{gate,up,down}_exps) follow their layer unless a tensor
  override (llama.cpp's --override-tensor REGEX=DEVICE; --cpu-moe = "\\.ffn_(up|down|gate)_exps=CPU",
  --n-cpu-moe N = the same for blk.0..N-1) puts them elsewhere; only expert tensors can move apart from their
  layer, and a layer's three together. Their bytes count on their device (mapped on the CPU), and a device
  running experts of layers it does not hold gets their activations: 4 * B * (2*n_embd + 3*n_ff_exp*k).

Memory per device, in bytes:
  weights  sum of the placed tensors' nbytes (GPU layers are uploaded in their packed file format).
  KV       per layer KVSpec.layer_bytes() (qf.runtime.kv_cache, the spec the backends allocate from):
           n_seq * n_ctx * n_head_kv * (bytes of a head_dim_k row of type_k + of a head_dim_v row of type_v),
           f32 4 / f16 2 / q8_0 34/32 / q4_0 18/32 bytes per value, on every device alike; head_dim =
           n_embd / n_head unless {arch}.attention.key_length / value_length say otherwise. Every layer gets
           the full n_ctx (sliding-window layers are not shrunk: conservative).
  compute  activations of one prefill micro-batch of B = min(n_batch, n_ctx) tokens through one layer, f32:
             4 * B * (2*n_embd + n_head*hd_k + n_head_kv*(hd_k + hd_v) + n_head*hd_v + 3*n_ff + n_head*n_ctx)
           (residual and normed input, q, k, v, attention output, gate/up/product, and the n_head x B x n_ctx
           attention scores) on each device that holds a repeating layer;
           + logits 4 * rows * (n_vocab + n_embd) on the device of the output head (rows = B with
           all_logits, else 1: only the last position is sampled);
           + on the CPU the embedding lookup output 4 * B * n_embd;
           + on a GPU, with dequant_scratch, an f16 buffer for its largest quantized weight (2 * elements):
           a GPU matmul may dequantize one weight at a time.
  margin   headroom for the allocator, CUDA libraries and fragmentation. Default: 5% of the budget when the
           budget is a user cap (vram=...), else max(512 MiB, 5% of free memory). An int or size string sets
           bytes, a float in [0, 1) or "N%" a fraction of the budget. Counted only on a GPU that holds tensors.
A GPU fits when weights + KV + compute + margin <= available (free memory, or the vram cap when smaller).
CPU weights stay in the memory-mapped file (page cache): the CPU check is KV + compute <= free RAM; weights
that do not fit as well only give a warning (pages are re-read from disk: slow, not fatal).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

from qf.format.errors import ModelError, PlanError
from qf.format.ggml_types import GGMLType, block_size
from qf.format.hparams import hparams_from_metadata
from qf.format.model_check import TensorDecl, architecture
from qf.format.reader import GGUFFile, TensorInfo, open_gguf
from qf.quant.formats.base import fold_payloads, payload_entries
from qf.runtime.devices import Device, cuda_devices, free_ram
from qf.runtime.kv_cache import DEFAULT_KV_TYPE, KV_TYPES, KVSpec

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_N_BATCH = 512  # llama.cpp's default micro-batch (n_ubatch)
DEFAULT_N_CTX = 4096  # when neither the caller nor the file gives a context length
DEFAULT_MARGIN_BYTES = 512 * MiB
DEFAULT_MARGIN_FRACTION = Fraction(5, 100)
F32_BYTES, F16_BYTES = 4, 2

# size suffix (lower case, without a trailing "b") -> bytes. SI letters are powers of 10, IEC ("Gi") of 2:
# an ambiguous "6G" then means 6e9, the smaller reading, so it can never over-commit a GiB-sized card.
SIZE_UNITS: dict[str, int] = {
    "": 1, "k": 10**3, "ki": 2**10, "m": 10**6, "mi": 2**20,
    "g": 10**9, "gi": 2**30, "t": 10**12, "ti": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)\s*([kmgt]i?)?b?\s*$", re.I)
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.ffn_(gate|up|down)_exps\.")  # llama.cpp's expert tensors (EXPERT_ROLES)

CPU = -1  # device index of the host in a unit assignment


# ---------------------------------------------------------------------------------------------- parsing

def parse_bytes(text: str | int | float) -> int:
    """A size as bytes: 6GiB, 6Gi, 6G (= 6e9), 6GB, 512MiB, 1.5e9, 6e9 or plain bytes."""
    if isinstance(text, bool):
        raise PlanError(f"cannot read {text!r} as a size")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _SIZE_RE.match(str(text))
        if m is None:
            raise PlanError(f"cannot read {text!r} as a size: use e.g. 6GiB, 512MiB, 6G (= 6e9 bytes), "
                            "6e9 or plain bytes")
        value = float(m[1]) * SIZE_UNITS[(m[2] or "").lower()]
    if not math.isfinite(value) or value < 0:
        raise PlanError(f"size {text!r} must be a finite number of bytes >= 0")
    return int(value)


def parse_vram(vram: str | int | Sequence[str | int] | None, n_gpus: int | None) -> list[int] | None:
    """Per-GPU byte caps from one size (every GPU) or a comma list, one per GPU (any count if n_gpus is None)."""
    if vram is None:
        return None
    items = vram.split(",") if isinstance(vram, str) else list(vram) if isinstance(vram, Sequence) else [vram]
    caps = [parse_bytes(v) for v in items]
    if n_gpus is None:
        return caps
    if len(caps) == 1:
        return caps * n_gpus
    if len(caps) != n_gpus:
        raise PlanError(f"vram lists {len(caps)} sizes but {n_gpus} GPU(s) are visible")
    return caps


def parse_split(split: str | Sequence[float] | None, n_gpus: int) -> tuple[Fraction, ...] | None:
    """tensor_split ratios ("3,1" or [3, 1]) padded with zeros to n_gpus; None when absent or all zero."""
    if split is None:
        return None
    items = split.replace("/", ",").split(",") if isinstance(split, str) else list(split)
    try:
        ratios = [Fraction(str(x).strip()) for x in items]
    except (ValueError, ZeroDivisionError):
        raise PlanError(f"tensor_split {split!r}: expected comma-separated non-negative numbers") from None
    if len(ratios) > n_gpus:
        raise PlanError(f"tensor_split {split!r} has {len(ratios)} entries but {n_gpus} GPU(s) are visible")
    if any(r < 0 for r in ratios):
        raise PlanError(f"tensor_split {split!r}: ratios must be >= 0")
    ratios += [Fraction(0)] * (n_gpus - len(ratios))
    return tuple(ratios) if any(ratios) else None


def resolve_margin(margin: int | float | str | None, available: int, capped: bool) -> int:
    """Headroom in bytes for a GPU with `available` bytes (see the module docstring for the default)."""
    if margin is None:
        share = math.ceil(available * DEFAULT_MARGIN_FRACTION)
        return share if capped else max(DEFAULT_MARGIN_BYTES, share)
    if isinstance(margin, str) and margin.strip().endswith("%"):
        try:
            fraction = Fraction(margin.strip()[:-1]) / 100
        except ValueError:
            raise PlanError(f"cannot read margin {margin!r}") from None
        if not 0 <= fraction < 1:
            raise PlanError(f"margin {margin!r}: a percentage must be in [0, 100)")
        return math.ceil(available * fraction)
    if isinstance(margin, float) and 0 <= margin < 1:
        return math.ceil(available * Fraction(str(margin)))  # str: 0.1 means exactly 1/10
    return parse_bytes(margin)


# ----------------------------------------------------------------------------------------- model sizes

@dataclass(frozen=True)
class TensorGroup:
    """Bytes of a set of tensors, and the element count of its largest quantized tensor (0: none)."""

    nbytes: int = 0
    max_dequant_elems: int = 0
    payload_nbytes: int = 0  # the part of nbytes held by payload members (qf.quant.formats), in nbytes too

    def __add__(self, other: TensorGroup) -> TensorGroup:
        return TensorGroup(self.nbytes + other.nbytes, max(self.max_dequant_elems, other.max_dequant_elems),
                           self.payload_nbytes + other.payload_nbytes)


@dataclass(frozen=True)
class ModelSizes:
    """What the planner needs from a model: hyperparameters and the bytes of each placement unit."""

    arch: str
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    layers: tuple[TensorGroup, ...]  # repeating layers blk.{i}.*
    token_embd: TensorGroup  # token_embd* (stays on the CPU)
    output: TensorGroup  # output_norm + output.weight (the latter absent when tied)
    tied: bool  # no output.weight: the head reuses token_embd
    other: TensorGroup = TensorGroup()  # any other non-layer tensor (rope_freqs...): on every device used
    n_ctx_train: int = 0
    experts: tuple[TensorGroup, ...] = ()  # per layer, its ffn_*_exps tensors (empty: a dense model)
    n_ff_exp: int = 0  # rows of one expert's gate / up
    n_expert_used: int = 0  # experts each token runs
    expert_names: tuple[tuple[str, ...], ...] = ()  # per layer, the names of its expert tensors
    names: tuple[str, ...] = ()  # every tensor of the file (for --override-tensor)

    @property
    def n_layer(self) -> int:
        """Number of repeating layers."""
        return len(self.layers)

    @property
    def head(self) -> TensorGroup:
        """The output head as placed on its device: a duplicate of token_embd joins it when tied."""
        return self.output + self.token_embd if self.tied else self.output

    @property
    def file_bytes(self) -> int:
        """Bytes of all tensors in the file (token_embd once)."""
        return (sum(g.nbytes for g in self.layers) + sum(g.nbytes for g in self.experts) + self.token_embd.nbytes
                + self.output.nbytes + self.other.nbytes)


def _tensor_group(ti: TensorInfo) -> TensorGroup:
    """One TensorInfo as a group; quantized means more than one element per block."""
    elems = math.prod(int(d) for d in ti.ne)
    return TensorGroup(int(ti.nbytes), elems if block_size(ti.type) > 1 else 0)


def _payload_members(f: GGUFFile, where: str) -> dict[str, int]:
    """Member tensor name -> elements of the payload weight it belongs to, for every payload of the file (the
    table folded and checked as the runtime loads it)."""
    entries = payload_entries(f.meta, where)
    if not entries:
        return {}
    table = {n: TensorDecl(tuple(int(x) for x in ti.ne), GGMLType(int(ti.type))) for n, ti in f.tensors.items()}
    _, payloads = fold_payloads(f.meta, table, where)
    return {full: pd.n_in * pd.n_out for pd in payloads.values() for full in pd.members.values()}


def _read_hparams(f: GGUFFile, path: str, n_vocab: int) -> dict[str, int | str]:
    """The hyperparameters the planner uses, read by the shared validated reader (qf.format.hparams) that the
    runtime loads with; n_vocab (the head's rows) stands in when the file names no vocabulary."""
    arch = architecture(f.meta, path, f.tensors)
    hp = hparams_from_metadata(f.meta, arch, path, n_vocab_hint=n_vocab)
    return dict(arch=arch, n_layer=hp.n_layer, n_embd=hp.n_embd, n_head=hp.n_head, n_head_kv=hp.n_head_kv,
                head_dim_k=hp.head_dim, head_dim_v=hp.head_dim, n_ff=hp.n_ff, n_ctx_train=hp.n_ctx_train,
                n_vocab=hp.n_vocab, n_ff_exp=hp.n_ff_exp, n_expert_used=hp.n_expert_used)


def _head_rows(f: GGUFFile, where: str) -> int:
    """Rows of the output head (token_embd when tied): the vocabulary."""
    if "token_embd.weight" not in f.tensors:
        raise ModelError(f"{where}: missing tensor 'token_embd.weight'")
    head = f.tensors.get("output.weight") or f.tensors["token_embd.weight"]
    return int(head.ne[1]) if len(head.ne) > 1 else int(head.ne[0])


def sizes_from_gguf(f: GGUFFile, path: str | os.PathLike | None = None) -> ModelSizes:
    """ModelSizes from an open GGUF header (metadata and tensor infos only; tensor data is not touched).
    Expert tensors (ffn_*_exps) are counted apart from the rest of their layer."""
    where = os.fspath(path) if path is not None else "<gguf>"
    hp = _read_hparams(f, where, _head_rows(f, where))
    n_layer = int(hp.pop("n_layer"))
    layers = [TensorGroup()] * n_layer
    experts = [TensorGroup()] * n_layer
    expert_names: list[list[str]] = [[] for _ in range(n_layer)]
    token_embd = output = other = TensorGroup()
    members = _payload_members(f, where)
    for name, ti in f.tensors.items():
        g = _tensor_group(ti)
        if name in members:  # a payload member: its weight is dequantized in tiles like a quantized tensor
            g = TensorGroup(g.nbytes, members[name], g.nbytes)
        m = _LAYER_RE.match(name)
        if m:
            il = int(m[1])
            if il >= n_layer:
                raise ModelError(f"{where}: tensor {name!r} has layer {il} but {hp['arch']}.block_count is {n_layer}")
            if _EXPERT_RE.search(name):
                experts[il] = experts[il] + g
                expert_names[il].append(name)
            else:
                layers[il] = layers[il] + g
        elif name.startswith("token_embd"):
            token_embd = token_embd + g
        elif name.startswith("output"):
            output = output + g
        else:
            other = other + g
    for il, g in enumerate(layers):
        if g.nbytes == 0 and experts[il].nbytes == 0:
            raise ModelError(f"{where}: layer {il} has no tensors (missing blk.{il}.*)")
    return ModelSizes(layers=tuple(layers), token_embd=token_embd, output=output, other=other,
                      tied="output.weight" not in f.tensors,
                      experts=tuple(experts) if any(g.nbytes for g in experts) else (),
                      expert_names=tuple(tuple(n) for n in expert_names), names=tuple(f.tensors), **hp)


# ------------------------------------------------------------------------------------ tensor overrides

EXPERT_PATTERN = r"\.ffn_(up|down|gate)_exps"  # llama.cpp's --cpu-moe / --n-cpu-moe pattern
_DEVICE_RE = re.compile(r"^(cpu|cuda:?(\d+))$", re.I)


@dataclass(frozen=True)
class TensorOverride:
    """`REGEX=DEVICE` (llama.cpp's --override-tensor): tensors whose name the regex searches go to DEVICE."""

    pattern: re.Pattern[str]
    device: str  # "cpu" or "cuda:N"


def parse_device(text: str) -> str:
    """'CPU' / 'cpu' -> 'cpu'; 'CUDA0' / 'cuda:0' -> 'cuda:0'."""
    m = _DEVICE_RE.match(text.strip())
    if m is None:
        raise PlanError(f"unknown device {text!r} in a tensor override; use CPU, CUDA0 or cuda:0")
    return "cpu" if m[2] is None else f"cuda:{int(m[2])}"


def parse_overrides(specs: str | Sequence[str] | None) -> tuple[TensorOverride, ...]:
    """`REGEX=DEVICE` items (several per string, comma-separated, as llama.cpp's -ot takes them)."""
    if not specs:
        return ()
    out = []
    for spec in [specs] if isinstance(specs, str) else specs:
        for item in str(spec).split(","):
            regex, sep, device = item.rpartition("=")
            if not sep or not regex:
                raise PlanError(f"tensor override {item!r}: expected REGEX=DEVICE, e.g. exps=CPU")
            try:
                out.append(TensorOverride(re.compile(regex), parse_device(device)))
            except re.error as e:
                raise PlanError(f"tensor override {item!r}: bad regex: {e}") from None
    return tuple(out)


def moe_overrides(cpu_moe: bool = False, n_cpu_moe: int = 0) -> tuple[TensorOverride, ...]:
    """--cpu-moe (every layer's experts on the CPU) and --n-cpu-moe N (the first N layers'), as llama.cpp
    builds them."""
    if not isinstance(n_cpu_moe, int) or isinstance(n_cpu_moe, bool) or n_cpu_moe < 0:
        raise PlanError(f"n_cpu_moe must be an integer >= 0, got {n_cpu_moe!r}")
    out = [TensorOverride(re.compile(EXPERT_PATTERN), "cpu")] if cpu_moe else []
    out += [TensorOverride(re.compile(rf"blk\.{i}{EXPERT_PATTERN}"), "cpu") for i in range(n_cpu_moe)]
    return tuple(out)


def _override_of(name: str, overrides: Sequence[TensorOverride]) -> str | None:
    """The device of the first override whose regex finds the name (llama.cpp's order), or None."""
    return next((o.device for o in overrides if o.pattern.search(name)), None)


def expert_units(s: ModelSizes, overrides: Sequence[TensorOverride]) -> tuple[str | None, ...]:
    """Per layer: the device its experts are overridden to (None: with their layer). Only expert tensors can
    be placed apart from their layer (the forward runs them on their own backend); all three of a layer go
    together."""
    expert = {n for names in s.expert_names for n in names}
    others = [n for n in s.names if n not in expert and _override_of(n, overrides) is not None]
    if others:
        raise PlanError(f"tensor override matches {others[0]!r}: only expert tensors (ffn_*_exps) can be placed "
                        "apart from their layer here; place layers with gpu_layers / -ngl")
    out = []
    for il, names in enumerate(s.expert_names or ((),) * s.n_layer):
        devices = {_override_of(n, overrides) for n in names}
        if len(devices) > 1:
            raise PlanError(f"tensor overrides split the experts of layer {il} ({', '.join(names)}) over "
                            f"{sorted(map(str, devices))}: place a layer's three expert tensors together")
        out.append(devices.pop() if devices else None)
    return tuple(out)


# -------------------------------------------------------------------------------------- memory formulas

@dataclass(frozen=True)
class PlanConfig:
    """Runtime settings that size the KV cache and compute buffers."""

    n_ctx: int
    n_batch: int = DEFAULT_N_BATCH
    kv_dtype: str | None = None  # sets type_k and type_v together (when given)
    margin: int | float | str | None = None
    all_logits: bool = False
    dequant_scratch: bool = True
    type_k: str = DEFAULT_KV_TYPE
    type_v: str = DEFAULT_KV_TYPE
    n_seq: int = 1  # KV slots

    def __post_init__(self) -> None:
        if not isinstance(self.n_ctx, int) or self.n_ctx <= 0:
            raise PlanError(f"context length must be a positive integer, got {self.n_ctx!r}")
        if not isinstance(self.n_batch, int) or self.n_batch <= 0:
            raise PlanError(f"batch size must be a positive integer, got {self.n_batch!r}")
        if not isinstance(self.n_seq, int) or self.n_seq <= 0:
            raise PlanError(f"n_seq must be a positive integer, got {self.n_seq!r}")
        if self.kv_dtype is not None:
            object.__setattr__(self, "type_k", self.kv_dtype)
            object.__setattr__(self, "type_v", self.kv_dtype)
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in KV_TYPES:
                raise PlanError(f"KV cache type {getattr(self, name)!r} is not supported; use one of {', '.join(KV_TYPES)}")

    @property
    def kv_types(self) -> str:
        """"f16", or "q8_0/f16" when K and V differ."""
        return self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"

    @property
    def batch(self) -> int:
        """Tokens in one prefill micro-batch."""
        return min(self.n_batch, self.n_ctx)


def kv_spec(s: ModelSizes, cfg: PlanConfig) -> KVSpec:
    """The KV cache spec the backends will allocate from."""
    return KVSpec(cfg.n_seq, cfg.n_ctx, s.n_head_kv, s.head_dim_k, s.head_dim_v, cfg.type_k, cfg.type_v)


def kv_bytes_per_layer(s: ModelSizes, cfg: PlanConfig) -> int:
    """K and V cache of one layer, every slot (KVSpec.layer_bytes)."""
    try:
        return kv_spec(s, cfg).layer_bytes()
    except ModelError as e:
        raise PlanError(str(e)) from e


def activation_bytes(s: ModelSizes, cfg: PlanConfig) -> int:
    """f32 live set of one layer's prefill over a micro-batch (formula in the module docstring)."""
    per_token = (2 * s.n_embd + s.n_head * s.head_dim_k + s.n_head_kv * (s.head_dim_k + s.head_dim_v)
                 + s.n_head * s.head_dim_v + 3 * s.n_ff + s.n_head * cfg.n_ctx)
    return F32_BYTES * cfg.batch * per_token


def logits_bytes(s: ModelSizes, cfg: PlanConfig) -> int:
    """f32 logits plus the head's input rows: rows = micro-batch with all_logits, else 1."""
    rows = cfg.batch if cfg.all_logits else 1
    return F32_BYTES * rows * (s.n_vocab + s.n_embd)


def expert_bytes(s: ModelSizes, cfg: PlanConfig) -> int:
    """f32 live set of the experts of one layer run away from it: input rows, gate/up/product of the
    selected experts and the output, for one micro-batch."""
    return F32_BYTES * cfg.batch * (2 * s.n_embd + 3 * s.n_ff_exp * max(1, s.n_expert_used))


def embedding_bytes(s: ModelSizes, cfg: PlanConfig) -> int:
    """f32 output of the token embedding lookup for one micro-batch (on the CPU)."""
    return F32_BYTES * cfg.batch * s.n_embd


# ---------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class DeviceUsage:
    """Memory breakdown of one device under a plan (bytes)."""

    device: str
    layers: tuple[int, ...]
    has_output: bool
    weights: int
    kv: int
    compute: int
    margin: int
    available: int | None  # None: unknown (not checked)
    mapped_weights: bool = False  # CPU: weights stay in the mmap and are not counted in `required`
    experts: int = 0  # bytes of expert tensors among `weights`
    expert_layers: tuple[int, ...] = ()  # layers whose experts are on this device

    @property
    def required(self) -> int:
        """Bytes that must be allocatable on this device."""
        return self.kv + self.compute + self.margin + (0 if self.mapped_weights else self.weights)

    @property
    def fits(self) -> bool:
        """True when the required bytes are within the available ones."""
        return self.available is None or self.required <= self.available


@dataclass(frozen=True)
class Plan:
    """A placement: the device of every layer and of the head, and each device's memory breakdown."""

    arch: str
    n_layer: int
    n_ctx: int
    n_batch: int
    kv_dtype: str
    gpu_layers: int  # the -ngl value used, 0 .. n_layer + 1
    requested: int | str  # what was asked: an int, "auto" or "all"
    layer_devices: tuple[str, ...]
    output_device: str
    embd_device: str
    usage: tuple[DeviceUsage, ...]  # GPUs in order, then "cpu"
    warnings: tuple[str, ...] = ()
    hypothetical: bool = False  # planned for a GPU that is not visible (vram given, no CUDA)
    expert_devices: tuple[str, ...] = ()  # per layer, the device of its experts (empty: a dense model)

    @property
    def n_gpu_layers(self) -> int:
        """Repeating layers placed on a GPU."""
        return sum(d != "cpu" for d in self.layer_devices)

    @property
    def fits(self) -> bool:
        """True when every device has room."""
        return all(u.fits for u in self.usage)

    def device_usage(self, device: str) -> DeviceUsage:
        """The breakdown of one device by name."""
        for u in self.usage:
            if u.device == device:
                return u
        raise KeyError(device)

    def summary(self) -> str:
        """One line, e.g. '22/30 layers on GPU (cuda:0: 8-29), output head on CPU'."""
        gpus = [u for u in self.usage if u.device != "cpu" and u.layers]
        ranges = ", ".join(f"{u.device}: {_ranges(u.layers)}" for u in gpus)
        head = "CPU" if self.output_device == "cpu" else self.output_device
        apart = [i for i, (d, x) in enumerate(zip(self.layer_devices, self.expert_devices)) if d != x]
        moved = f", experts of {len(apart)} of them on the CPU" if apart and all(
            self.expert_devices[i] == "cpu" for i in apart) else f", experts of {len(apart)} layers apart" if apart else ""
        return (f"{self.n_gpu_layers}/{self.n_layer} layers on GPU" + (f" ({ranges})" if ranges else "")
                + moved + f", output head on {head}")


def _ranges(layers: Sequence[int]) -> str:
    """Contiguous runs of layer numbers: (0, 1, 2, 5) -> '0-2, 5'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


@dataclass(frozen=True)
class _Budget:
    """One GPU as the planner sees it: bytes it may use, headroom, and its split share."""

    name: str
    available: int
    margin: int
    share: Fraction


def _budgets(gpus: Sequence[Device], vram: str | int | Sequence[str | int] | None, margin: int | float | str | None,
             split: str | Sequence[float] | None) -> tuple[list[_Budget], bool]:
    """GPU budgets after the vram caps; with caps but no visible GPU, one hypothetical GPU per cap."""
    hypothetical = not gpus and vram is not None
    if hypothetical:
        gpus = [Device(f"cuda:{k}", cap) for k, cap in enumerate(parse_vram(vram, None))]
    caps = parse_vram(vram, len(gpus))
    ratios = parse_split(split, len(gpus))
    out = []
    for k, d in enumerate(gpus):
        capped = caps is not None and (hypothetical or caps[k] <= d.free)
        avail = caps[k] if capped else int(d.free)
        share = ratios[k] if ratios else Fraction(avail)
        out.append(_Budget(d.name, avail, resolve_margin(margin, avail, capped), share))
    if out and not any(b.share for b in out):  # every budget is 0: split evenly (nothing will fit anyway)
        out = [_Budget(b.name, b.available, b.margin, Fraction(1)) for b in out]
    return out, hypothetical


def assign_units(n_layer: int, n_gpu_layers: int, shares: Sequence[Fraction]) -> tuple[int, ...]:
    """Device index (CPU = -1) of units 0..n_layer (unit n_layer is the head), as llama.cpp's -ngl/-ts."""
    start = max(n_layer - n_gpu_layers, 0)
    n_units = min(n_gpu_layers, n_layer + 1) if shares else 0
    total = sum(shares, Fraction(0))
    bounds, acc = [], Fraction(0)
    for s in shares:
        acc += s
        bounds.append(acc / total if total else Fraction(1))
    units = []
    for u in range(n_layer + 1):
        if u < start or u - start >= n_units:
            units.append(CPU)
        else:
            x = Fraction(u - start, n_units)
            units.append(next(k for k, b in enumerate(bounds) if b > x))
    return tuple(units)


def _device_usage(s: ModelSizes, cfg: PlanConfig, units: tuple[int, ...], xunits: tuple[int, ...], dev: int,
                  budget: _Budget | None, ram: int | None) -> DeviceUsage:
    """The breakdown of device `dev` (CPU when budget is None) under a unit assignment (xunits: the device of
    each layer's experts)."""
    layers = tuple(i for i in range(s.n_layer) if units[i] == dev)
    xlayers = tuple(i for i in range(len(s.experts)) if xunits[i] == dev)
    has_output = units[s.n_layer] == dev
    groups = [s.layers[i] for i in layers] + [s.experts[i] for i in xlayers]
    compute = activation_bytes(s, cfg) if layers else 0
    compute += expert_bytes(s, cfg) if any(units[i] != dev for i in xlayers) else 0
    compute += logits_bytes(s, cfg) if has_output else 0
    if budget is None:
        groups += [s.token_embd, s.other] + ([s.output] if has_output else [])
        compute += embedding_bytes(s, cfg)
        margin, available, name = 0, ram, "cpu"
    else:
        used = bool(layers) or bool(xlayers) or has_output
        groups += ([s.head] if has_output else []) + ([s.other] if used else [])
        biggest = max((g.max_dequant_elems for g in groups), default=0)
        compute += F16_BYTES * biggest if cfg.dequant_scratch and used else 0
        margin, available, name = (budget.margin if used else 0), budget.available, budget.name
    return DeviceUsage(name, layers, has_output, sum(g.nbytes for g in groups),
                       kv_bytes_per_layer(s, cfg) * len(layers), compute, margin, available,
                       mapped_weights=budget is None, experts=sum(s.experts[i].nbytes for i in xlayers),
                       expert_layers=xlayers)


def _plan_for(s: ModelSizes, cfg: PlanConfig, budgets: list[_Budget], ram: int | None, n: int,
              requested: int | str, hypothetical: bool, xdev: tuple[str | None, ...] = ()) -> Plan:
    """The plan for -ngl n over the given GPU budgets (no fit check); xdev: per layer, the device its experts
    are overridden to (None: with the layer)."""
    n = min(n, s.n_layer + 1)
    units = assign_units(s.n_layer, n, [b.share for b in budgets])
    names = [b.name for b in budgets]
    index = {name: k for k, name in enumerate(names)} | {"cpu": CPU}
    for d in dict.fromkeys(x for x in xdev if x is not None):
        if d not in index:
            raise PlanError(f"a tensor override names {d} but the plan's devices are {', '.join(['cpu', *names])}")
    xunits = tuple(units[i] if i >= len(xdev) or xdev[i] is None else index[xdev[i]] for i in range(len(s.experts)))
    usage = [_device_usage(s, cfg, units, xunits, k, b, ram) for k, b in enumerate(budgets)]
    usage.append(_device_usage(s, cfg, units, xunits, CPU, None, ram))
    dev_name = (lambda k: "cpu" if k == CPU else names[k])
    return Plan(arch=s.arch, n_layer=s.n_layer, n_ctx=cfg.n_ctx, n_batch=cfg.batch, kv_dtype=cfg.kv_types,
                gpu_layers=n, requested=requested, layer_devices=tuple(dev_name(k) for k in units[:-1]),
                output_device=dev_name(units[-1]), embd_device="cpu", usage=tuple(usage),
                warnings=_warnings(s, cfg, usage, hypothetical), hypothetical=hypothetical,
                expert_devices=tuple(dev_name(k) for k in xunits))


def _warnings(s: ModelSizes, cfg: PlanConfig, usage: list[DeviceUsage], hypothetical: bool) -> tuple[str, ...]:
    """Non-fatal remarks: context beyond training, CPU weights beyond free RAM, a what-if GPU."""
    out = []
    if s.n_ctx_train and cfg.n_ctx > s.n_ctx_train:
        out.append(f"context {cfg.n_ctx} exceeds the model's training context {s.n_ctx_train}")
    cpu = usage[-1]
    if cpu.available is not None and cpu.fits and cpu.required + cpu.weights > cpu.available:
        out.append(f"CPU weights ({fmt_bytes(cpu.weights)}) do not also fit in free RAM "
                   f"({fmt_bytes(cpu.available)}): pages will be re-read from disk (slow)")
    if hypothetical:
        out.append("no CUDA device visible: planned for hypothetical GPU(s) of the given vram size")
    return tuple(out)


def _parse_gpu_layers(gpu_layers: int | str) -> int | str:
    """'auto', 'all' (= every layer and the head) or an integer >= 0."""
    if isinstance(gpu_layers, str):
        g = gpu_layers.strip().lower()
        if g in ("auto", "all"):
            return g
        if g.isdigit():
            return int(g)
    elif isinstance(gpu_layers, int) and not isinstance(gpu_layers, bool) and gpu_layers >= 0:
        return gpu_layers
    raise PlanError(f"gpu_layers must be 'auto', 'all' or an integer >= 0, got {gpu_layers!r}")


def plan_placement(sizes: ModelSizes, cfg: PlanConfig, gpus: Sequence[Device] = (), ram: int | None = None,
                   gpu_layers: int | str = "auto", tensor_split: str | Sequence[float] | None = None,
                   vram: str | int | Sequence[str | int] | None = None,
                   overrides: Sequence[TensorOverride] = ()) -> Plan:
    """Place a model: gpu_layers=N as llama.cpp's -ngl (PlanError if it does not fit), or 'auto' (most that fit);
    overrides (parse_overrides, moe_overrides) move expert tensors off their layer's device."""
    want = _parse_gpu_layers(gpu_layers)
    budgets, hypothetical = _budgets(gpus, vram, cfg.margin, tensor_split)
    xdev = expert_units(sizes, overrides) if overrides else ()
    top = sizes.n_layer + 1 if budgets else 0
    if want == "auto":
        for n in range(top, -1, -1):
            plan = _plan_for(sizes, cfg, budgets, ram, n, "auto", hypothetical, xdev)
            if plan.fits:
                return plan
        raise PlanError(_explain(plan, sizes, cfg, budgets, ram, hypothetical, xdev))
    n = sizes.n_layer + 1 if want == "all" else want
    if n > 0 and not budgets:
        raise PlanError(f"gpu_layers={gpu_layers} asks for a GPU but no CUDA device is visible (torch with CUDA "
                        "is not importable or finds no device); use gpu_layers=0, or pass vram= to plan for one")
    plan = _plan_for(sizes, cfg, budgets, ram, n, gpu_layers, hypothetical, xdev)
    if not plan.fits:
        raise PlanError(_explain(plan, sizes, cfg, budgets, ram, hypothetical, xdev))
    return plan


# ------------------------------------------------------------------------------------------ diagnostics

def _largest_fitting(sizes: ModelSizes, cfg: PlanConfig, budgets: list[_Budget], ram: int | None,
                     hypothetical: bool, xdev: tuple[str | None, ...] = ()) -> int | None:
    """The largest -ngl that fits with this config, or None when not even 0 does."""
    for n in range(sizes.n_layer + 1 if budgets else 0, -1, -1):
        if _plan_for(sizes, cfg, budgets, ram, n, n, hypothetical, xdev).fits:
            return n
    return None


def _largest_context(sizes: ModelSizes, cfg: PlanConfig, budgets: list[_Budget], ram: int | None, n: int,
                     hypothetical: bool, xdev: tuple[str | None, ...] = ()) -> int:
    """The largest context (a multiple of 256 when >= 256) with which -ngl n fits; 0 when none does."""
    lo, hi = 0, cfg.n_ctx - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _plan_for(sizes, replace(cfg, n_ctx=mid), budgets, ram, n, n, hypothetical, xdev).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo - lo % 256 if lo >= 256 else lo


def _explain(plan: Plan, sizes: ModelSizes, cfg: PlanConfig, budgets: list[_Budget], ram: int | None,
             hypothetical: bool, xdev: tuple[str | None, ...] = ()) -> str:
    """Why a plan does not fit: required vs available bytes on the first full device, and what to change."""
    bad = next(u for u in plan.usage if not u.fits)
    parts = f"KV {fmt_bytes(bad.kv)} + compute {fmt_bytes(bad.compute)}"
    if bad.mapped_weights:
        head = (f"the CPU part (gpu_layers={plan.gpu_layers}, n_ctx={cfg.n_ctx}) needs {bad.required} bytes "
                f"({fmt_bytes(bad.required)}: {parts}) of RAM but {bad.available} bytes "
                f"({fmt_bytes(bad.available)}) are available")
    else:
        head = (f"gpu_layers={plan.requested} (n_ctx={cfg.n_ctx}, KV {cfg.kv_types}) does not fit on "
                f"{bad.device}: requires {bad.required} bytes ({fmt_bytes(bad.required)} = weights "
                f"{fmt_bytes(bad.weights)} + {parts} + margin {fmt_bytes(bad.margin)}) but {bad.available} "
                f"bytes ({fmt_bytes(bad.available)}) are available")
    hints = []
    ctx = _largest_context(sizes, cfg, budgets, ram, plan.gpu_layers, hypothetical, xdev)
    if ctx:
        hints.append(f"a smaller context (at most -c {ctx} with these layers)")
    best = _largest_fitting(sizes, cfg, budgets, ram, hypothetical, xdev)
    if bad.mapped_weights:
        hints.append("more GPU layers" if budgets else "a machine with more free RAM")
    elif best:
        hints.append(f"fewer GPU layers (at most {best} fit at this context)")
    elif best == 0:
        hints.append("fewer GPU layers (none fit at this context)")
    if sizes.experts and not bad.mapped_weights and bad.experts:
        hints.append("expert tensors on the CPU (--cpu-moe or --n-cpu-moe N)")
    hints.append("a smaller quantization type or KV cache type")
    options = hints[0] if len(hints) == 1 else f"{', '.join(hints[:-1])} or {hints[-1]}"
    return f"{head}; try {options}"


# -------------------------------------------------------------------------------------------- printing

def fmt_bytes(n: int | None) -> str:
    """Human-readable bytes in powers of 1024: '512 B', '1.50 KiB', '63.41 MiB', '7.80 GiB'."""
    if n is None:
        return "?"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_plan(plan: Plan) -> str:
    """The plan as a printable table: layer ranges per device, then each device's memory breakdown."""
    lines = [f"plan: {plan.arch}, {plan.n_layer} layers, n_ctx {plan.n_ctx}, batch {plan.n_batch}, "
             f"KV {plan.kv_dtype}, gpu_layers {plan.gpu_layers} (requested {plan.requested})"]
    for dev in dict.fromkeys(plan.layer_devices):
        layers = [i for i, d in enumerate(plan.layer_devices) if d == dev]
        lines.append(f"  {'layers ' + _ranges(layers):<24} -> {dev}")
    for dev in dict.fromkeys(plan.expert_devices):
        layers = [i for i, d in enumerate(plan.expert_devices) if d == dev]
        lines.append(f"  {'experts ' + _ranges(layers):<24} -> {dev}")
    lines.append(f"  {'token_embd':<24} -> {plan.embd_device}")
    lines.append(f"  {'output head':<24} -> {plan.output_device}")
    moe = bool(plan.expert_devices)
    cols = ("device", "layers", "weights") + (("of which experts",) if moe else ()) + (
        "KV", "compute", "margin", "total", "available", "")
    rows = [cols]
    for u in plan.usage:
        weights = fmt_bytes(u.weights) + ("*" if u.mapped_weights else "")
        experts = (f"{fmt_bytes(u.experts)} ({len(u.expert_layers)} layers)",) if moe else ()
        rows.append((u.device, str(len(u.layers)) + ("+out" if u.has_output else ""), weights, *experts,
                     fmt_bytes(u.kv), fmt_bytes(u.compute), fmt_bytes(u.margin), fmt_bytes(u.required),
                     fmt_bytes(u.available), "ok" if u.fits else "DOES NOT FIT"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append("  * CPU weights stay in the memory-mapped file (page cache) and are not in its total")
    lines += [f"  warning: {w}" for w in plan.warnings]
    lines.append(plan.summary())
    return "\n".join(lines)


def repack_ram(path: str | os.PathLike) -> tuple[int, dict[str, int]]:
    """RAM that repacking (`--repack`, kernels/cpu_repack.py) takes for a file's matrices, from its header:
    (bytes, bytes per ggml type name). Every 2-D (and expert 3-D) weight of a repacked type counts except an
    embedding table that is only looked up (token_embd when the file has its own output head)."""
    from qf.runtime.kernels.cpu_repack import DEFAULT_TYPES, repack_bytes

    per: dict[str, int] = {}
    with open_gguf(path) as f:
        tied = "output.weight" not in f.tensors
        for name, ti in f.tensors.items():
            if len(ti.ne) < 2 or ti.type not in DEFAULT_TYPES or (name == "token_embd.weight" and not tied):
                continue
            if name.startswith("token_embd") and name != "token_embd.weight":
                continue
            mats = math.prod(ti.ne[2:])
            n = mats * repack_bytes(ti.type, ti.ne[0], ti.ne[1])
            if n:
                per[ti.type.name] = per.get(ti.type.name, 0) + n
    return sum(per.values()), per


def format_repack(path: str | os.PathLike) -> str:
    """One line: the RAM --repack adds beyond the mmap'd file, per type."""
    total, per = repack_ram(path)
    parts = ", ".join(f"{t} {fmt_bytes(n)}" for t, n in sorted(per.items()))
    return f"repack: {fmt_bytes(total)} of RAM for integer panels beyond the mmap'd file ({parts or 'no repacked types'})"


# ----------------------------------------------------------------------------------------------- entry

def plan_from_file(path: str | os.PathLike, n_ctx: int | None = None, gpu_layers: int | str = "auto",
                   vram: str | int | Sequence[str | int] | None = None, devices: Sequence[Device] | None = None,
                   *, ram: int | None = None, tensor_split: str | Sequence[float] | None = None,
                   kv_dtype: str | None = None, n_batch: int = DEFAULT_N_BATCH,
                   margin: int | float | str | None = None, all_logits: bool = False,
                   kv_spec: KVSpec | None = None, type_k: str = DEFAULT_KV_TYPE, type_v: str = DEFAULT_KV_TYPE,
                   n_seq: int = 1, overrides: Sequence[TensorOverride] = ()) -> Plan:
    """Plan a GGUF file from its header alone; devices/ram default to what this machine reports.

    kv_spec (what Model.load passes) sets n_ctx, the KV types and slots; else n_ctx, type_k / type_v (or
    kv_dtype for both) and n_seq do. overrides (parse_overrides / moe_overrides) place expert tensors."""
    with open_gguf(path) as f:
        sizes = sizes_from_gguf(f, path)
    gpus = cuda_devices() if devices is None else [d for d in devices if d.name != "cpu"]
    if kv_spec is not None:
        cfg = PlanConfig(kv_spec.n_ctx, n_batch, None, margin, all_logits, type_k=kv_spec.type_k,
                         type_v=kv_spec.type_v, n_seq=kv_spec.n_slots)
    else:
        cfg = PlanConfig(n_ctx if n_ctx is not None else sizes.n_ctx_train or DEFAULT_N_CTX, n_batch, kv_dtype,
                         margin, all_logits, type_k=type_k, type_v=type_v, n_seq=n_seq)
    return plan_placement(sizes, cfg, gpus, free_ram() if ram is None else ram, gpu_layers, tensor_split, vram,
                          overrides)
