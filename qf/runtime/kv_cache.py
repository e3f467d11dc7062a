"""The key/value cache: one spec, one per-layer object from each layer's backend, tokens per slot.

`KVSpec` is the single source of the cache's shape and types: the backends allocate from it
(`Backend.kv_layer(spec)`) and the planner sizes device memory from it (`KVSpec.layer_bytes`), so the two
cannot disagree. Types (llama.cpp's -ctk / -ctv): f32, f16, q8_0, q4_0, for K and V separately.

A cache has `n_slots` slots of `n_ctx` positions each; a sequence (a session, a request) owns one slot
while it runs. `KVCache.tokens[s]` records what slot s holds, so a request that continues a conversation
reuses the common prefix, and a new request takes the free slot with the longest common prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from qf.format.errors import ModelError


@dataclass(frozen=True)
class KVType:
    """A cache element type: `block` values stored in `block_bytes` bytes."""

    name: str
    block: int
    block_bytes: int


KV_TYPES: dict[str, KVType] = {
    "f32": KVType("f32", 1, 4),
    "f16": KVType("f16", 1, 2),
    "q8_0": KVType("q8_0", 32, 34),
    "q4_0": KVType("q4_0", 32, 18),
}
DEFAULT_KV_TYPE = "f16"  # llama.cpp's default for both K and V


def kv_type(name: str, what: str = "KV cache type") -> KVType:
    """The KVType called name, or ModelError listing the supported ones."""
    t = KV_TYPES.get(str(name).lower()) if isinstance(name, str) else None
    if t is None:
        raise ModelError(f"{what} {name!r} is not supported; use one of {', '.join(KV_TYPES)}")
    return t


@dataclass(frozen=True)
class KVSpec:
    """Shape and element types of one layer's cache (every layer of a model shares it)."""

    n_slots: int
    n_ctx: int  # positions per slot
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    type_k: str = DEFAULT_KV_TYPE
    type_v: str = DEFAULT_KV_TYPE
    hadamard: bool = True  # rotate quantized K / V by a Hadamard matrix before quantizing (llama.cpp does)

    def __post_init__(self) -> None:
        for name in ("n_slots", "n_ctx", "n_head_kv", "head_dim_k", "head_dim_v"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ModelError(f"KV cache {name} must be a positive integer, got {v!r}")
        for which, dim in (("type_k", self.head_dim_k), ("type_v", self.head_dim_v)):
            t = kv_type(getattr(self, which), f"KV cache {which}")
            object.__setattr__(self, which, t.name)
            if dim % t.block:
                raise ModelError(f"KV cache {which} {t.name} needs a head size that is a multiple of {t.block}; "
                                 f"this model's is {dim} (use f16 or f32)")

    def rotates(self, which: str) -> bool:
        """Whether K ("k") or V ("v") is stored rotated: quantized types when hadamard is on."""
        return self.hadamard and getattr(self, which).block > 1

    @property
    def k(self) -> KVType:
        """The key element type."""
        return KV_TYPES[self.type_k]

    @property
    def v(self) -> KVType:
        """The value element type."""
        return KV_TYPES[self.type_v]

    def bytes_per_position(self) -> int:
        """Bytes of K and V of one position in one slot (all kv heads)."""
        k = self.head_dim_k // self.k.block * self.k.block_bytes
        v = self.head_dim_v // self.v.block * self.v.block_bytes
        return self.n_head_kv * (k + v)

    def layer_bytes(self) -> int:
        """Bytes one layer's cache holds: every slot, every position."""
        return self.n_slots * self.n_ctx * self.bytes_per_position()


def hadamard(d: int) -> np.ndarray:
    """An orthonormal, symmetric rotation f32 [d, d]: Walsh-Hadamard blocks of the largest power of two that
    divides d (H @ H = I), so rotating q and k alike keeps q . k, and rotating v is undone on the output."""
    b = d & -d  # largest power of two dividing d
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return np.kron(np.eye(d // b), h / np.sqrt(b)).astype(np.float32)


class LayerKV(Protocol):
    """One layer's cache on its backend's device."""

    nbytes: int

    def store(self, k: Any, v: Any, slots: np.ndarray, pos: np.ndarray) -> None:
        """Write rows k [M, Hkv, Dk], v [M, Hkv, Dv] at (slots[m], pos[m])."""

    def attend(self, q: Any, slots: np.ndarray, pos: np.ndarray, scale: float | None = None,
               window: int = 0) -> Any:
        """Causal GQA attention of rows q [M, H, D]: row m sees positions <= pos[m] of slot slots[m] -> [M, H * D].

        Scores are q.k * scale (default 1/sqrt(D)); window > 0 keeps only keys p - window < t <= p.
        """


class KVCache:
    """Every layer's cache (on that layer's backend) and the tokens each slot holds."""

    def __init__(self, spec: KVSpec, placement: Sequence[Any]) -> None:
        self.spec = spec
        self.layers: list[LayerKV] = [be.kv_layer(spec) for be in placement]
        self.tokens: list[list[int]] = [[] for _ in range(spec.n_slots)]  # tokens[s]: slot s, in position order

    @property
    def n_ctx(self) -> int:
        """Positions per slot."""
        return self.spec.n_ctx

    @property
    def n_slots(self) -> int:
        """Number of slots."""
        return self.spec.n_slots

    def nbytes(self) -> int:
        """Bytes allocated by all layers' caches."""
        return sum(int(layer.nbytes) for layer in self.layers)

    def n_past(self, slot: int = 0) -> int:
        """Filled positions of a slot."""
        return len(self.tokens[slot])

    def common_prefix(self, tokens: Sequence[int], slot: int = 0) -> int:
        """Length of the longest prefix of `tokens` that slot already holds."""
        n = 0
        for a, b in zip(self.tokens[slot], tokens):
            if a != b:
                break
            n += 1
        return n

    def truncate(self, n: int, slot: int = 0) -> None:
        """Forget positions n and later of a slot (they get overwritten by the next tokens)."""
        del self.tokens[slot][n:]

    def append(self, tokens: Sequence[int], slot: int = 0) -> None:
        """Record that `tokens` now occupy the next positions of a slot."""
        self.tokens[slot].extend(int(t) for t in tokens)

    def clear(self, slot: int | None = None) -> None:
        """Forget a slot's contents (every slot when None)."""
        for s in range(self.n_slots) if slot is None else (slot,):
            self.tokens[s].clear()
