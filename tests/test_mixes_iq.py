"""The IQ mixes (IQ1_S ... IQ4_XS, Q2_K_S): file types, the importance-matrix refusal, llama.cpp's rules.

The whole per-tensor plan of every mix is compared with llama-quantize --dry-run in the opt-in
tests/test_llama_quantize.py; here: general.file_type against gguf-py's LlamaFileType, the refusal without an
importance matrix (llama.cpp's tensor_requires_imatrix: never token_embd / output), and the rules that need a
model shape the opt-in test does not build (70B, 8 experts, Falcon), read off llama-quant.cpp.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from qf.format.errors import QFError
from qf.format.ggml_types import GGMLType as T
from qf.quant.mixes import TensorCtx, choose_type, file_type, get_mix, mix_names, requires_imatrix

IQ_MIXES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL",
            "IQ4_XS", "Q2_K_S"]
ALL = frozenset(T)  # rules only: every type available


def ctx(name: str, ne: tuple[int, ...] = (4096, 4096), layer: int | None = 5, n_layers: int = 32,
        **kw) -> TensorCtx:
    """A tensor of a 32-layer model with an importance matrix unless told otherwise."""
    kw.setdefault("has_imatrix", True)
    return TensorCtx(name, ne, layer, n_layers, **kw)


@pytest.mark.parametrize("name", IQ_MIXES)
def test_file_type_is_llamas(name: str) -> None:
    assert name in mix_names()
    assert file_type(name) == gguf.LlamaFileType[f"MOSTLY_{name}"].value


@pytest.mark.parametrize("name,default", [("IQ1_S", T.IQ1_S), ("IQ1_M", T.IQ1_M), ("IQ2_XXS", T.IQ2_XXS),
                                          ("IQ2_XS", T.IQ2_XS), ("IQ2_S", T.IQ2_XS), ("IQ2_M", T.IQ2_S),
                                          ("IQ3_XXS", T.IQ3_XXS), ("IQ3_XS", T.IQ3_S), ("IQ3_S", T.IQ3_S),
                                          ("IQ3_M", T.IQ3_S), ("Q2_K_S", T.Q2_K)])
def test_default_types(name: str, default: T) -> None:
    """llama_ftype_get_default_type (IQ2_S's default is IQ2_XS, IQ3_XS's IQ3_S)."""
    assert get_mix(name).default == default
    assert choose_type(get_mix(name), ctx("blk.0.ffn_up.weight", layer=0), ALL) == default  # (not IQ3_XS middle)


@pytest.mark.parametrize("name", ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"])
def test_refused_without_imatrix(name: str) -> None:
    mix = get_mix(name)
    with pytest.raises(QFError, match="requires an importance matrix"):
        choose_type(mix, ctx("blk.5.ffn_up.weight", has_imatrix=False), ALL)
    # token_embd and output are exempt, whatever their type
    assert choose_type(mix, ctx("token_embd.weight", (4096, 32000), None, has_imatrix=False), ALL) in ALL
    assert not requires_imatrix(mix, "output.weight", T.IQ1_S)


def test_not_refused_where_llama_cpp_is_not() -> None:
    for name in ("IQ3_S", "IQ3_M", "IQ4_XS", "IQ4_NL", "Q2_K"):
        choose_type(get_mix(name), ctx("blk.5.ffn_up.weight", has_imatrix=False), ALL)
    assert requires_imatrix(get_mix("Q2_K_S"), "blk.0.ffn_up.weight", T.Q2_K)
    assert not requires_imatrix(get_mix("Q2_K"), "blk.0.ffn_up.weight", T.Q2_K)
    with pytest.raises(QFError):  # IQ3_XS puts attn_q at IQ3_XXS
        choose_type(get_mix("IQ3_XS"), ctx("blk.5.attn_q.weight", has_imatrix=False), ALL)


@pytest.mark.parametrize("name,want", [("IQ1_S", T.Q5_K), ("IQ2_M", T.Q5_K), ("IQ3_XXS", T.Q5_K),
                                       ("IQ3_S", T.Q6_K), ("Q2_K_S", T.Q6_K)])
def test_output(name: str, want: T) -> None:
    mix = get_mix(name)
    assert choose_type(mix, ctx("output.weight", (4096, 32000), None), ALL) == want
    # a row the default's block does not divide: Q8_0 (not the Q5_K -> Q5_1 fallback)
    assert choose_type(mix, ctx("output.weight", (576, 32000), None), ALL) == T.Q8_0
    assert choose_type(mix, ctx("output.weight", (4096, 32000), None, arch="falcon"), ALL) == T.Q8_0


def test_moe_and_70b_rules() -> None:
    moe = {"n_expert": 8, "n_gqa": 4}
    # IQ1/IQ2 branch: attn_v Q4_K (no Q8_0 bump), attn_k Q4_K, attn_output Q5_K on 8 experts
    assert choose_type(get_mix("IQ2_XS"), ctx("blk.5.attn_v.weight", **moe), ALL) == T.Q4_K
    assert choose_type(get_mix("IQ2_XS"), ctx("blk.5.attn_k.weight", **moe), ALL) == T.Q4_K
    assert choose_type(get_mix("IQ1_S"), ctx("blk.5.attn_output.weight", **moe), ALL) == T.Q5_K
    assert choose_type(get_mix("IQ1_S"), ctx("blk.5.attn_output.weight"), ALL) == T.IQ2_XXS
    assert choose_type(get_mix("IQ2_XXS"), ctx("blk.5.attn_v.weight", n_expert=4), ALL) == T.Q4_K
    # the other IQ mixes: 8-expert attn_v / attn_k at Q8_0, attn_output Q5_K (not for Q2_K_S)
    assert choose_type(get_mix("IQ3_XS"), ctx("blk.5.attn_v.weight", **moe), ALL) == T.Q8_0
    assert choose_type(get_mix("IQ3_M"), ctx("blk.5.attn_output.weight", **moe), ALL) == T.Q5_K
    assert choose_type(get_mix("Q2_K_S"), ctx("blk.5.attn_output.weight", **moe), ALL) == T.Q2_K
    # IQ3_M ffn_down: Q4_K where use_more_bits on 8-expert models
    assert choose_type(get_mix("IQ3_M"), ctx("blk.6.ffn_down.weight", layer=6, **moe), ALL) == T.Q4_K
    assert choose_type(get_mix("IQ3_M"), ctx("blk.6.ffn_down.weight", layer=6), ALL) == T.IQ3_S
    # 70B (GQA 8): attn_v Q4_K -> Q5_K in the generic branch, not in the IQ2 one
    big = {"is_70b": True, "n_gqa": 8, "n_layers": 80}
    for name in ("IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "Q2_K_S"):
        assert choose_type(get_mix(name), ctx("blk.5.attn_v.weight", **big), ALL) == T.Q5_K, name
    assert choose_type(get_mix("IQ2_M"), ctx("blk.5.attn_v.weight", **big), ALL) == T.Q4_K


def test_iq3_xxs_without_imatrix_rules() -> None:
    """IQ3_XXS's branches for a missing imatrix (reachable in llama.cpp's dry run): attn_v IQ3_S, ffn_down
    Q4_K in the first eighth then Q3_K."""
    mix = get_mix("IQ3_XXS")
    assert choose_type(mix, ctx("blk.5.attn_v.weight", has_imatrix=False), ALL) == T.IQ3_S
    assert choose_type(mix, ctx("blk.1.ffn_down.weight", layer=1, has_imatrix=False), ALL) == T.Q4_K
    assert choose_type(mix, ctx("blk.9.ffn_down.weight", layer=9, has_imatrix=False), ALL) == T.Q3_K
    assert choose_type(mix, ctx("blk.9.ffn_down.weight", layer=9), ALL) == T.IQ3_XXS


def test_imatrix_missing_a_needed_tensor_is_refused(tiny_checkpoint, tmp_path) -> None:
    """llama.cpp's per-tensor check: an imatrix is given but has no entry for a tensor the mix writes at a type that
    needs one ("Missing importance matrix for tensor ..."); nothing is written. With the entry, the file is made."""
    from qf.convert.pipeline import convert
    from qf.format.errors import QFError
    from qf.quant.imatrix import load_imatrix, write_imatrix
    from qf.quant.requantize import requantize

    src = convert(tiny_checkpoint(config={"hidden_size": 256, "intermediate_size": 512}), tmp_path / "f16.qf",
                  "F16").path
    names = [f"blk.{b}.{w}.weight" for b in range(2)
             for w in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    n_in = {"attn_output": 256, "ffn_down": 512}
    sums = {n: np.ones(n_in.get(n.split(".")[2], 256), np.float64) for n in names}
    counts = dict.fromkeys(names, 1)
    full = load_imatrix(write_imatrix(tmp_path / "full.gguf", sums, counts, ["t"], 1, 32))
    del sums["blk.1.ffn_up.weight"], counts["blk.1.ffn_up.weight"]
    partial = load_imatrix(write_imatrix(tmp_path / "partial.gguf", sums, counts, ["t"], 1, 32))
    out = tmp_path / "iq2s.qf"
    with pytest.raises(QFError, match="Missing importance matrix for tensor blk.1.ffn_up.weight"):
        requantize(src, out, "IQ2_S", imatrix=partial)
    assert not out.exists()
    requantize(src, out, "IQ2_S", imatrix=full)
    assert out.exists()
