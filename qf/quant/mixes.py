"""Per-tensor type choice for a `--type` (llama.cpp's llama_tensor_get_type, src/llama-quant.cpp) as data.

A tensor first gets a category from its name (tensor_get_category). A mix is a default type plus rules; the
first rule whose category and condition match decides (None keeps the default). The chosen type then goes
through FALLBACK when its block does not divide the row (ne[0]) or no codec exists here, ending at F16
(tensor_type_fallback). Tensors llama.cpp never quantizes (1-D, norms, routers, ...) keep their stored type
(the converter stores them as F32). `Overrides` carries llama-quantize's --pure, --tensor-type,
--output-tensor-type and --token-embedding-type.

Followed exactly for dense models (llama, qwen2, gemma...), including Falcon's and 8-expert MoE exceptions
and the 70B attn_v bump, for the legacy, K and IQ mixes (IQ1_S ... IQ4_XS, Q2_K_S). A tensor whose chosen
type llama.cpp writes only with an importance matrix (IQ1_*, IQ2_*, IQ3_XXS; Q2_K inside Q2_K_S; never
token_embd or output) is refused without one (tensor_requires_imatrix). Not modelled: the TQ* and MXFP4
mixes (no codecs here). As in the llama.cpp source this follows, attn_qkv and attn_kv_b take the attn_v
rules (category_is_attn_v); its separate attn_qkv branch is unreachable there and so absent here. In the
IQ1/IQ2 mixes llama.cpp counts ffn_down tensors by occurrence even on MoE models, where the block index is
used here: the same with one ffn_down per block, not on MoE files that also hold shared-expert ffn_down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable, Iterable, Sequence

from qf.format.errors import QFError
from qf.format.ggml_types import FILE_TYPE, GGMLType, block_size

T = GGMLType


class Cat(Enum):
    """llama.cpp's tensor_category: broad roles, not per-architecture names."""

    OUTPUT = "output"
    TOKEN_EMBD = "token_embd"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_V = "attn_v"
    ATTN_K = "attn_k"
    ATTN_Q = "attn_q"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


# (exact name or substring, category), tried in order (tensor_get_category).
CATEGORY_NAMES: tuple[tuple[str, str, Cat], ...] = (
    ("exact", "output.weight", Cat.OUTPUT),
    ("exact", "token_embd.weight", Cat.TOKEN_EMBD),
    ("exact", "per_layer_token_embd.weight", Cat.TOKEN_EMBD),
    ("in", "attn_qkv.weight", Cat.ATTN_QKV),
    ("in", "attn_kv_b.weight", Cat.ATTN_KV_B),
    ("in", "attn_v.weight", Cat.ATTN_V),
    ("in", "attn_k.weight", Cat.ATTN_K),
    ("in", "attn_q.weight", Cat.ATTN_Q),
    ("in", "attn_output.weight", Cat.ATTN_OUTPUT),
    ("in", "ffn_up", Cat.FFN_UP),
    ("in", "ffn_gate", Cat.FFN_GATE),
    ("in", "ffn_down", Cat.FFN_DOWN),
)

# Substrings of 2-D+ weights llama.cpp never quantizes (tensor_allows_quantization).
NEVER_QUANTIZED: tuple[str, ...] = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
NEVER_QUANTIZED_NAMES: frozenset[str] = frozenset({"position_embd.weight", "token_types.weight"})

# Type -> next type to try when a row is not a whole number of blocks or no codec exists (then F16).
FALLBACK: dict[GGMLType, GGMLType] = {
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
    T.IQ4_XS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL,
    T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL, T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL,
}
LAST_RESORT = T.F16

# Types llama.cpp writes only with an importance matrix (tensor_requires_imatrix; Q2_K too inside Q2_K_S).
NEEDS_IMATRIX: frozenset[GGMLType] = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})
# Tensors exempt from that rule (tensor_name_match_token_embd / tensor_name_match_output_weight).
IMATRIX_EXEMPT: frozenset[str] = frozenset({"token_embd.weight", "per_layer_token_embd.weight", "output.weight"})


@dataclass(frozen=True)
class TensorCtx:
    """What a rule may look at: GGUF name, ggml shape (ne[0] innermost), position, model facts.

    `layer`/`n_layers` are the block index and count. llama.cpp counts attn_v-like tensors in file order
    instead (and ffn_* tensors, unless the model has experts); `index`/`count` hold those counters when
    `with_counters` set them, and equal layer/n_layers for the usual one-tensor-per-block files.
    """

    name: str
    ne: tuple[int, ...]
    layer: int | None = None
    n_layers: int = 1
    tied: bool = False  # token_embd doubles as the output projection (no output.weight)
    n_gqa: int = 1  # n_head / n_head_kv
    n_expert: int = 0
    arch: str = "llama"
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B (llama, 80 layers, GQA): attn_v gets more bits
    has_imatrix: bool = False
    src_type: GGMLType | None = None  # stored type, kept for tensors that are never quantized
    i_cat: int | None = None  # llama.cpp's per-category counter (with_counters)
    n_cat: int | None = None

    @property
    def index(self) -> int:
        """Position the layer rules test: the category counter if set, else the block index."""
        return self.i_cat if self.i_cat is not None else (self.layer if self.layer is not None else 0)

    @property
    def count(self) -> int:
        """What `index` is counted out of."""
        return self.n_cat if self.n_cat is not None else self.n_layers


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: first and last eighth of the layers, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def category(name: str) -> Cat:
    """llama.cpp's category of a tensor name."""
    for how, text, cat in CATEGORY_NAMES:
        if (name == text) if how == "exact" else (text in name):
            return cat
    return Cat.OTHER


def n_dims(ne: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last one larger than 1 (at least 1)."""
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return max(1, n)


def allows_quantization(c: TensorCtx, quantize_output: bool = True) -> bool:
    """tensor_allows_quantization: 2-D+ `*weight` tensors, minus norms, routers and a few small tables."""
    if n_dims(c.ne) < 2 or not c.name.endswith("weight") or c.name in NEVER_QUANTIZED_NAMES:
        return False
    if not quantize_output and c.name == "output.weight":
        return False
    return not any(s in c.name for s in NEVER_QUANTIZED)


# ---------------------------------------------------------------------------------------------- rules

Cond = Callable[[TensorCtx], bool]


def always(c: TensorCtx) -> bool:
    """Every tensor of the category."""
    return True


def more_bits(c: TensorCtx) -> bool:
    """use_more_bits on the tensor's counter."""
    return use_more_bits(c.index, c.count)


def first(k: int) -> Cond:
    """index < k."""
    return lambda c: c.index < k


def below(frac: int) -> Cond:
    """index < count / frac (integer division, as llama.cpp)."""
    return lambda c: c.index < c.count // frac


def gqa_at_least(k: int) -> Cond:
    """n_head / n_head_kv >= k."""
    return lambda c: c.n_gqa >= k


def experts(k: int) -> Cond:
    """Exactly k experts (llama.cpp singles out 8-expert models)."""
    return lambda c: c.n_expert == k


def arch_is(name: str) -> Cond:
    """The model's GGUF architecture is `name`."""
    return lambda c: c.arch == name


def experts_at_least(k: int) -> Cond:
    """At least k experts."""
    return lambda c: c.n_expert >= k


def row_misfits(t: GGMLType) -> Cond:
    """Type t's block does not divide the row (llama.cpp tests the mix default's block on the output)."""
    return lambda c: int(c.ne[0]) % block_size(t) != 0


def middle_layers(c: TensorCtx) -> bool:
    """count / 8 <= index < 7 * count / 8 (integer divisions, as llama.cpp)."""
    return c.count // 8 <= c.index < 7 * c.count // 8


def is_70b(c: TensorCtx) -> bool:
    """A llama 70B-class model."""
    return c.is_70b


def with_imatrix(c: TensorCtx) -> bool:
    """An importance matrix is in use."""
    return c.has_imatrix


def all_of(*conds: Cond) -> Cond:
    """Every condition holds."""
    return lambda c: all(f(c) for f in conds)


def any_of(*conds: Cond) -> Cond:
    """Some condition holds."""
    return lambda c: any(f(c) for f in conds)


def negate(cond: Cond) -> Cond:
    """The condition does not hold."""
    return lambda c: not cond(c)


@dataclass(frozen=True)
class Rule:
    """Tensors of a category in `cats` for which `when` holds get type `to` (None: the mix default)."""

    cats: frozenset[Cat]
    to: GGMLType | None
    when: Cond = always


@dataclass(frozen=True)
class Mix:
    """One `--type`: the type most tensors get and the per-tensor exceptions, first match wins."""

    default: GGMLType
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    quantized: bool = True  # False for F32/F16/BF16: no per-tensor rules at all (llama.cpp: ggml_is_quantized)
    needs_imatrix: frozenset[GGMLType] = NEEDS_IMATRIX  # types refused without an importance matrix


def R(cats: Cat | Iterable[Cat], to: GGMLType | None, when: Cond = always) -> Rule:
    """Shorthand for a Rule over one category or several."""
    return Rule(frozenset([cats] if isinstance(cats, Cat) else cats), to, when)


V = (Cat.ATTN_V, Cat.ATTN_QKV, Cat.ATTN_KV_B)  # category_is_attn_v
DOWN, AOUT, K = Cat.FFN_DOWN, Cat.ATTN_OUTPUT, Cat.ATTN_K
FALCON = arch_is("falcon")
MOE8 = experts(8)

def output_rules(default: GGMLType, to: GGMLType = T.Q6_K) -> tuple[Rule, ...]:
    """The output projection (and a tied token_embd): Q8_0 for Falcon or when the mix default's block does not
    divide the row, else `to` (Q6_K; Q5_K in the IQ1/IQ2 mixes)."""
    return (R(Cat.OUTPUT, T.Q8_0, any_of(FALCON, row_misfits(default))), R(Cat.OUTPUT, to))


# 8-expert models: attn_v and attn_k at Q8_0, whatever the mix says.
MOE_RULES = (R(V, T.Q8_0, MOE8), R(K, T.Q8_0, MOE8))


def attn_output(dense: GGMLType | None, falcon: GGMLType | None = None, moe: bool = False) -> tuple[Rule, ...]:
    """attn_output: Q5_K on 8-expert models for the listed mixes, `falcon` on Falcon, else `dense`."""
    return (R(AOUT, T.Q5_K if moe else None, all_of(MOE8, negate(FALCON))), R(AOUT, falcon, FALCON),
            R(AOUT, dense))


# IQ4_NL / IQ4_XS: attn_v at Q5_K with GQA >= 4; without an imatrix the first eighth of ffn_down at Q5_K;
# attn_output at Q5_K on 8-expert models.
IQ4_RULES = (R(V, T.Q5_K, gqa_at_least(4)),
             R(DOWN, T.Q5_K, all_of(negate(with_imatrix), below(8))),
             *attn_output(None, moe=True))


def _k_mix(default: GGMLType, *rules: Rule, needs: frozenset[GGMLType] = NEEDS_IMATRIX,
           output: GGMLType = T.Q6_K) -> Mix:
    """A quantized mix: output rule, MoE overrides, then the mix's own rules."""
    return Mix(default, output_rules(default, output) + MOE_RULES + tuple(rules), needs_imatrix=needs)


def _low_iq_mix(default: GGMLType, up: GGMLType, aout: GGMLType | None) -> Mix:
    """IQ1_S/IQ1_M/IQ2_*, llama.cpp's own branch (no 70B or 8-expert Q8_0 bumps). `up`: attn_v and the first
    eighth of ffn_down (Q2_K; IQ3_S for IQ2_S/IQ2_M, which also put token_embd there); `aout`: attn_output."""
    return Mix(default, output_rules(default, T.Q5_K) + (
        R(Cat.TOKEN_EMBD, T.IQ3_S if up == T.IQ3_S else T.Q2_K),
        R(V, T.Q4_K, any_of(gqa_at_least(4), experts_at_least(4))), R(V, up),
        R(K, T.Q4_K, MOE8),
        R(DOWN, up, below(8)),
        R(AOUT, T.Q5_K, MOE8), R(AOUT, aout)))


V70 = all_of(is_70b, gqa_at_least(4))  # attn_v at Q4_K (GQA >= 4) on a 70B model: Q5_K


MIXES: dict[str, Mix] = {
    "F32": Mix(T.F32, quantized=False),
    "F16": Mix(T.F16, quantized=False),
    "BF16": Mix(T.BF16, quantized=False),
    "Q8_0": Mix(T.Q8_0, MOE_RULES),  # the output stays Q8_0 (llama.cpp: "new_type != Q8_0")
    "Q4_0": _k_mix(T.Q4_0, R(DOWN, T.Q4_1, all_of(with_imatrix, below(8)))),
    "Q4_1": _k_mix(T.Q4_1),
    "Q5_0": _k_mix(T.Q5_0, R(DOWN, T.Q5_1, all_of(with_imatrix, below(8)))),
    "Q5_1": _k_mix(T.Q5_1),
    "Q6_K": _k_mix(T.Q6_K),
    "Q5_K_M": _k_mix(T.Q5_K,
                     R(V, T.Q6_K, more_bits),
                     R(DOWN, T.Q6_K, more_bits)),
    "Q5_K_S": _k_mix(T.Q5_K),
    "Q4_K_M": _k_mix(T.Q4_K,
                     R(V, T.Q6_K, more_bits), R(V, T.Q5_K, is_70b),
                     R(DOWN, T.Q6_K, all_of(FALCON, below(16))), R(DOWN, T.Q5_K, all_of(FALCON, more_bits)),
                     R(DOWN, None, FALCON), R(DOWN, T.Q6_K, more_bits),
                     *attn_output(None, moe=True)),
    "Q4_K_S": _k_mix(T.Q4_K,
                     R(V, T.Q5_K, any_of(first(4), is_70b)),
                     R(DOWN, T.Q5_K, all_of(negate(FALCON), below(8))),
                     *attn_output(None, moe=True)),
    "Q3_K_L": _k_mix(T.Q3_K,
                     R(V, T.Q5_K),
                     R(DOWN, T.Q4_K, FALCON), R(DOWN, T.Q5_K),
                     *attn_output(T.Q5_K, falcon=T.Q4_K)),
    "Q3_K_M": _k_mix(T.Q3_K,
                     R(V, T.Q5_K, any_of(first(2), is_70b)), R(V, T.Q4_K),
                     R(DOWN, T.Q5_K, below(16)), R(DOWN, T.Q4_K, any_of(negate(FALCON), more_bits)),
                     *attn_output(T.Q4_K, moe=True)),
    "Q3_K_S": _k_mix(T.Q3_K,
                     R(V, T.Q5_K, is_70b),
                     *attn_output(None, moe=True)),
    "Q2_K": _k_mix(T.Q2_K,
                   R(V, T.Q5_K, is_70b), R(V, T.Q4_K, gqa_at_least(4)), R(V, T.Q3_K),
                   R(DOWN, T.Q3_K),
                   *attn_output(T.Q3_K, moe=True)),
    "IQ4_NL": _k_mix(T.IQ4_NL, *IQ4_RULES),
    "IQ4_XS": _k_mix(T.IQ4_XS, *IQ4_RULES),
    "Q2_K_S": _k_mix(T.Q2_K,
                     R(V, T.Q5_K, V70), R(V, T.Q4_K, gqa_at_least(4)),
                     R(DOWN, T.Q4_K, below(8)),
                     needs=NEEDS_IMATRIX | {T.Q2_K}),
    "IQ3_M": _k_mix(T.IQ3_S,
                    R(V, T.Q5_K, is_70b), R(V, T.Q4_K),
                    R(DOWN, T.Q4_K, any_of(below(8), all_of(MOE8, more_bits))),
                    *attn_output(T.Q4_K, moe=True)),
    "IQ3_S": _k_mix(T.IQ3_S,
                    R(V, T.Q5_K, V70), R(V, T.Q4_K, gqa_at_least(4)),
                    *attn_output(None, moe=True)),
    "IQ3_XS": _k_mix(T.IQ3_S,
                     R(V, T.Q5_K, V70), R(V, T.Q4_K, gqa_at_least(4)),
                     R((K, Cat.ATTN_Q), T.IQ3_XXS),
                     R((Cat.FFN_GATE, Cat.FFN_UP), T.IQ3_XXS, middle_layers),
                     *attn_output(None, moe=True)),
    "IQ3_XXS": _k_mix(T.IQ3_XXS,
                      R(Cat.TOKEN_EMBD, T.IQ3_S),
                      R(V, T.Q5_K, V70), R(V, T.Q4_K, gqa_at_least(4)), R(V, T.IQ3_S, negate(with_imatrix)),
                      R((K, Cat.ATTN_Q), T.IQ2_S),
                      R(DOWN, T.Q4_K, all_of(negate(with_imatrix), below(8))),
                      R(DOWN, T.Q3_K, negate(with_imatrix)),
                      *attn_output(T.IQ3_S, moe=True), output=T.Q5_K),
    "IQ2_M": _low_iq_mix(T.IQ2_S, T.IQ3_S, T.IQ3_S),
    "IQ2_S": _low_iq_mix(T.IQ2_XS, T.IQ3_S, T.IQ3_S),
    "IQ2_XS": _low_iq_mix(T.IQ2_XS, T.Q2_K, None),
    "IQ2_XXS": _low_iq_mix(T.IQ2_XXS, T.Q2_K, None),
    "IQ1_M": _low_iq_mix(T.IQ1_M, T.Q2_K, T.IQ2_XXS),
    "IQ1_S": _low_iq_mix(T.IQ1_S, T.Q2_K, T.IQ2_XXS),
}


# ---------------------------------------------------------------------------------------------- logic

@dataclass(frozen=True)
class Overrides:
    """llama-quantize's per-tensor options. Patterns are Python regexes searched in the tensor name."""

    pure: bool = False  # every quantizable tensor gets the default type: no mix rules
    tensor_types: tuple[tuple[str, GGMLType], ...] = ()  # (pattern, type), first match wins
    output_type: GGMLType | None = None  # output.weight (and a tied token_embd)
    token_embd_type: GGMLType | None = None  # token_embd.weight


def mix_names() -> list[str]:
    """Every --type name, in table order."""
    return list(MIXES)


def get_mix(name: str) -> Mix:
    """The mix for a --type name (case-insensitive), or an error listing them."""
    key = name.upper()
    if key not in MIXES:
        raise QFError(f"unknown type {name!r}; choose one of: {', '.join(MIXES)}")
    return MIXES[key]


def file_type(name: str) -> int:
    """llama.cpp's general.file_type (llama_ftype) for a --type name."""
    return FILE_TYPE[name.upper()]


def _fits(t: GGMLType, ne0: int, available: Iterable[GGMLType]) -> bool:
    """t has a codec and its block divides the row."""
    return t in available and ne0 % block_size(t) == 0


def resolve(t: GGMLType, ne0: int, available: frozenset[GGMLType]) -> GGMLType:
    """t, or the first fallback that fits; F16 when nothing quantized does."""
    seen: set[GGMLType] = set()
    while t not in seen:
        seen.add(t)
        if _fits(t, ne0, available):
            return t
        t = FALLBACK.get(t, LAST_RESORT)
    return LAST_RESORT


def keeps_f32(c: TensorCtx) -> bool:
    """Tensors never quantized (1-D, norms, ...): the converter stores them as F32."""
    return not allows_quantization(c)


def rule_type(mix: Mix, c: TensorCtx, output_type: GGMLType | None = None) -> GGMLType:
    """The mix's type for c before fallbacks (llama_tensor_get_type_impl)."""
    cat = category(c.name)
    if cat is Cat.TOKEN_EMBD and c.tied:
        cat = Cat.OUTPUT  # a tied embedding is quantized like the output projection
    if cat is Cat.OUTPUT and output_type is not None:
        return output_type
    for r in mix.rules:
        if cat in r.cats and r.when(c):
            return mix.default if r.to is None else r.to
    return mix.default


def _manual(name: str, overrides: Overrides) -> GGMLType | None:
    """The first --tensor-type whose pattern is found in the name."""
    return next((t for p, t in overrides.tensor_types if re.search(p, name)), None)


def _direct(c: TensorCtx, ov: Overrides) -> GGMLType | None:
    """--token-embedding-type / --output-tensor-type, which llama.cpp applies before anything else."""
    cat = category(c.name)
    if ov.token_embd_type is not None and cat is Cat.TOKEN_EMBD:
        return ov.token_embd_type
    if ov.output_type is not None and cat is Cat.OUTPUT:
        return ov.output_type
    return None


def uses_rules(mix: Mix, c: TensorCtx, overrides: Overrides | None = None) -> bool:
    """Whether the mix rules decide c (so llama.cpp advances its counters on it)."""
    ov = overrides or Overrides()
    return (allows_quantization(c) and _direct(c, ov) is None and mix.quantized and not ov.pure
            and _manual(c.name, ov) is None)


def choose_type(mix: Mix, c: TensorCtx, available: Iterable[GGMLType],
                overrides: Overrides | None = None) -> GGMLType:
    """The ggml type tensor c gets under a mix, given the types that have a codec (llama_tensor_get_type).

    Overridden types go through the same fallbacks as the rules' (llama.cpp would fail on a row they do not
    divide).
    """
    if not allows_quantization(c):
        return c.src_type if c.src_type is not None else T.F32
    avail = frozenset(available)
    ov = overrides or Overrides()
    t = _direct(c, ov)
    if t is None and not mix.quantized:
        return mix.default
    if t is None:
        t = _manual(c.name, ov)
    if t is None:
        t = mix.default if ov.pure else rule_type(mix, c, ov.output_type)
    t = resolve(t, int(c.ne[0]), avail)
    if not c.has_imatrix and requires_imatrix(mix, c.name, t):
        raise QFError(f"this quantization requires an importance matrix: {c.name} gets {t.name}, which "
                      f"llama.cpp writes only with one (pass --imatrix, e.g. a file from qimatrix)")
    return t


def check_importance(mix: Mix, name: str, t: GGMLType, importance: object | None) -> None:
    """llama.cpp's per-tensor check: an importance matrix was given but holds no entry for a tensor that needs one."""
    if importance is None and requires_imatrix(mix, name, t):
        raise QFError(f"Missing importance matrix for tensor {name} in a very low-bit quantization ({t.name}): "
                      f"the importance matrix has no entry for it")


def requires_imatrix(mix: Mix, name: str, t: GGMLType) -> bool:
    """llama.cpp's tensor_requires_imatrix: whether tensor `name` at type t needs importance under this mix."""
    return name not in IMATRIX_EXEMPT and t in mix.needs_imatrix


_LAYER = re.compile(r"^blk\.(\d+)\.")
_FFN = (Cat.FFN_DOWN, Cat.FFN_GATE, Cat.FFN_UP)


def layer_of(name: str) -> int | None:
    """Block index of a `blk.N.` tensor name."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def with_counters(ctxs: Sequence[TensorCtx], mix: Mix, overrides: Overrides | None = None) -> list[TensorCtx]:
    """Set llama.cpp's per-category counters over tensors in file order (init_quantize_state_counters).

    attn_v-like tensors are numbered among themselves out of their total; ffn_down/gate/up by occurrence
    out of n_layers (by block index when the model has experts). As in llama.cpp, a counter advances only
    on tensors the mix rules decide (not on --pure, --tensor-type or never-quantized ones).
    """
    n_v = sum(1 for c in ctxs if category(c.name) in V)
    seen = {cat: 0 for cat in (*_FFN, Cat.ATTN_V)}
    out = []
    for c in ctxs:
        cat = category(c.name)
        key = Cat.ATTN_V if cat in V else cat
        if key not in seen or not uses_rules(mix, c, overrides):
            out.append(c)
            continue
        if key is Cat.ATTN_V:
            out.append(replace(c, i_cat=seen[key], n_cat=n_v))
        else:
            i = c.layer if c.n_expert > 1 and c.layer is not None else seen[key]
            out.append(replace(c, i_cat=i, n_cat=c.n_layers))
        seen[key] += 1
    return out
