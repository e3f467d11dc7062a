"""Whole-model KLD of repacked products with one or two 8-bit activation parts per matrix role.

The integer path quantizes each product's activations in one 8-bit part (ggml's Q8_0, as llama.cpp) or two
(about 15 bits, cpu_repack.PARTS). One part halves the integer dot products; this measures what it costs in
whole-model KLD against the f32 path (plain CpuBackend decode steps), per role of the product's input:

    qkv     Q, K and V (input: the attention RMSNorm)
    gateup  gate and up (input: the FFN RMSNorm)
    wo      attention output (input: the attention's result)
    down    FFN down (input: the SwiGLU product, heavy-tailed)
    output  the output head (input: the final RMSNorm)

    python benchmarks/bench_int8_parts.py ~/.cache/qf/bench/smollm2-135m-q4_k_m.qf \
        --policy all2 --policy qkv=1,gateup=1 --policy all1

Each policy is given as role=parts pairs (roles not named: two parts); `all1` / `all2` set every role. Two
token sets: the random ids of tests/test_repack.py (48) and the evaluation text's first --text-tokens.
Prefill KLD (one batch, logits of every position) and decode KLD (one step per token) are both printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qf.runtime import Model
from qf.runtime.backend import CpuBackend
from qf.runtime.kernels import cpu, cpu_repack

ROLES = ("qkv", "gateup", "wo", "down", "output")


def parse_policy(text: str) -> dict[str, int]:
    """'all1', 'all2' or 'role=parts,...' -> {role: parts} for every role (default 2)."""
    if text in ("all1", "all2"):
        return {r: int(text[-1]) for r in ROLES}
    policy = {r: 2 for r in ROLES}
    for item in filter(None, text.split(",")):
        role, _, parts = item.partition("=")
        if role not in ROLES or parts not in ("1", "2"):
            raise SystemExit(f"bad policy item {item!r}: roles {ROLES}, parts 1 or 2")
        policy[role] = int(parts)
    return policy


class PartsBackend(CpuBackend):
    """A repacking CpuBackend whose products quantize their activations in policy[role] parts: repacked
    weights through their own MergedCall, the others (prefill of types not repacked) through cpu.INT8_PARTS."""

    def __init__(self, n_threads: int, policy: dict[str, int], n_vocab: int) -> None:
        super().__init__(n_threads, repack=True)
        self.policy, self.n_vocab = policy, n_vocab
        self._calls: dict[tuple[int, ...], cpu_repack.MergedCall] = {}
        self._role: str | None = None  # set while linears() runs

    def _single_role(self, w: Any) -> str:
        """The role of a lone product: the head (n_vocab outputs), FFN down (n_in > 2 n_out) or wo."""
        if self._role is not None:
            return self._role
        if w.n_out == self.n_vocab:
            return "output"
        return "down" if w.n_in > 2 * w.n_out else "wo"

    def _call(self, packed: Sequence[cpu_repack.RepackedMatrix], role: str) -> cpu_repack.MergedCall:
        """The product's call with its role's part count (built once)."""
        key = tuple(id(r) for r in packed)
        c = self._calls.get(key)
        if c is None:
            c = self._calls[key] = cpu_repack.MergedCall(packed, self.policy[role])
        return c

    def linear(self, w: Any, x: np.ndarray, bias: np.ndarray | None = None, exact_rows: bool = False) -> np.ndarray:
        role = self._single_role(w)
        r = self._packed_of(w)
        if r is None:
            old, cpu.INT8_PARTS = cpu.INT8_PARTS, self.policy[role]
            try:
                return super().linear(w, x, bias, exact_rows)
            finally:
                cpu.INT8_PARTS = old
        y = self._call([r], role)(x)[0]
        if bias is not None:
            y += bias
        return y

    def linears(self, ws, x, biases, exact_rows=False):
        role = "qkv" if len(ws) == 3 else "gateup"
        packed = [self._packed_of(w) for w in ws]
        if all(r is not None for r in packed):
            ys = self._call(packed, role)(x)
            for y, b in zip(ys, biases):
                if b is not None:
                    y += b
            return ys
        old, cpu.INT8_PARTS, self._role = cpu.INT8_PARTS, self.policy[role], role
        try:
            return super().linears(ws, x, biases, exact_rows)
        finally:
            cpu.INT8_PARTS, self._role = old, None


def logp(a: np.ndarray) -> np.ndarray:
    """Log-softmax in f64."""
    a = a.astype(np.float64)
    a -= a.max(axis=-1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=-1, keepdims=True))


def kld(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean KL(ref || got) over positions (both log-probabilities)."""
    return float(np.mean(np.sum(np.exp(ref) * (ref - got), axis=-1)))


def steps(model: Model, ids: Sequence[int]) -> np.ndarray:
    """Logits of one decode step per token from an empty cache."""
    eng = model.engine
    eng.cache.clear()
    return np.stack([eng.step(int(t)) for t in ids])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--policy", action="append", default=[], help="all1, all2 or role=parts,... (repeatable)")
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--no-decode", action="store_true", help="prefill KLD only")
    a = ap.parse_args()
    policies = a.policy or ["all2", "all1"]
    from qf.eval.text import evaluation_text

    n_ctx = max(64, a.text_tokens + 8)
    with Model.load(a.model, n_ctx=n_ctx, n_threads=2, cpu_backend=CpuBackend(2)) as base:
        sets = {"random48": [int(t) for t in np.random.default_rng(9).integers(100, 40000, 48)],
                "text": base.tokenize(evaluation_text())[:a.text_tokens]}
        ref = {k: logp(steps(base, v)) for k, v in sets.items()}
        n_vocab = base.n_vocab
    for text in policies:
        pol = parse_policy(text)
        be = PartsBackend(2, pol, n_vocab)
        with Model.load(a.model, n_ctx=n_ctx, n_threads=2, cpu_backend=be) as m:
            out = []
            for k, ids in sets.items():
                out.append(f"{k} prefill {kld(ref[k], logp(m.logits(ids))):.2e}")
                if not a.no_decode:
                    out.append(f"decode {kld(ref[k], logp(steps(m, ids))):.2e}")
        print(f"{text:40s} " + "  ".join(out), flush=True)


if __name__ == "__main__":
    main()
