"""The shared model validator (qf.format.model_check) where files are loaded, requantized and exported (issue #16).

The runtime, qquantize and the exporter refuse the same hostile files with our own errors naming the key or
tensor, in bounded time and memory; qquantize and the exporter write nothing, and refuse an output that is
their input.
"""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from click.testing import CliRunner
from test_runtime_forward import build_tiny_gguf

import qf.runtime  # noqa: F401  (imported before any measurement)
from qf.convert.export import export_hf
from qf.format.checksum import RESERVED_KEYS
from qf.format.errors import ConvertError, FormatError, ModelError, QFError
from qf.format.ggml_types import GGMLType
from qf.format.model_check import MAX_TEMPLATE_CHARS, KVMetadata, TensorDecl, check_tensors
from qf.format.reader import open_gguf
from qf.format.values import ALIGNMENT_KEY
from qf.format.values import GGUFValueType as V
from qf.format.writer import QFWriter
from qf.quant.requantize import requantize
from qf.runtime import Model
from qf.tools.qquantize import main as qquantize

MAX_SECONDS = 10.0
MAX_PEAK_MIB = 64

Extra = dict[str, tuple[tuple[int, ...], GGMLType, np.ndarray]]  # name -> (ne, type, stored data)


def measured(fn: Callable[[], Any], err: type[BaseException] = QFError) -> str:
    """Run fn, which must raise err within MAX_SECONDS and MAX_PEAK_MIB of Python allocations; its message."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(err) as ei:
            fn()
    finally:
        seconds, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    assert seconds < MAX_SECONDS and peak < MAX_PEAK_MIB, (seconds, peak)
    return str(ei.value)


def rewrite(src: Path, dst: Path, add: Extra | None = None, replace: Extra | None = None,
            meta: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """Copy a GGUF file, adding tensors, replacing some (another ne/type/data), dropping some, overriding keys."""
    add, replace, meta = add or {}, replace or {}, meta or {}
    with open_gguf(src) as f, QFWriter(dst) as w:
        for key in f.meta.keys():
            if key in RESERVED_KEYS or key == ALIGNMENT_KEY or key in meta:
                continue
            vtype, value = f.meta.raw(key)
            w.add_kv(key, value, f.meta.elem_type(key) if vtype is V.ARRAY else vtype)
        for key, value in meta.items():
            w.add_kv(key, value)
        table = {n: (tuple(ti.ne), ti.type, np.asarray(f.raw(n))) for n, ti in f.tensors.items()}
        table |= replace | add
        table = {n: v for n, v in table.items() if n not in drop}
        for name, (ne, t, _) in table.items():
            w.add_tensor_info(name, ne, t)
        w.write_header()
        for name, (_, _, data) in table.items():
            w.write_tensor(name, data)
        w.finish()
    return dst


def f32(x: np.ndarray) -> np.ndarray:
    """f32 values as stored bytes (one row)."""
    return np.asarray(x, np.float32).view(np.uint8).reshape(1, -1)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good tiny llama file (2 layers, n_embd 64, F16 matrices, rope_freqs) every case starts from."""
    return build_tiny_gguf(tmp_path_factory.mktemp("base") / "base.gguf", qtype=GGMLType.F16, rope_freqs=True)


def load_refused(path: Path) -> str:
    """Model.load refuses the file with a ModelError naming it."""
    msg = measured(lambda: Model.load(path, n_ctx=32, warmup=False), ModelError)
    assert str(path) in msg
    return msg


# ---------------------------------------------------------------------------------------------------------
# runtime: tensors the model does not read, types without a codec, rope factors, hyperparameters

def test_base_file_loads(base: Path) -> None:
    with Model.load(base, n_ctx=32, warmup=False) as m:
        assert m.hparams.n_layer == 2


@pytest.mark.parametrize("name, ne", [
    ("blk.2.attn_norm.weight", (64,)),  # a layer beyond block_count
    ("mystery.weight", (64,)),  # a name no llama model has
    ("blk.0.attn_q_norm.weight", (16,)),  # a gemma3 role in a llama file
    ("blk.0.attn_output.bias", (64,)),  # a role no forward pass reads
])
def test_tensors_the_model_does_not_read_are_refused(base: Path, tmp_path: Path, name: str, ne: tuple) -> None:
    path = rewrite(base, tmp_path / "extra.gguf", add={name: (ne, GGMLType.F32, f32(np.ones(ne)))})
    msg = load_refused(path)
    assert "wrong number of tensors; expected" in msg and name in msg


def test_norm_in_a_type_without_codec_is_named(base: Path, tmp_path: Path) -> None:
    data = np.zeros((1, 2 * 40), np.uint8)  # Q8_1: blocks of 32 values in 40 bytes (no codec: ggml's internal type)
    path = rewrite(base, tmp_path / "q8_1.gguf", replace={"blk.1.ffn_norm.weight": ((64,), GGMLType.Q8_1, data)})
    msg = load_refused(path)
    assert "blk.1.ffn_norm.weight" in msg and "Q8_1" in msg and "no codec" in msg


@pytest.mark.parametrize("values", [np.zeros(8), np.full(8, np.nan), np.r_[np.ones(7), np.inf], -np.ones(8)],
                         ids=["zero", "nan", "inf", "negative"])
def test_bad_rope_factors_are_named(base: Path, tmp_path: Path, values: np.ndarray) -> None:
    path = rewrite(base, tmp_path / "rope.gguf", replace={"rope_freqs.weight": ((8,), GGMLType.F32, f32(values))})
    assert "rope_freqs.weight" in load_refused(path)


@pytest.mark.parametrize("meta, key", [
    ({"llama.attention.layer_norm_rms_epsilon": float("inf")}, "llama.attention.layer_norm_rms_epsilon"),
    ({"llama.attention.layer_norm_rms_epsilon": -1e-5}, "llama.attention.layer_norm_rms_epsilon"),
    ({"llama.rope.freq_base": float("inf")}, "llama.rope.freq_base"),
    ({"llama.rope.freq_base": float("nan")}, "llama.rope.freq_base"),
    ({"llama.rope.freq_base": 0.0}, "llama.rope.freq_base"),
    ({"llama.block_count": 1 << 31}, "llama.block_count"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count"),
    ({"llama.embedding_length": 62}, "llama.attention.head_count"),  # 4 heads do not divide 62
    ({"llama.context_length": 0}, "llama.context_length"),
    ({"llama.attention.key_length": 1 << 20}, "llama.attention.key_length"),
    ({"tokenizer.chat_template": "x" * (MAX_TEMPLATE_CHARS + 1)}, "tokenizer.chat_template"),
    ({"tokenizer.chat_template.tool_use": "x" * (MAX_TEMPLATE_CHARS + 1)}, "tokenizer.chat_template.tool_use"),
])
def test_bad_hyperparameters_are_named(tmp_path: Path, meta: dict, key: str) -> None:
    path = build_tiny_gguf(tmp_path / "bad.gguf", meta=meta)
    assert key in load_refused(path)


def test_validator_on_a_plain_table() -> None:
    """The validator needs no file: a producer describes the file it is about to write."""
    from qf.format.hparams import hparams_from_metadata

    kv = [("general.architecture", "llama", V.STRING), ("llama.block_count", 1, V.UINT32),
          ("llama.context_length", 64, V.UINT32), ("llama.embedding_length", 8, V.UINT32),
          ("llama.feed_forward_length", 16, V.UINT32), ("llama.attention.head_count", 2, V.UINT32),
          ("llama.vocab_size", 10, V.UINT32)]
    hp = hparams_from_metadata(KVMetadata(kv), "llama", "plan")
    table = {"token_embd.weight": TensorDecl((8, 10), GGMLType.F16), "output_norm.weight": TensorDecl((8,), GGMLType.F32)}
    with pytest.raises(ModelError, match=r"plan: tensor 'blk\.0\.attn_norm\.weight': is missing"):
        check_tensors(hp, table, "plan")
    with pytest.raises(FormatError, match="llama.block_count.*UINT32"):
        KVMetadata(kv + [("llama.block_count", -1, V.UINT32)])


# ---------------------------------------------------------------------------------------------------------
# qquantize: the same validator before the output is opened; never its own input

def test_qquantize_refuses_what_the_runtime_refuses(base: Path, tmp_path: Path) -> None:
    bad = rewrite(base, tmp_path / "extra.gguf", add={"blk.2.attn_norm.weight": ((64,), GGMLType.F32,
                                                                                 f32(np.ones(64)))})
    out = tmp_path / "out.qf"
    msg = measured(lambda: requantize(bad, out, "Q8_0"), ModelError)
    assert "wrong number of tensors" in msg and "blk.2.attn_norm.weight" in msg and not out.exists()
    nan = build_tiny_gguf(tmp_path / "nan.gguf", meta={"llama.attention.layer_norm_rms_epsilon": float("nan")})
    assert "layer_norm_rms_epsilon" in measured(lambda: requantize(nan, out, "Q8_0"), ModelError)
    assert not out.exists()


def test_qquantize_passes_other_architectures_through(tmp_path: Path) -> None:
    """An architecture the runtime does not know is requantized as llama-quantize would (unvalidated)."""
    src = build_tiny_gguf(tmp_path / "starcoder2.gguf", arch="starcoder2")
    requantize(src, tmp_path / "o.qf", "Q8_0")
    with open_gguf(tmp_path / "o.qf") as f:
        assert f.info("blk.0.attn_q.weight").type == GGMLType.Q8_0


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink"])
def test_qquantize_output_may_not_be_its_input(base: Path, tmp_path: Path, how: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.gguf"
    src.write_bytes(base.read_bytes())
    out: Path = src
    if how == "relative":
        monkeypatch.chdir(tmp_path)
        out = Path(".") / ".." / tmp_path.name / "in.gguf"
    elif how == "symlink":
        out = tmp_path / "link.gguf"
        out.symlink_to(src)
    elif how == "hardlink":
        out = tmp_path / "hard.gguf"
        os.link(src, out)
    before = _digest(src)
    msg = measured(lambda: requantize(src, out, "Q8_0"), ConvertError)
    assert "is the input file" in msg and _digest(src) == before
    r = CliRunner().invoke(qquantize, [str(src), str(out), "--type", "Q8_0", "-q"])
    assert r.exit_code == 2 and "qquantize: error:" in r.output and _digest(src) == before


# ---------------------------------------------------------------------------------------------------------
# the exporter: our errors, and never over its input

@pytest.mark.parametrize("change, err, words", [
    (dict(meta={"tokenizer.ggml.bos_token_id": "1"}), ConvertError, "tokenizer.ggml.bos_token_id: expected"),
    (dict(meta={"tokenizer.ggml.tokens": np.arange(264, dtype=np.int32)}), FormatError, "tokenizer.ggml.tokens"),
    (dict(meta={"tokenizer.ggml.add_bos_token": 1}), ConvertError, "tokenizer.ggml.add_bos_token"),
    (dict(meta={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                "llama.rope.scaling.original_context_length": "8k"}), FormatError, "original_context_length"),
    (dict(replace={"output_norm.weight": ((32,), GGMLType.F32, f32(np.ones(32)))}), ModelError, "output_norm.weight"),
    (dict(add={"blk.7.ffn_up.weight": ((64,), GGMLType.F32, f32(np.ones(64)))}), ModelError, "blk.7.ffn_up.weight"),
])
def test_exporter_errors_are_ours(base: Path, tmp_path: Path, change: dict, err: type, words: str) -> None:
    src = rewrite(base, tmp_path / "bad.gguf", **change)
    msg = measured(lambda: export_hf(src, tmp_path / "hf"), err)
    assert words in msg and not (tmp_path / "hf").exists()


def test_exporter_keeps_yarn_scaling(base: Path, tmp_path: Path) -> None:
    """yarn is not run by the runtime, but a file that says it exports to a config.json that says it too."""
    import json

    meta = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    src = rewrite(base, tmp_path / "yarn.gguf", meta=meta, drop=("rope_freqs.weight",))  # rope_freqs: no export
    out = export_hf(src, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}


@pytest.mark.parametrize("target", ["parent", "file"])
def test_exporter_never_replaces_its_input(base: Path, tmp_path: Path, target: str) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    src = folder / "m.gguf"
    src.write_bytes(base.read_bytes())
    before = _digest(src)
    out = folder if target == "parent" else src
    msg = measured(lambda: export_hf(src, out, overwrite=True), ConvertError)
    assert "holds the input file" in msg and _digest(src) == before and sorted(os.listdir(folder)) == ["m.gguf"]
