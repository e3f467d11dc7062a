"""`qconvert MODEL OUT --type GPTQ-W4G64 --calib FILE` (or `--type Q4_K_M --method gptq`): plan the file with the
method's targets for every linear, then write it in file order while the blocks are calibrated one at a time:
the first tensor of block i asks for block i, which runs (f32 weights of that block only, activations of every
calibration row) and is quantized by the method; its output feeds block i + 1."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qf.calib.data import CalibOptions, check_options, read_documents, sample_windows, tokenize
from qf.calib.layer import Layer
from qf.calib.model import CalibModel, calibration_batch
from qf.convert.pipeline import UNWEIGHTED, check_plan, encode_tensor, input_files, plan_conversion
from qf.format.errors import ConvertError, QFError
from qf.format.output_guard import refuse_input_as_output
from qf.format.values import GGUFValueType as V
from qf.quant.codecs import get_codec
from qf.quant.formats import member_name, payload_kv
from qf.quant.methods import methods
from qf.quant.methods.base import LinearInfo, LinearTarget, TypeSpec
from qf.quant.mixes import file_type
from qf.quant.tensor_plan import ConvertSummary, PlannedTensor, Progress, summarize, write_tensors

Log = Callable[[str], None]
HEAD = "output.weight"  # the untied output head: weighted by the calibration's final activations


def _stderr(line: str) -> None:
    """Progress lines go to stderr."""
    print(line, file=sys.stderr, flush=True)


@dataclass
class LayerStats:
    """What one block's calibration took and how far its linears moved (relative output error)."""

    index: int
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)


class Runner:
    """Calibrates block after block on demand, keeping only the current block's results."""

    def __init__(self, model: CalibModel, spec: TypeSpec, infos: list[LinearInfo], targets: dict[str, LinearTarget],
                 tokens: np.ndarray | None, log: Log) -> None:
        self.model, self.spec, self.log = model, spec, log
        self.method = methods()[spec.method]
        self.by_layer: dict[int, dict[str, LinearInfo]] = {}
        for i in infos:
            self.by_layer.setdefault(i.layer, {})[i.role] = i
        self.targets = targets
        self.tokens = tokens
        n_ctx = 2 if tokens is None else int(tokens.shape[1])
        self.forward = model.forward(n_ctx) if tokens is not None else None
        self.batch = calibration_batch(tokens) if tokens is not None else None
        self.x: np.ndarray | None = None
        self.current: Layer | None = None
        self.stats: list[LayerStats] = []
        self.t0 = time.perf_counter()

    def _embed(self) -> np.ndarray:
        """The calibration rows' embeddings f32 [T, n_embd] (the architecture's embedding hook applied)."""
        x, _ = self.forward._embed(self.batch)
        self.forward.tok_embd = self.forward.output = None  # the f32 embedding (its only use) goes now
        return np.array(x, dtype=np.float32)

    def layer(self, i: int) -> Layer:
        """Block i, calibrated (blocks before it first, in order)."""
        while self.current is None or self.current.index < i:
            nxt = 0 if self.current is None else self.current.index + 1
            self.current = None  # the previous block's weights and results go before the next is read
            self.current = self._calibrate(nxt)
        if self.current.index != i:
            raise QFError(f"calibration: block {i} was asked for after block {self.current.index}")
        return self.current

    def _calibrate(self, i: int) -> Layer:
        """Read block i in f32, let the method quantize it, keep its output for block i + 1."""
        t = time.perf_counter()
        if self.forward is not None and self.x is None:
            self.x = self._embed()
        linears = self.by_layer.get(i, {})
        n_seq, seqlen = (0, 0) if self.tokens is None else self.tokens.shape
        layer = Layer(i, self.model.layer_weights(i), linears,
                      {r: self.targets[info.name] for r, info in linears.items()}, self.forward, self.model.cpu,
                      self.batch, self.x, int(n_seq), int(seqlen))
        out = self.method.quantize_layer(self.spec, layer)
        missing = [r for r in linears if r not in layer.stored]
        if missing:
            raise QFError(f"method {self.spec.method} did not emit {missing} of layer {i}")
        if out is not None:
            self.x = np.asarray(out, np.float32)
        layer.weights = {r: w for r, w in layer.weights.items() if r in layer.changed}  # drop the f32 linears
        st = LayerStats(i, time.perf_counter() - t, dict(layer.errors))
        self.stats.append(st)
        self._progress(st)
        return layer

    def _progress(self, st: LayerStats) -> None:
        """One line per block: time, ETA, mean and worst relative error."""
        n = self.model.hp.n_layer
        done = st.index + 1
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (n - done)
        err = ""
        if st.errors:
            worst = max(st.errors, key=st.errors.get)
            err = (f", rel. output error mean {np.mean(list(st.errors.values())):.4f}, worst {worst} "
                   f"{st.errors[worst]:.4f}")
        self.log(f"{self.spec.name}: layer {done}/{n} in {st.seconds:.1f} s, ETA {eta:.0f} s{err}")

    def head_importance(self) -> np.ndarray | None:
        """Mean square per input of the output head over the calibration rows (after every block and the final
        norm): what an importance matrix holds for output.weight. None without calibration rows."""
        if self.forward is None:
            return None
        self.layer(self.model.hp.n_layer - 1)
        f = self.forward
        h = f.head_be.rms_norm(self.x, f.output_norm, self.model.hp.rms_eps)  # h: [T, n_embd]
        return np.mean(np.square(h, dtype=np.float64), axis=0).astype(np.float32)

    def stored(self, info: LinearInfo) -> Any:
        """The emitted form of a linear."""
        return self.layer(info.layer).stored[info.role]

    def summary(self) -> list[str]:
        """Summary lines: total time and each block's mean relative error."""
        total = sum(s.seconds for s in self.stats)
        lines = [f"calibration: {self.spec.name}, {len(self.stats)} layers in {total:.1f} s"
                 + ("" if self.tokens is None else f", {self.tokens.shape[0]} x {self.tokens.shape[1]} tokens")]
        errs = [f"{s.index}:{np.mean(list(s.errors.values())):.4f}" for s in self.stats if s.errors]
        if errs:
            lines.append("per-layer relative output error (mean over linears): " + " ".join(errs))
        return lines


def _layer_of(name: str) -> int | None:
    """Block index of a GGUF tensor name (blk.N.*), else None."""
    if not name.startswith("blk."):
        return None
    return int(name.split(".", 2)[1])


def _rewrite(tensors: list[PlannedTensor], infos: list[LinearInfo], targets: dict[str, LinearTarget],
             runner_ref: list[Runner]) -> tuple[list[PlannedTensor], list[tuple[str, str]]]:
    """The plan with every calibrated linear replaced by its target (one ggml tensor, or payload members)."""
    by_name = {i.name: i for i in infos}
    out: list[PlannedTensor] = []
    payloads: list[tuple[str, str]] = []
    for t in tensors:
        info = by_name.get(t.name)
        if info is None:
            out.append(t)
            continue
        tg = targets[t.name]
        if tg.ggml is not None:
            out.append(PlannedTensor(t.name, t.ne, tg.ggml, source=t.source, group=f"calibrated {tg.ggml.name}",
                                     produce=lambda i=info: runner_ref[0].stored(i)))
            continue
        payloads.append((t.name, tg.scheme))
        for suffix, ne, typ in tg.members:
            out.append(PlannedTensor(member_name(t.name, suffix), ne, typ, source=t.source, group=tg.scheme,
                                     payload=(t.name, tg.scheme),
                                     produce=lambda i=info, s=suffix: runner_ref[0].stored(i)[s]))
    return out, payloads


def _file_type_kv(kv: list, spec: TypeSpec, targets: dict[str, LinearTarget]) -> list:
    """general.file_type: the mix's, or the linears' ggml type when all share one (F16's when payloads)."""
    types = {t.ggml.name for t in targets.values() if t.ggml is not None}
    name = types.pop() if len(types) == 1 and all(t.ggml for t in targets.values()) else spec.rest
    try:
        ft = file_type(name)
    except KeyError:
        ft = file_type(spec.rest)
    return [(k, ft if k == "general.file_type" else v, vt) for k, v, vt in kv]


def _windows(model: CalibModel, docs: list[str] | None, convs: list | None, calib: CalibOptions) -> np.ndarray:
    """The calibration windows int64 [N, L]: the text tokenized by the model's tokenizer, seeded windows."""
    ids = tokenize(docs, convs, model.encode_text, model.render)
    return sample_windows(ids, calib, model.tokenizer.bos_id if model.tokenizer.vocab.add_bos else None)


def calibration_windows(model_dir: str | Path, calib: CalibOptions) -> np.ndarray:
    """The token windows int64 [N, L] that `qconvert model_dir --calib ...` calibrates on (for comparisons that
    feed another tool the same tokens)."""
    check_options(calib)
    docs, convs = read_documents(calib.path)
    plan, ckpt = plan_conversion(Path(model_dir), "F16")
    try:
        return _windows(CalibModel(plan, ckpt, Path(model_dir), 1), docs, convs, calib)
    finally:
        ckpt.close()


def convert_calibrated(model_dir: str | Path, out_path: str | Path, spec: TypeSpec, calib: CalibOptions | None,
                       progress: Progress | None = None, on_plan: Callable[[Any], None] | None = None,
                       log: Log = _stderr, n_threads: int | None = None) -> ConvertSummary:
    """Convert a checkpoint with a method of qf.quant.methods; the output appears only when complete."""
    t0 = time.perf_counter()
    docs = convs = None
    if spec.calibrated:
        if calib is None:
            raise ConvertError(f"--type {spec.name} calibrates: give --calib FILE (plain text or chat JSONL)")
        check_options(calib)
        docs, convs = read_documents(calib.path)  # bad text is refused before any other work
    model_dir = Path(model_dir)
    plan, ckpt = plan_conversion(model_dir, spec.rest)
    try:
        if any(t.payload is not None for t in plan.tensors) or plan.notes:
            raise ConvertError(f"{model_dir}: already quantized; --type {spec.name} needs an unquantized checkpoint")
        refuse_input_as_output(out_path, input_files(model_dir, ckpt) + ([calib.path] if calib else []),
                               ConvertError)
        model = CalibModel(plan, ckpt, model_dir, n_threads)
        infos = model.linears()
        lplan = methods()[spec.method].plan(spec, infos)
        tokens = _windows(model, docs, convs, calib) if spec.calibrated else None
        runner_ref: list[Runner] = []
        tensors, payloads = _rewrite(plan.tensors, infos, lplan.targets, runner_ref)
        kv = _file_type_kv(plan.kv, spec, lplan.targets) + payload_kv(payloads)
        check_plan(plan.spec, kv, tensors, model_dir)
        plan = replace(plan, kv=kv, tensors=tensors, notes=list(lplan.notes), mix_name=spec.name)
        if on_plan is not None:
            on_plan(plan)
        runner_ref.append(Runner(model, spec, infos, lplan.targets, tokens, log))

        def encode(t: PlannedTensor) -> np.ndarray:
            layer = _layer_of(t.name)
            try:
                if layer is not None:
                    cur = runner_ref[0].layer(layer)
                    role = next((r for r, n in model.layer_names(layer).items() if n == t.name), None)
                    if role in cur.changed:
                        return get_codec(t.type).quantize(cur.weights[role].reshape(1, -1))
                elif t.name == HEAD and spec.calibrated and t.type not in UNWEIGHTED and t.importance is None:
                    t = replace(t, importance=runner_ref[0].head_importance())  # as an imatrix would weight it
                return encode_tensor(ckpt, t)
            finally:
                if t.source is not None:
                    ckpt.release(t.source)

        write_tensors(out_path, kv, tensors, encode, progress)
    finally:
        ckpt.close()
    return summarize(out_path, tensors, t0, plan.notes + runner_ref[0].summary())
