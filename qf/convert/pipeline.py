"""HF checkpoint folder -> one .qf file: plan every tensor and key first, then stream tensor by tensor."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qf.convert.archspec import (
    CONFIG_SOURCES, KV, ArchSpec, NameMap, head_permutation, resolve_hparams, tensor_suffix,
)
from qf.convert.checkpoint import INDEX_NAME, Checkpoint
from qf.convert.hf_config import CONFIG_NAME, architecture_of, check_quantization, load_config
from qf.convert.json_fields import Fields
from qf.convert.quant_import import QUANT_METHODS, LinearPayload
from qf.convert.quant_import.transcode import Decision, decide
from qf.convert.registry import spec_for_hf, supported_hf_architectures
from qf.convert.safetensors_io import FLOAT_DTYPES
from qf.convert.tokenizer import TOKENIZER_FILES, tokenizer_kv
from qf.format.errors import ConvertError, QFError
from qf.format.ggml_types import GGMLType, row_bytes
from qf.format.hparams import LIMITS, ModelCheckError, check_limits
from qf.format.model_check import KVMetadata, TensorDecl, squeeze_ne, validate_model
from qf.format.output_guard import refuse_input_as_output
from qf.format.values import GGUFValueType as V
from qf.quant.codecs import get_codec, registered_types
from qf.quant.formats import fold_payloads, member_name, payload_kv
from qf.quant.formats.transcode import RULES, encode_rows
from qf.quant.imatrix import ImportanceMatrix
from qf.quant.mixes import Mix, TensorCtx, check_importance, choose_type, file_type, get_mix
from qf.quant.tensor_plan import (  # noqa: F401  (re-exported: the planning types live in qf.quant)
    CHUNK_ELEMENTS, QUANTIZATION_VERSION, ConvertSummary, PlannedTensor, Progress, summarize, write_tensors,
)

UNWEIGHTED = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})  # types an imatrix cannot change
DEFAULT_TYPE = "Q8_0"  # --type of a plain checkpoint when none is given
DEFAULT_QUANTIZED_REST = "F16"  # --type of a quantized checkpoint's unquantized tensors when none is given
INPUT_NAMES = (CONFIG_NAME, INDEX_NAME, *TOKENIZER_FILES)  # files of a checkpoint folder a conversion may read


@dataclass
class ConvertPlan:
    """Everything the writer needs, decided before a byte is written."""

    spec: ArchSpec
    mix_name: str
    kv: list[KV]
    tensors: list[PlannedTensor]
    notes: list[str] = field(default_factory=list)  # per payload scheme: what was written and why

    @property
    def total_bytes(self) -> int:
        """Tensor bytes the file will hold."""
        return sum(t.nbytes for t in self.tensors)


def _config_ints(kv: list[KV]) -> dict[str, Any]:
    """Resolved hyperparameters by key suffix after the architecture name."""
    return {k.split(".", 1)[1]: v for k, v, _ in kv}


Mapped = dict[str, tuple[int | None, list[tuple[int, str]]]]  # GGUF name -> (layer, [(expert, HF name)])


def _map_names(spec: ArchSpec, ckpt: Checkpoint, tied: bool, names_in: list[str] | None = None) -> Mapped:
    """GGUF name -> (layer, its HF sources) for every tensor kept; unknown names are an error. A GGUF tensor
    stacking experts gets one HF tensor per expert, numbered 0..E-1 without a gap."""
    names = NameMap(spec.tensor_map)
    ignore = [re.compile(p) for p in spec.ignore]
    mapped: Mapped = {}
    unknown = []
    for hf in (ckpt.names() if names_in is None else names_in):
        if any(p.search(hf) for p in ignore):
            continue
        m = names.to_gguf(hf)
        if m is None:
            unknown.append(hf)
        elif not (tied and m[0] == "output.weight"):
            mapped.setdefault(m[0], (m[1], []))[1].append((-1 if m[2] is None else m[2], hf))
    if unknown:
        raise ConvertError(f"{ckpt.dir}: tensors with no {spec.gguf_arch} mapping: {', '.join(sorted(unknown)[:10])}")
    for name, (_, parts) in mapped.items():
        parts.sort()
        ids = [x for x, _ in parts]
        if len(parts) > 1 and ids != list(range(len(parts))):
            raise ConvertError(f"{ckpt.dir}: {name} stacks experts {ids[:10]}...: expected 0..{len(parts) - 1} "
                               "without a gap, each once")
    return mapped


def _check_tensors(spec: ArchSpec, mapped: Mapped, n_layers: int, where: Path, n_expert: int = 0) -> None:
    """Every layer's required tensors present; no layer beyond block_count; every expert of a stack."""
    have = set(mapped)
    beyond = sorted(g for g, (b, _) in mapped.items() if b is not None and b >= n_layers)
    if beyond:
        raise ConvertError(f"{where}: tensors for layers beyond num_hidden_layers={n_layers}: {', '.join(beyond[:10])}")
    stacks = sorted(g for g, (_, parts) in mapped.items() if parts[0][0] >= 0 and len(parts) != n_expert)
    if stacks:
        g = stacks[0]
        raise ConvertError(f"{where}: {g} has {len(mapped[g][1])} experts, config.json says {n_expert}: "
                           f"{mapped[g][1][0][1]} ...")
    need = [t.replace("{bid}", str(b)) for t in spec.required_tensors
            for b in (range(n_layers) if "{bid}" in t else [None])]
    missing = [n for n in need if n not in have]
    if missing:
        raise ConvertError(f"{where}: checkpoint is missing tensors: {', '.join(missing[:10])}"
                           + (f" ... ({len(missing) - 10} more)" if len(missing) > 10 else ""))


def _order_key(t: PlannedTensor, layer: int | None, rank: int) -> tuple[int, int, int]:
    """Generated tensors, token_embd, blocks by layer, then the rest (output_norm, output); name-map order within."""
    if t.source is None:
        return (0, 0, rank)
    if layer is not None:
        return (2, layer, rank)
    return (1 if t.name.startswith("token_embd") else 3, 0, rank)


def _payload_names(ckpt: Checkpoint, payloads: dict[str, LinearPayload]) -> list[str]:
    """The checkpoint's tensor names with each quantized linear's members replaced by its logical weight name."""
    consumed = {n for lp in payloads.values() for n in lp.consumed}
    return [n for n in ckpt.names() if n not in consumed] + [n for n in payloads if n not in ckpt or n in consumed]


def _member_readers(lp: LinearPayload, heads: int | None, ckpt: Checkpoint) -> dict[str, Callable[[], np.ndarray]]:
    """Each member's reader, output rows permuted into GGML's head order when asked."""
    perm = head_permutation(lp.n_out, heads) if heads else None
    out = {}
    for suffix, m in lp.members.items():
        if perm is not None and m.row_block > 1 and np.any(perm // m.row_block != np.arange(lp.n_out) // m.row_block):
            raise ConvertError(f"{ckpt.dir}: tensor {lp.hf_weight!r}: its {m.row_block}-row scale blocks cannot "
                               f"follow the Q/K head permutation ({heads} heads)")
        out[suffix] = m.read if perm is None or m.row_block != 1 else (
            lambda r=m.read: np.ascontiguousarray(r()[perm]))
    return out


def _payload_members(name: str, lp: LinearPayload, heads: int | None, ckpt: Checkpoint) -> list[PlannedTensor]:
    """The member tensors of one payload weight."""
    return [PlannedTensor(member_name(name, suffix), lp.members[suffix].ne, lp.members[suffix].type,
                          source=lp.consumed[0], produce=read, group=lp.scheme, payload=(name, lp.scheme))
            for suffix, read in _member_readers(lp, heads, ckpt).items()]


def _transcoded(name: str, lp: LinearPayload, heads: int | None, ckpt: Checkpoint, target: GGMLType
                ) -> PlannedTensor:
    """One payload weight written as a ggml block type (qf.quant.formats.transcode)."""
    rule = next(r for r in RULES if r.target == target)
    readers = _member_readers(lp, heads, ckpt)

    def produce() -> np.ndarray:
        return encode_rows(rule, lp.scheme, {s: r() for s, r in readers.items()}, lp.n_in)

    return PlannedTensor(name, (lp.n_in, lp.n_out), target, source=lp.consumed[0], produce=produce,
                         group=f"{lp.scheme} -> {target.name}")


def _plan_tensors(spec: ArchSpec, ckpt: Checkpoint, cfg: dict[str, Any], hp: dict[str, Any], mix: Mix,
                  where: Path, imatrix: ImportanceMatrix | None = None,
                  payloads: dict[str, LinearPayload] | None = None,
                  transcode: dict[str, GGMLType] | None = None) -> list[PlannedTensor]:
    """One PlannedTensor per output tensor, in file order (with its importance, given an imatrix); a quantized
    linear of the checkpoint (payloads, by HF weight name) becomes its member tensors, or one ggml tensor when
    transcode names its type."""
    payloads, transcode = payloads or {}, transcode or {}
    tied = Fields(cfg, where / CONFIG_NAME).bool("tie_word_embeddings", False) or "lm_head.weight" not in (
        set(ckpt.names()) | set(payloads))
    mapped = _map_names(spec, ckpt, tied, _payload_names(ckpt, payloads) if payloads else None)
    n_layers = int(hp["block_count"])
    n_expert = int(hp.get("expert_count", 0))
    _check_tensors(spec, mapped, n_layers, where, n_expert)
    n_gqa = int(hp["attention.head_count"]) // int(hp["attention.head_count_kv"])
    avail = registered_types()
    rank = {dst: i for i, dst in enumerate(dict.fromkeys(spec.tensor_map.values()))}  # file order: the name map
    keyed = []
    for name, (layer, parts) in mapped.items():
        hf = parts[0][1]
        template = name if layer is None else name.replace(f"blk.{layer}.", "blk.{bid}.", 1)
        if hf in payloads:
            if len(parts) > 1 or parts[0][0] >= 0:
                raise ConvertError(f"{ckpt.dir}: tensor {hf!r}: quantized experts are not supported yet")
            heads_key = spec.permute.get(tensor_suffix(name))
            heads = None if heads_key is None else int(hp[heads_key])
            members = ([_transcoded(name, payloads[hf], heads, ckpt, transcode[hf])] if hf in transcode
                       else _payload_members(name, payloads[hf], heads, ckpt))
            for i, t in enumerate(members):
                keyed.append((_order_key(t, layer, rank[template]) + (i,), t))
            continue
        shapes = {ckpt.entry(h).shape for _, h in parts}
        for _, h in parts:
            e = ckpt.entry(h)
            if e.dtype not in FLOAT_DTYPES:
                raise ConvertError(f"{ckpt.dir}: tensor {h} has dtype {e.dtype}; supported: {', '.join(FLOAT_DTYPES)}")
        if len(shapes) > 1:
            raise ConvertError(f"{ckpt.dir}: the experts of {name} differ in shape: {sorted(shapes)[:4]}")
        stacked = parts[0][0] >= 0
        ne = (tuple(reversed(ckpt.entry(hf).shape)) or (1,)) + ((len(parts),) if stacked else ())
        suffix = tensor_suffix(name)
        heads_key = spec.permute.get(suffix)
        ctx = TensorCtx(name, ne, layer, n_layers, tied, n_gqa, n_expert, has_imatrix=imatrix is not None)
        qt = choose_type(mix, ctx, avail)
        imp = imatrix.for_tensor(name, ne) if imatrix is not None and qt not in UNWEIGHTED else None
        if imatrix is not None:
            check_importance(mix, name, qt, imp)
        t = PlannedTensor(name, ne, qt, hf, None if heads_key is None else int(hp[heads_key]),
                          shift=float(spec.value_shift.get(suffix, 0.0)), importance=imp,
                          parts=tuple(h for _, h in parts) if stacked else ())
        keyed.append((_order_key(t, layer, rank[template]) + (0,), t))
    for i, (name, data) in enumerate(spec.extra_tensors(cfg, where / "config.json").items()):
        t = PlannedTensor(name, tuple(reversed(data.shape)), GGMLType.F32, data=np.asarray(data, np.float32))
        keyed.append((_order_key(t, None, i) + (0,), t))
    return [t for _, t in sorted(keyed, key=lambda kt: kt[0])]


def _vocab_rows(tensors: list[PlannedTensor], cfg: dict[str, Any], where: Path) -> int:
    """Rows of the token embedding: the size the tokenizer is filled to, checked first against its limit and
    against config.json vocab_size (nothing is sized by that number unchecked)."""
    emb = next(t for t in tensors if t.name == "token_embd.weight")
    ne = squeeze_ne(emb.ne, 2)
    if len(ne) != 2:
        raise ConvertError(f"{where}: tensor {emb.source} must be 2-D [vocab, hidden], has shape "
                           f"{tuple(reversed(emb.ne))}")
    rows = ne[1]
    if rows > LIMITS["vocab_size"]:
        raise ConvertError(f"{where}: tensor {emb.source} has {rows} rows; at most {LIMITS['vocab_size']} tokens "
                           "are supported")
    f = Fields(cfg, where / CONFIG_NAME)
    if f.has("vocab_size") and f.int("vocab_size", lo=1, hi=LIMITS["vocab_size"]) != rows:
        raise ConvertError(f"{where / CONFIG_NAME}: config.json 'vocab_size' {f.int('vocab_size')} disagrees with "
                           f"the {rows} rows of {emb.source}")
    return rows


def _check_vocab(tensors: list[PlannedTensor], tok_kv: list[KV], where: Path) -> None:
    """The tokenizer must have exactly one token per embedding row."""
    n_tokens = len(next(v for k, v, _ in tok_kv if k == "tokenizer.ggml.tokens"))
    rows = next(t.ne[1] for t in tensors if t.name == "token_embd.weight")
    if n_tokens != rows:
        raise ConvertError(f"{where}: tokenizer has {n_tokens} tokens but embed_tokens has {rows} rows")


def _config_source(spec: ArchSpec, key: str) -> str | None:
    """The config.json key(s) a GGUF key is made from, for messages."""
    suffix = key.split(".", 1)[1] if key.startswith(spec.gguf_arch + ".") else key
    table = {hp.key: " or ".join(hp.hf) for hp in spec.hparams}
    return table.get(suffix) or CONFIG_SOURCES.get(suffix)


def _as_convert_error(e: QFError, spec: ArchSpec, tensors: list[PlannedTensor], where: Path) -> ConvertError:
    """A validator error (about the file we would write) restated in terms of the checkpoint."""
    if not isinstance(e, ModelCheckError):
        return ConvertError(f"{where}: {e}")
    tail = "; the runtime would refuse the converted file, so nothing was written"
    if e.tensor:
        src = next((t.source for t in tensors if t.name == e.subject), None)
        what = f"tensor {src!r} ({e.subject})" if src else f"generated tensor {e.subject!r} (from config.json)"
        return ConvertError(f"{where}: {what}: {e.reason}{tail}")
    src = _config_source(spec, e.subject)
    if src is None:
        return ConvertError(f"{where}: {e.subject}: {e.reason}{tail}")
    return ConvertError(f"{where / CONFIG_NAME}: config.json {src!r} ({e.subject}): {e.reason}{tail}")


def _checked_hparams(spec: ArchSpec, cfg: dict[str, Any], cfg_path: Path, where: Path) -> list[KV]:
    """The hyperparameter keys, each size within the shared limits before any list or loop is sized by it."""
    kv = resolve_hparams(spec, cfg, cfg_path)
    _check_limits(spec, kv, where)
    kv = kv + spec.extra_kv(cfg, cfg_path)  # after the check: extra_kv loops over num_hidden_layers
    _check_limits(spec, kv, where)
    return kv


def _check_limits(spec: ArchSpec, kv: list[KV], where: Path) -> None:
    """The shared size limits (qf.format.hparams.LIMITS) on the keys resolved so far."""
    try:
        check_limits(KVMetadata(kv, str(where)), spec.gguf_arch, str(where))
    except QFError as e:
        raise _as_convert_error(e, spec, [], where) from None


def check_plan(spec: ArchSpec, kv: list[KV], tensors: list[PlannedTensor], where: Path) -> None:
    """The file about to be written, through the validator the runtime loads with (qf.format.model_check)."""
    table = {t.name: TensorDecl(t.ne, t.type) for t in tensors}
    generated = {t.name: t.data for t in tensors if t.data is not None}
    try:
        meta = KVMetadata(kv, str(where))
        table, _ = fold_payloads(meta, table, str(where))
        validate_model(meta, table, str(where), registered_types(), generated.__getitem__)
    except QFError as e:
        raise _as_convert_error(e, spec, tensors, where) from None


def plan_conversion(model_dir: str | Path, qtype: str | None, ckpt: Checkpoint | None = None,
                    imatrix: ImportanceMatrix | None = None, keep_payload: bool = False,
                    transcode_lossy: bool = False) -> tuple[ConvertPlan, Checkpoint]:
    """Validate config, tensors and tokenizer; decide every key and tensor type; check the whole plan with the
    runtime's validator. Returns the open checkpoint too. qtype None: Q8_0, or F16 for the unquantized tensors
    of a quantized checkpoint, whose quantized linears become ggml types when every one transcodes exactly (or
    lossily, with transcode_lossy), else keep their payload (always, with keep_payload)."""
    model_dir = Path(model_dir)
    if qtype is None:
        quantized = isinstance(load_config(model_dir).get("quantization_config"), dict)
        qtype = DEFAULT_QUANTIZED_REST if quantized else DEFAULT_TYPE
    mix = get_mix(qtype)
    if mix.default not in registered_types():
        raise ConvertError(f"type {qtype} needs a {mix.default.name} codec, which is not available")
    cfg = load_config(model_dir)
    cfg_path = model_dir / CONFIG_NAME
    check_quantization(cfg, cfg_path)
    spec = spec_for_hf(architecture_of(cfg, cfg_path, supported_hf_architectures()))
    hparams = _checked_hparams(spec, cfg, cfg_path, model_dir)
    ckpt = ckpt or Checkpoint(model_dir)
    try:
        qc = cfg.get("quantization_config")
        importer = QUANT_METHODS[qc["quant_method"]] if isinstance(qc, dict) else None
        payloads = importer.scan(ckpt, qc, cfg_path) if importer is not None else {}
        decision = decide(payloads, keep_payload, transcode_lossy)
        tensors = _plan_tensors(spec, ckpt, cfg, _config_ints(hparams), mix, model_dir, imatrix, payloads,
                                decision.targets)
        tok = tokenizer_kv(model_dir, cfg, _vocab_rows(tensors, cfg, model_dir))
        _check_vocab(tensors, tok, model_dir)
        name = Fields(cfg, cfg_path).str("_name_or_path", None) or model_dir.resolve().name
        general: list[KV] = [
            ("general.architecture", spec.gguf_arch, V.STRING),
            ("general.type", "model", V.STRING),
            ("general.name", name.rstrip("/").rsplit("/", 1)[-1], V.STRING),
            ("general.file_type", _file_type(qtype, decision), V.UINT32),
            ("general.quantization_version", QUANTIZATION_VERSION, V.UINT32),
        ]
        written = list(dict.fromkeys(t.payload for t in tensors if t.payload is not None))
        kv = (general + hparams + tok + (imatrix.kv() if imatrix is not None else [])
              + payload_kv(written, importer.source if importer is not None else None))
        check_plan(spec, kv, tensors, model_dir)
    except BaseException:
        ckpt.close()
        raise
    return ConvertPlan(spec, qtype.upper(), kv, tensors, decision.notes), ckpt


def _file_type(qtype: str, decision: Decision) -> int:
    """general.file_type: the transcoded linears' type when there is one, else the --type mix's."""
    targets = set(decision.targets.values())
    return file_type(targets.pop().name) if len(targets) == 1 else file_type(qtype)


def input_files(model_dir: Path, ckpt: Checkpoint) -> list[Path]:
    """Every file a conversion reads (those present): config, tokenizer files, the index and the shards."""
    return [model_dir / n for n in INPUT_NAMES] + [f.path for f in ckpt.shards.values()]


def _encode(ckpt: Checkpoint, t: PlannedTensor) -> np.ndarray:
    """The stored bytes of one tensor: u8 [n_rows, row_bytes], converted a chunk of rows at a time; a stack of
    experts is each expert's rows in turn."""
    if t.parts:
        out = [_encode(ckpt, replace(t, source=h, parts=(), ne=t.ne[:-1])) for h in t.parts]
        for h in t.parts:
            ckpt.release(h)
        return np.concatenate(out, axis=0)
    if t.produce is not None:
        return t.produce()
    codec = get_codec(t.type)
    ne0 = t.ne[0]
    if t.data is not None:
        return codec.quantize(t.data.reshape(-1, ne0), t.importance)
    shape = ckpt.entry(t.source).shape or (1,)
    axis0 = shape[0]
    per_axis0 = int(np.prod(shape[1:], dtype=np.int64))  # values behind one axis-0 index
    if len(shape) == 1:  # 1-D: one row; permuting reorders its values
        x = ckpt.to_f32(t.source).reshape(-1)
        if t.shift:
            x = x + np.float32(t.shift)
        if t.permute_heads:
            x = x[head_permutation(axis0, t.permute_heads)]
        return codec.quantize(x.reshape(1, ne0), t.importance)
    rows_per_index = per_axis0 // ne0
    out = np.empty((axis0 * rows_per_index, row_bytes(t.type, ne0)), np.uint8)
    perm = head_permutation(axis0, t.permute_heads) if t.permute_heads else None
    step = max(1, CHUNK_ELEMENTS // max(1, per_axis0))
    for a in range(0, axis0, step):
        b = min(axis0, a + step)
        sel = slice(a, b) if perm is None else perm[a:b]
        x = ckpt.to_f32(t.source, sel).reshape(-1, ne0)  # x: [(b - a) * rows_per_index, ne0]
        if t.shift:
            x = x + np.float32(t.shift)
        out[a * rows_per_index:b * rows_per_index] = codec.quantize(x, t.importance)
        ckpt.release(t.source)  # source pages leave our resident set chunk by chunk
    return out


encode_tensor = _encode  # public name for writers above convert (qf.calib): one planned tensor's stored bytes


def write_plan(plan: ConvertPlan, ckpt: Checkpoint, out_path: str | Path, progress: Progress | None = None) -> None:
    """Stream every planned tensor through its codec into an atomically written file."""

    def encode(t: PlannedTensor) -> np.ndarray:
        try:
            return _encode(ckpt, t)
        finally:
            if t.source is not None:
                ckpt.release(t.source)

    write_tensors(out_path, plan.kv, plan.tensors, encode, progress)


def convert(model_dir: str | Path, out_path: str | Path, qtype: str | None = None,
            progress: Progress | None = None, on_plan: Callable[[ConvertPlan], None] | None = None,
            imatrix: ImportanceMatrix | None = None, keep_payload: bool = False,
            transcode_lossy: bool = False) -> ConvertSummary:
    """Convert an HF checkpoint folder to one .qf (GGUF v3) file; the output appears only when complete.

    imatrix (qf.quant.imatrix.load_imatrix) weights the quantizers by column importance, as llama-quantize
    --imatrix does (it names weights by their GGUF names, which is what the file holds). keep_payload /
    transcode_lossy: see plan_conversion."""
    t0 = time.perf_counter()
    plan, ckpt = plan_conversion(model_dir, qtype, imatrix=imatrix, keep_payload=keep_payload,
                                 transcode_lossy=transcode_lossy)
    try:
        extra = [imatrix.path] if imatrix is not None else []
        refuse_input_as_output(out_path, input_files(Path(model_dir), ckpt) + extra, ConvertError)
        if on_plan is not None:
            on_plan(plan)
        write_plan(plan, ckpt, out_path, progress)
    finally:
        ckpt.close()
    return summarize(out_path, plan.tensors, t0, plan.notes)
