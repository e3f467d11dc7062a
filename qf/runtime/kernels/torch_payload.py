"""Payload weights (qf.quant.formats) kept packed on a torch device: integer-group codes as int32 words, FP8 as
bytes; a linear decodes tiles of rows into the compute dtype and multiplies (torch ops only, so it runs on any
device torch does; on the CPU each decoded weight equals the format's numpy reference bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from qf.format.errors import ModelError
from qf.quant.formats.base import scales_f32

WORD_BITS = 32


@dataclass(eq=False)
class TorchPayload:
    """One payload weight on the device: its tensors and a row decoder."""

    name: str
    scheme: str
    n_in: int
    n_out: int
    tensors: dict[str, torch.Tensor]
    decode: Callable[["TorchPayload", slice, torch.dtype], torch.Tensor]  # rows -> [rows, n_in]

    @property
    def nbytes(self) -> int:
        """Device bytes of the packed weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def rows(self, sel: slice, dtype: torch.dtype) -> torch.Tensor:
        """Rows sel as dtype [rows, n_in]."""
        return self.decode(self, sel, dtype)


def _dev(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array copied onto the device."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _int_rows(w: TorchPayload, sel: slice, dtype: torch.dtype) -> torch.Tensor:
    """s[:, g(i)] * (code - z[:, g(i)]) for rows sel."""
    t = w.tensors
    bits = int(t["bits"].item())
    shifts = torch.arange(0, WORD_BITS, bits, device=t["packed"].device, dtype=torch.int32)
    codes = ((t["packed"][sel].unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(1)[:, :w.n_in]
    g = t["g_idx"]
    s = t["scale"][sel][:, g]
    z = t["zero"][sel][:, g] if "zero" in t else float(1 << (bits - 1))
    return (s * (codes.to(torch.float32) - z)).to(dtype)


def _fp8_rows(w: TorchPayload, sel: slice, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 values times their block's scale for rows sel."""
    t = w.tensors
    bh, bw = int(t["block"][0].item()), int(t["block"][1].item())
    r0, r1, _ = sel.indices(w.n_out)
    v = t["vals"][r0:r1].view(torch.float8_e4m3fn).to(torch.float32)
    s = t["scale"][r0 // bh: -(-r1 // bh)]
    s = s.repeat_interleave(bh, 0)[r0 - (r0 // bh) * bh:][: r1 - r0].repeat_interleave(bw, 1)[:, :w.n_in]
    return (v * s).to(dtype)


def _pack_int(ref: Any, device: torch.device) -> TorchPayload:
    """Scheme `int` onto the device."""
    p, a = ref.decl.params, ref.arrays
    t = {"packed": _dev(a["weight_packed"], device), "scale": _dev(scales_f32(a["weight_scale"]), device),
         "g_idx": _dev(p.group_of(ref.n_in, a.get("weight_g_idx")), device),
         "bits": torch.tensor(p.bits, device=device)}
    if "weight_zero" in a:
        t["zero"] = _dev(a["weight_zero"].astype(np.float32), device)
    return TorchPayload(ref.name, ref.scheme, ref.n_in, ref.n_out, t, _int_rows)


def _pack_fp8(ref: Any, device: torch.device) -> TorchPayload:
    """Scheme `fp8` onto the device."""
    p, a = ref.decl.params, ref.arrays
    bh, bw = p.block(ref.n_in, ref.n_out)
    scale = scales_f32(a["weight_scale"]).reshape(-(-ref.n_out // bh), -(-ref.n_in // bw))
    t = {"vals": _dev(a["weight_fp8"].view(np.uint8), device), "scale": _dev(scale, device),
         "block": torch.tensor([bh, bw], device=device)}
    return TorchPayload(ref.name, ref.scheme, ref.n_in, ref.n_out, t, _fp8_rows)


# scheme name -> uploader (the torch backend's kernel for each payload format)
PACKERS: dict[str, Callable[[Any, torch.device], TorchPayload]] = {"int": _pack_int, "fp8": _pack_fp8}


def pack(ref: Any, device: torch.device) -> TorchPayload:
    """A payload weight (qf.runtime.weights.PayloadRef) packed on the device; ModelError when no kernel exists."""
    make = PACKERS.get(ref.scheme.split(";", 1)[0])
    if make is None:
        raise ModelError(f"tensor {ref.name!r} ({ref.scheme}): the torch backend has no kernel for this payload "
                         f"scheme (have: {', '.join(sorted(PACKERS))})")
    return make(ref, device)


def matmul(w: TorchPayload, x: torch.Tensor, dtype: torch.dtype, tile_elems: int) -> torch.Tensor:
    """x [M, n_in] @ W.T -> f32 [M, n_out], W decoded a tile of rows at a time."""
    xc = x.to(dtype)
    step = max(1, tile_elems // max(1, w.n_in))
    y = torch.empty((x.shape[0], w.n_out), dtype=torch.float32, device=x.device)
    for r0 in range(0, w.n_out, step):
        r1 = min(r0 + step, w.n_out)
        y[:, r0:r1] = xc @ w.rows(slice(r0, r1), dtype).T
    return y
