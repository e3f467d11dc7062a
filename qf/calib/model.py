"""The model a calibration runs: hyperparameters, tokenizer and chat template from the planned keys, f32
weights of one block at a time read from the checkpoint through the conversion plan, and the runtime's forward
class of the architecture (its block code is what runs)."""

from __future__ import annotations

import mmap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from qf.convert.checkpoint import Checkpoint
from qf.convert.pipeline import ConvertPlan, encode_tensor
from qf.format.errors import ConvertError, QFError
from qf.format.ggml_types import GGMLType
from qf.format.model_check import KVMetadata, layer_table, squeeze_ne
from qf.quant.methods.base import LINEAR_ROLES, LinearInfo
from qf.quant.tensor_plan import PlannedTensor
from qf.runtime.arch import all_forwards
from qf.runtime.arch.blocks import Batch
from qf.runtime.backend import CpuBackend
from qf.runtime.chat import chat_template_from_metadata
from qf.runtime.hparams import hparams_from_metadata
from qf.runtime.tokenizer import load_tokenizer
from qf.runtime.weights import LayerTensors, ModelTensors, TensorRef

FUSED_ROLES = ("wqkv",)  # fused layouts the calibration does not split (phi3)


class CalibModel:
    """One checkpoint being converted with calibration."""

    def __init__(self, plan: ConvertPlan, ckpt: Checkpoint, where: Path, n_threads: int | None = None) -> None:
        self.plan, self.ckpt, self.where = plan, ckpt, str(where)
        meta = KVMetadata(plan.kv, self.where)
        arch = meta.get_str("general.architecture")
        forwards = all_forwards()
        if arch not in forwards:
            raise ConvertError(f"{where}: calibrated types need the runtime's forward pass; {arch} has none")
        self.spec, self.forward_cls = forwards[arch]
        self.hp = hparams_from_metadata(meta, arch, self.where)
        if self.hp.n_expert:
            raise ConvertError(f"{where}: calibrated types do not support mixture-of-experts models yet")
        self.global_roles, self.layer_roles = layer_table(self.hp, self.where)
        if any(r in self.layer_roles for r in FUSED_ROLES) or getattr(self.forward_cls, "fused", {}).keys() - {"wqkv"}:
            raise ConvertError(f"{where}: calibrated types do not support {arch}'s fused q/k/v or gate/up yet")
        self.tokenizer = load_tokenizer(meta, self.where)
        text = lambda i: "" if i is None else self.tokenizer.token_text(i)  # noqa: E731
        self.template = chat_template_from_metadata(meta, text(self.tokenizer.bos_id), text(self.tokenizer.eos_id))
        self.by_name = {t.name: t for t in plan.tensors}
        self.cpu = CpuBackend(n_threads)

    # -- tensors ----------------------------------------------------------------------------------------------
    def f32(self, name: str) -> np.ndarray:
        """A planned tensor's values as f32 in numpy order ([n_out, n_in] for a matrix), read from the checkpoint."""
        t = self.by_name[name]
        raw = encode_tensor(self.ckpt, replace(t, type=GGMLType.F32, importance=None))
        if t.source is not None:
            self.ckpt.release(t.source)
        return np.ascontiguousarray(raw).view(np.float32).reshape(tuple(reversed(squeeze_ne(t.ne, 2))))

    def _ref(self, name: str, n_dims: int) -> TensorRef | None:
        """A planned tensor as an f32 TensorRef (None when absent)."""
        if name not in self.by_name:
            return None
        v = self.f32(name)
        ne = squeeze_ne(self.by_name[name].ne, n_dims)
        return TensorRef(name, GGMLType.F32, ne, v.reshape(-1, ne[0]).view(np.uint8))

    def _placeholder(self, name: str) -> TensorRef | None:
        """A planned matrix as an f32 TensorRef of the right shape whose bytes are untouched anonymous memory (no
        resident pages, nothing read from the checkpoint): the forward object's layers are never run."""
        if name not in self.by_name:
            return None
        ne = squeeze_ne(self.by_name[name].ne, 2)
        rows, row_bytes = int(np.prod(ne[1:])), 4 * ne[0]
        buf = mmap.mmap(-1, max(1, rows * row_bytes))
        return TensorRef(name, GGMLType.F32, ne, np.frombuffer(buf, np.uint8, rows * row_bytes).reshape(rows, -1))

    def layer_names(self, i: int) -> dict[str, str]:
        """role -> GGUF name of layer i's tensors present in the plan."""
        names = {r: role.template.format(i=i) for r, role in self.layer_roles.items()}
        return {r: n for r, n in names.items() if n in self.by_name}

    def layer_weights(self, i: int) -> dict[str, np.ndarray]:
        """Layer i's tensors as f32 by role (matrices [n_out, n_in], vectors [n])."""
        return {r: (self.f32(n) if len(self.layer_roles[r].dims) == 2 else self.f32(n).reshape(-1))
                for r, n in self.layer_names(i).items()}

    def linears(self) -> list[LinearInfo]:
        """Every calibrated linear of every block, as planned."""
        out = []
        for i in range(self.hp.n_layer):
            for r, n in self.layer_names(i).items():
                if r in LINEAR_ROLES:
                    t: PlannedTensor = self.by_name[n]
                    ne = squeeze_ne(t.ne, 2)
                    out.append(LinearInfo(n, r, i, ne[0], ne[1], t.type))
        return out

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, n_ctx: int) -> Any:
        """The architecture's forward object (RoPE tables, windows, hooks); its layers hold layer 0's vectors and
        placeholder matrices that take no memory (Layer.run places each block's own weights)."""
        refs = lambda table, fmt: {r: self._ref(role.template.format(**fmt), len(role.dims))  # noqa: E731
                                   for r, role in table.items()}
        g = refs({r: role for r, role in self.global_roles.items() if r != "output"}, {})  # the head: not run
        layer0 = LayerTensors(**{r: t for r, role in self.layer_roles.items()
                                 if (t := (self._placeholder(role.template.format(i=0)) if len(role.dims) == 2 else
                                           self._ref(role.template.format(i=0), len(role.dims)))) is not None})
        extra = {r: t for r, t in g.items() if t is not None and r not in ("tok_embd", "output_norm", "output",
                                                                           "rope_freqs")}
        tensors = ModelTensors(g["tok_embd"], g["output_norm"], g["tok_embd"], g.get("rope_freqs"),
                               [layer0] * self.hp.n_layer, extra)
        return self.forward_cls(self.hp, self.spec, tensors, [self.cpu] * self.hp.n_layer, n_ctx)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a calibration text (no BOS: windows get their own)."""
        try:
            return list(self.tokenizer.encode(text, add_special=False))
        except QFError as e:
            raise ConvertError(f"calibration text: cannot tokenize: {e}") from None

    def render(self, messages: list[dict[str, Any]]) -> str:
        """A conversation through the model's chat template."""
        try:
            return self.template.render(messages, add_generation_prompt=False)
        except QFError as e:
            raise ConvertError(f"calibration conversation: the chat template refused it: {e}") from None


def calibration_batch(tokens: np.ndarray) -> Batch:
    """All windows [N, L] as one batch: window s in KV slot s at positions 0..L-1."""
    n, L = tokens.shape
    return Batch(np.ascontiguousarray(tokens.reshape(-1), np.int64), np.tile(np.arange(L, dtype=np.int64), n),
                 np.repeat(np.arange(n, dtype=np.int64), L))
