"""The planner on files that hold payloads (qf.quant.formats): member bytes counted in their layer, apart as
payload bytes, and each payload weight dequantized in tiles like a quantized tensor (the scratch term)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("compressed_tensors")

from payload_fixtures import ct_checkpoint  # noqa: E402

from qf.convert.pipeline import convert  # noqa: E402
from qf.format.reader import open_gguf  # noqa: E402
from qf.quant.formats import PAYLOAD_TENSORS_KEY  # noqa: E402
from qf.runtime.planner import sizes_from_gguf  # noqa: E402

_LAYER = re.compile(r"^blk\.(\d+)\.")


@pytest.mark.parametrize("scheme", ["w4a16_g32_asym", "fp8_block"])
def test_payload_bytes_per_layer(tiny_checkpoint, tmp_path, scheme):
    src = tiny_checkpoint(tied=False)
    ct_checkpoint(src, tmp_path / "q", scheme)
    out = tmp_path / "m.qf"
    convert(tmp_path / "q", out, "F16", keep_payload=True)
    with open_gguf(out) as f:
        s = sizes_from_gguf(f, out)
        logical = f.meta.get_array(PAYLOAD_TENSORS_KEY)
        bases = {n[: -len("weight")] for n in logical}
        for il, g in enumerate(s.layers):
            layer = {n: ti for n, ti in f.tensors.items() if (m := _LAYER.match(n)) and int(m[1]) == il}
            members = {n: ti for n, ti in layer.items() if any(n.startswith(b) and n != b + "weight" for b in bases)
                       and not n.endswith("norm.weight")}
            assert members and g.payload_nbytes == sum(int(ti.nbytes) for ti in members.values())
            assert g.nbytes == sum(int(ti.nbytes) for ti in layer.values())
            elems = []  # n_out * n_in of each payload weight: 4-bit codes 8 per I32 word, fp8 one per byte
            for b in (b for b in bases if b.startswith(f"blk.{il}.")):
                packed = f.tensors.get(b + "weight_packed")
                ne = (packed or f.tensors[b + "weight_fp8"]).ne
                elems.append(int(ne[1]) * int(ne[0]) * (8 if packed else 1))
            assert g.max_dequant_elems == max(elems)
        assert s.token_embd.payload_nbytes == 0 and s.file_bytes == sum(int(t.nbytes) for t in f.tensors.values())


def test_ggml_file_has_no_payload_bytes(tiny_checkpoint, tmp_path):
    out = tmp_path / "m.qf"
    convert(tiny_checkpoint(tied=False), out, "Q8_0")
    with open_gguf(out) as f:
        s = sizes_from_gguf(f, out)
    assert all(g.payload_nbytes == 0 for g in s.layers) and all(g.max_dequant_elems > 0 for g in s.layers)
