"""Which tensors a model file holds: the role vocabulary (GGUF name template, shape from hyperparameters) and
`ModelArch`, one architecture's table of roles (data only).

Each architecture declares its `ModelArch` in one module of qf.format.arch (discovered there); the shared
validator (qf.format.model_check) and the runtime's loader (qf.runtime.weights) read the tables from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping


@dataclass(frozen=True)
class Role:
    """One tensor of a model: GGUF name template ("{i}" is the layer), ne as HParams attribute names (ne[0]
    innermost), and whether a file must hold it."""

    template: str
    dims: tuple[str, ...]
    required: bool = True

    def optional(self) -> "Role":
        """The same tensor, absent allowed."""
        return replace(self, required=False)

    def shaped(self, *dims: str) -> "Role":
        """The same name with another shape (e.g. phi3's fused gate+up under ffn_up)."""
        return replace(self, dims=dims)


# Role vocabulary: the names llama.cpp's gguf-py gives (MODEL_TENSOR -> TENSOR_NAMES).
LAYER_ROLES: dict[str, Role] = {
    "attn_norm": Role("blk.{i}.attn_norm.weight", ("n_embd",)),
    "wq": Role("blk.{i}.attn_q.weight", ("n_embd", "q_dim")),
    "wk": Role("blk.{i}.attn_k.weight", ("n_embd", "kv_dim")),
    "wv": Role("blk.{i}.attn_v.weight", ("n_embd", "kv_dim")),
    "wqkv": Role("blk.{i}.attn_qkv.weight", ("n_embd", "qkv_dim")),  # phi3: q, k, v rows stacked
    "wo": Role("blk.{i}.attn_output.weight", ("q_dim", "n_embd")),
    "bq": Role("blk.{i}.attn_q.bias", ("q_dim",)),
    "bk": Role("blk.{i}.attn_k.bias", ("kv_dim",)),
    "bv": Role("blk.{i}.attn_v.bias", ("kv_dim",)),
    "attn_q_norm": Role("blk.{i}.attn_q_norm.weight", ("head_dim",)),  # per-head QK RMSNorm
    "attn_k_norm": Role("blk.{i}.attn_k_norm.weight", ("head_dim",)),
    "attn_post_norm": Role("blk.{i}.post_attention_norm.weight", ("n_embd",)),  # gemma3: sandwich norms
    "ffn_norm": Role("blk.{i}.ffn_norm.weight", ("n_embd",)),
    "w_gate": Role("blk.{i}.ffn_gate.weight", ("n_embd", "n_ff")),
    "w_up": Role("blk.{i}.ffn_up.weight", ("n_embd", "n_ff")),
    "w_down": Role("blk.{i}.ffn_down.weight", ("n_ff", "n_embd")),
    "ffn_post_norm": Role("blk.{i}.post_ffw_norm.weight", ("n_embd",)),
    # mixture of experts: the router and the experts' matrices stacked on a third axis
    "w_gate_inp": Role("blk.{i}.ffn_gate_inp.weight", ("n_embd", "n_expert")),
    "w_gate_exps": Role("blk.{i}.ffn_gate_exps.weight", ("n_embd", "n_ff_exp", "n_expert")),
    "w_up_exps": Role("blk.{i}.ffn_up_exps.weight", ("n_embd", "n_ff_exp", "n_expert")),
    "w_down_exps": Role("blk.{i}.ffn_down_exps.weight", ("n_ff_exp", "n_embd", "n_expert")),
}

GLOBAL_ROLES: dict[str, Role] = {
    "tok_embd": Role("token_embd.weight", ("n_embd", "n_vocab")),
    "output_norm": Role("output_norm.weight", ("n_embd",)),
    "output": Role("output.weight", ("n_embd", "n_vocab"), False),  # absent: tied to token_embd
    "rope_freqs": Role("rope_freqs.weight", ("n_rot_pairs",), False),  # llama3 rope scaling factors
    "rope_factors_long": Role("rope_factors_long.weight", ("n_rot_pairs",), False),  # phi3 LongRoPE
    "rope_factors_short": Role("rope_factors_short.weight", ("n_rot_pairs",), False),
}

EXPERT_ROLES = ("w_gate_exps", "w_up_exps", "w_down_exps")  # the large matrices --cpu-moe keeps on the CPU
ROPE_FACTOR_ROLES = ("rope_freqs", "rope_factors_long", "rope_factors_short")  # per-frequency divisors > 0


def roles(names: tuple[str, ...], optional: tuple[str, ...] = (), **shaped: tuple[str, ...]) -> dict[str, Role]:
    """A table from the vocabulary: `names` required, `optional` may be absent, `shaped` overrides dims."""
    out: dict[str, Role] = {}
    for n in names + optional:
        r = LAYER_ROLES.get(n) or GLOBAL_ROLES[n]
        r = r.shaped(*shaped[n]) if n in shaped else r
        out[n] = r.optional() if n in optional else replace(r, required=r.required or n in names)
    return out


DENSE_FFN = ("w_gate", "w_up", "w_down")
MOE_FFN = ("w_gate_inp",) + EXPERT_ROLES
STD_GLOBALS = roles(("tok_embd", "output_norm"), ("output", "rope_freqs"))


@dataclass(frozen=True)
class ModelArch:
    """One GGUF architecture (general.architecture) as its files hold it.

    layer: the roles of a dense block; with `{arch}.expert_count` > 0 the `dense_ffn` roles are replaced by
    `moe` (an architecture without `moe` refuses experts). shared_inputs: (the norm, the linears reading its
    output) pairs, for algorithms that fold or scale a shared input (AWQ, residual rotation).
    """

    name: str
    layer: Mapping[str, Role]
    globals: Mapping[str, Role] = field(default_factory=lambda: STD_GLOBALS)
    moe: Mapping[str, Role] | None = None
    dense_ffn: tuple[str, ...] = DENSE_FFN
    rope_neox: bool = False  # rotate (i, i + n_rot/2) pairs (llama.cpp LLAMA_ROPE_TYPE_NEOX)
    expert_weights_norm: bool = True  # top-k router weights renormalised to sum 1
    needs_experts: bool = False  # a file without {arch}.expert_count is not of this architecture
    shared_inputs: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def layer_roles(self, n_expert: int) -> Mapping[str, Role] | None:
        """The roles of one block; None when the file has experts and this architecture has no MoE form."""
        if n_expert <= 0:
            return None if self.needs_experts else self.layer
        if self.moe is None:
            return None
        return {**{r: v for r, v in self.layer.items() if r not in self.dense_ffn}, **self.moe}

    def all_roles(self) -> set[str]:
        """Every role any form of this architecture reads."""
        return set(self.globals) | set(self.layer) | set(self.moe or {})


VECTOR_ROLES = frozenset(r for table in (LAYER_ROLES, GLOBAL_ROLES) for r, v in table.items() if len(v.dims) == 1)
