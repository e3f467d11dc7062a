"""What an architecture module declares (name maps, hyperparameters, head permutations) and the logic shared by all."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qf.convert.json_fields import Fields
from qf.format.errors import ConvertError
from qf.format.values import GGUFValueType

REQUIRED = object()  # HParam.default: the config must provide the key
LAYER_NUMBER = r"(?P<bid>0|[1-9][0-9]{0,5})"  # a layer number in a tensor name; longer ones match nothing
EXPERT_NUMBER = r"(?P<xid>0|[1-9][0-9]{0,3})"  # an expert number: HF names one tensor per expert


@dataclass(frozen=True)
class HParam:
    """GGUF key `{arch}.{key}` from the first config key present in `hf` (also the key written back on export).

    default: REQUIRED, a value, or a callable of the resolved values ({GGUF key suffix: value})."""

    key: str
    hf: tuple[str, ...]
    vtype: GGUFValueType
    default: Any = REQUIRED


# GGUF key suffix -> the config.json field(s) it comes from, for the keys outside an HParam table (messages).
CONFIG_SOURCES: dict[str, str] = {
    "rope.freq_base": "rope_theta",
    "rope.dimension_count": "head_dim (or hidden_size / num_attention_heads)",
    "attention.key_length": "head_dim",
    "attention.value_length": "head_dim",
    "rope.scaling.type": "rope_scaling.rope_type",
    "rope.scaling.factor": "rope_scaling.factor",
    "rope.freq_base_swa": "rope_local_base_freq",
    "attention.sliding_window": "sliding_window",
    "attention.sliding_window_pattern": "sliding_window_pattern (or layer_types)",
    "final_logit_softcapping": "final_logit_softcapping",
    "vocab_size": "vocab_size",
}

KV = tuple[str, Any, GGUFValueType]  # (full GGUF key, value, value type; for a list/array its element type)


@dataclass(frozen=True)
class ArchSpec:
    """One architecture family member: HF architecture names <-> one GGUF architecture."""

    gguf_arch: str
    hf_architectures: tuple[str, ...]
    hf_model_type: str  # config.json model_type written on export
    tensor_map: dict[str, str]  # HF name template -> GGUF name template; "{bid}" is the layer number
    hparams: tuple[HParam, ...]
    required_tensors: tuple[str, ...]  # GGUF templates every model has (per layer when they hold {bid})
    permute: dict[str, str] = field(default_factory=dict)  # GGUF suffix -> GGUF key of its head count
    value_shift: dict[str, float] = field(default_factory=dict)  # GGUF suffix -> constant added on conversion
    ignore: tuple[str, ...] = ()  # regexes of HF tensors dropped on purpose
    extra_kv: Callable[[dict[str, Any], Path], list[KV]] = lambda cfg, path: []
    extra_tensors: Callable[[dict[str, Any], Path], dict[str, np.ndarray]] = lambda cfg, path: {}
    export_config: Callable[[dict[str, Any], set[str]], dict[str, Any]] = lambda meta, names: {}
    # GGUF tensors made from config.json (extra_tensors): not weights on export; their values -> config entries
    generated: tuple[str, ...] = ()
    export_generated: Callable[[dict[str, Any], dict[str, np.ndarray]], dict[str, Any]] = lambda meta, values: {}


def tensor_suffix(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q.weight'; names outside the layers are their own suffix."""
    return gguf_name.split(".", 2)[-1] if gguf_name.startswith("blk.") else gguf_name


def _template_regex(template: str) -> re.Pattern[str]:
    """'a.{bid}.b' -> regex matching it with the layer number captured (at most 6 digits); '{xid}' likewise
    captures an expert number."""
    rx = re.escape(template).replace(re.escape("{bid}"), LAYER_NUMBER).replace(re.escape("{xid}"), EXPERT_NUMBER)
    return re.compile("^" + rx + "$")


class NameMap:
    """Bidirectional name mapping compiled from a template table.

    An HF template holding "{xid}" names one expert of a GGUF tensor that stacks all of them (ffn_*_exps):
    to_gguf gives its expert number, to_hf gives the template with "{xid}" left for the caller to fill."""

    def __init__(self, table: dict[str, str]) -> None:
        self._fwd = [(_template_regex(src), dst) for src, dst in table.items()]
        self._back = [(_template_regex(dst), src) for src, dst in table.items()]

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern[str], str]], name: str) -> tuple[str, int | None, int | None] | None:
        """First rule matching name -> (mapped name, layer or None, expert or None)."""
        for rx, out in rules:
            m = rx.match(name)
            if m:
                bid, xid = m.groupdict().get("bid"), m.groupdict().get("xid")
                return (out.replace("{bid}", bid or ""), None if bid is None else int(bid),
                        None if xid is None else int(xid))
        return None

    def to_gguf(self, hf_name: str) -> tuple[str, int | None, int | None] | None:
        """HF tensor name -> (GGUF name, layer, expert), or None when unmapped."""
        return self._apply(self._fwd, hf_name)

    def to_hf(self, gguf_name: str) -> tuple[str, int | None, int | None] | None:
        """GGUF tensor name -> (HF name, layer, None); an expert tensor's HF name keeps "{xid}"."""
        return self._apply(self._back, gguf_name)


def head_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order taking HF's rotate-half Q/K layout to GGML's interleaved pairs: out[i] = w[perm[i]]."""
    if n_head <= 0 or n_rows % (2 * n_head):
        raise ConvertError(f"cannot permute {n_rows} rows into {n_head} heads of interleaved pairs")
    # same as llama.cpp's w.reshape(H, 2, rows // H // 2, ...).swapaxes(1, 2), applied to row indices
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def shortest_f32(v: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.999999747e-06)."""
    return float(str(np.float32(v)))


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """inv with w[perm][inv] == w."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv


def _coerce(f: Fields, hp: HParam, key: str) -> Any:
    """A config value checked against the GGUF value type it becomes (the shared validator judges floats' range)."""
    if hp.vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        return f.number(key, finite=False)
    if hp.vtype == GGUFValueType.BOOL:
        return f.bool(key)
    if hp.vtype == GGUFValueType.STRING:
        return f.str(key)
    return f.int(key, lo=1)


def resolve_hparams(spec: ArchSpec, cfg: dict[str, Any], path: Path) -> list[KV]:
    """Every declared hyperparameter as a GGUF KV; one error lists all the missing config keys.

    A callable default gets the resolved values by GGUF key suffix (e.g. head_count_kv = head_count)."""
    f = Fields(cfg, path)
    got: dict[str, Any] = {}
    missing: list[str] = []
    for hp in spec.hparams:
        key = next((k for k in hp.hf if f.has(k)), None)
        if key is None and hp.default is REQUIRED:
            missing.append(" or ".join(hp.hf))
        else:
            got[hp.key] = hp.default if key is None else _coerce(f, hp, key)
    if missing:
        raise ConvertError(f"{path}: config.json for {spec.hf_architectures[0]} is missing required keys: "
                           f"{', '.join(missing)}")
    return [(f"{spec.gguf_arch}.{hp.key}", got[hp.key](got) if callable(got[hp.key]) else got[hp.key], hp.vtype)
            for hp in spec.hparams]
