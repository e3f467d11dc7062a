"""The public Python API: `Model.load(path)`, then generate / chat / logits; no global state."""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from qf.format.errors import ContextOverflowError, ModelClosedError, ModelError, PlanError
from qf.format.model_check import unsupported_architecture
from qf.format.reader import open_gguf
from qf.runtime.arch import all_forwards
from qf.runtime import coldstart
from qf.runtime.backend import FLASH_MIN_ROWS, ColdStartBackend, CpuBackend, CpuKV
from qf.runtime.devices import gpu_may_exist
from qf.runtime.placement import Placement, build_forward, placement_from_plan, uniform_placement
from qf.runtime.planner import Plan, TensorOverride, moe_overrides, parse_overrides, plan_from_file
from qf.runtime.chat import ChatTemplate, chat_template_from_metadata
from qf.runtime.generate import Engine, FinishReason, Generation, GenerationStats, LogitsConstraint
from qf.runtime.hparams import HParams, hparams_from_metadata
from qf.runtime.kernels import cpu as kernels
from qf.runtime.kv_cache import DEFAULT_KV_TYPE, KVSpec
from qf.runtime.scheduler import Scheduler
from qf.runtime.sampler import SamplingParams
from qf.runtime.threads import DecodeThreads
from qf.runtime.tokenizer import Tokenizer, load_tokenizer
from qf.runtime.weights import load_tensors

DEFAULT_N_CTX = 4096
MAX_SLOTS = 256  # KV slots (parallel sequences) one model may hold
MAX_LOGPROBS = 20  # alternatives recorded per generated token (OpenAI's top_logprobs limit)
RAM_HEADROOM = 0.9  # the CPU KV cache may take at most this share of the available memory


def _architecture(f: Any, path: str) -> tuple[str, Any, type]:
    """(general.architecture, its spec, its forward class) from the discovered qf.runtime.arch modules, or a
    ModelError listing what is supported and how the file differs."""
    if "general.architecture" not in f.meta:
        raise ModelError(f"{path}: general.architecture: missing")
    name = str(f.meta.get_str("general.architecture"))
    forwards = all_forwards()
    if name not in forwards:
        raise unsupported_architecture(name, path, f.tensors)
    spec, forward_cls = forwards[name]
    return name, spec, forward_cls


def _tokenizer(meta: Any, hp: HParams, path: str) -> Tokenizer:
    """The file's tokenizer; its vocabulary must be the model's."""
    tokenizer = load_tokenizer(meta, path)
    if tokenizer.n_vocab != hp.n_vocab:
        raise ModelError(f"{path}: tokenizer.ggml.tokens: {tokenizer.n_vocab} tokens but the model has "
                         f"{hp.n_vocab} ({hp.arch}.vocab_size / token_embd)")
    return tokenizer


def _placement(path: str, n_ctx: int, n_batch: int, n_layer: int, cpu: CpuBackend,
               gpu_layers: int | str | None, vram: Any, tensor_split: Any,
               kv: KVSpec | None = None, torch_options: Mapping[str, Any] | None = None,
               overrides: Sequence[TensorOverride] = ()) -> tuple[Placement, Plan | None]:
    """Where each layer runs: all on the CPU backend (gpu_layers 0), else as the planner places them."""
    if gpu_layers is None:
        gpu_layers = "auto" if gpu_may_exist() else 0
    if gpu_layers == 0:
        return uniform_placement(n_layer, cpu), None
    plan = plan_from_file(path, n_ctx, gpu_layers, vram=vram, n_batch=n_batch, tensor_split=tensor_split,
                          kv_spec=kv, overrides=overrides)
    opts = dict(torch_options or {})
    stand_in = bool(opts.get("device_map"))
    if plan.hypothetical and plan.n_gpu_layers and not stand_in:
        raise PlanError(f"{path}: the plan puts {plan.n_gpu_layers} layers on a GPU but no CUDA device is "
                        "visible; run with gpu_layers=0, or print the what-if plan with `qrun --plan`")
    return placement_from_plan(plan, cpu=cpu, **opts), plan


def default_threads() -> int:
    """Physical cores (the kernels are memory-bound; hyperthreads do not help)."""
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return max(1, os.cpu_count() or 1)


class Model:
    """A loaded model: weights stay in the mapped file; a KV cache of n_seq slots shared by any number of
    generations from any threads (batched by the scheduler, the rest queued)."""

    def __init__(self, path: str, file: Any, hp: HParams, forward: Any, tokenizer: Tokenizer,
                 template: ChatTemplate, n_batch: int, load_seconds: float, plan: Plan | None = None,
                 threads: DecodeThreads | None = None, n_seq: int = 1, type_k: str = DEFAULT_KV_TYPE,
                 type_v: str = DEFAULT_KV_TYPE) -> None:
        self.path, self.hparams, self.tokenizer, self.template = path, hp, tokenizer, template
        self.plan = plan  # the device placement (None: everything on the CPU)
        self._file = file
        self._forward = forward
        cache = forward.new_cache(n_seq, type_k, type_v)
        self._scheduler = Scheduler(forward, cache, n_batch, threads, self._bind_threads)
        self._engine = Engine(self._scheduler)
        self.load_seconds = load_seconds
        self._last: Generation | None = None
        self._closed = False
        self._cpu: CpuBackend | None = None  # set by load
        self._gate: coldstart.ColdGate | None = None  # set by load on a cold start

    @property
    def kernels_ready(self) -> bool:
        """Whether every op runs on compiled kernels (False during a cold start's numpy window)."""
        if self._gate is None:
            return True
        self._gate.refresh()
        return self._gate.warm

    def wait_kernels(self, timeout: float | None = None) -> bool:
        """Wait until the cold start's background compile has put every kernel in numba's disk cache (the next
        forward pass then runs compiled); True when it has (at once without a cold start)."""
        return True if self._gate is None else self._gate.wait(timeout)

    @property
    def repacked_bytes(self) -> int:
        """RAM the CPU backend's repacked weights take beyond the mmap'd file (0 without repack)."""
        return 0 if self._cpu is None else int(self._cpu.repacked_bytes)

    @classmethod
    def load(cls, path: str | os.PathLike, n_ctx: int | None = None, n_threads: int | None = None,
             n_batch: int = 256, warmup: bool = True, gpu_layers: int | str | None = 0,
             vram: str | int | None = None, tensor_split: str | None = None,
             cpu_backend: CpuBackend | None = None, n_seq: int = 1, type_k: str = DEFAULT_KV_TYPE,
             type_v: str = DEFAULT_KV_TYPE, allow_context_extension: bool = False,
             torch_options: Mapping[str, Any] | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
             override_tensor: str | Sequence[str] | None = None, precompile: bool = True,
             repack: bool = False, cold_start: bool | None = None) -> "Model":
        """Open a .qf/.gguf file by mmap, validate it, and prepare a KV cache of n_seq slots of n_ctx positions.

        gpu_layers: 0 runs on the CPU; N puts the last N layers on the GPU(s) (llama.cpp's -ngl); "auto"
        fits as many as the free VRAM (capped by vram) holds; None means "auto" when a GPU may exist.
        n_threads None (all physical cores) lets CPU-only decoding drop to half of them while that measures
        faster (another process holding a core stalls fork-join kernels; qf.runtime.threads); a number pins it.
        The placement is checked against the budget before any weight is uploaded (PlanError if not).
        cpu_backend replaces the CPU backend (e.g. a subclass that observes the matrix products, as
        qf.eval.imatrix does); its own thread count applies.
        n_seq: KV slots, i.e. generations that run (batched) at once; more wait for a slot (llama.cpp's -np).
        type_k / type_v: KV cache types f32, f16 (default), q8_0, q4_0 (llama.cpp's -ctk / -ctv).
        n_ctx beyond the model's trained context is refused unless allow_context_extension (then a warning).
        torch_options go to each GPU's TorchBackend: weight_dtype, kernels ("auto" | "triton" | "torch"),
        tile_elems, compile, and device_map (plan device -> torch device, e.g. {"cuda:0": "cpu"} in tests).
        cpu_moe / n_cpu_moe N / override_tensor "REGEX=DEVICE" (llama.cpp's --cpu-moe, --n-cpu-moe, -ot): keep
        the expert tensors of every / the first N / the matching layers on that device when the planner places
        layers (gpu_layers != 0); the memory breakdown counts them there.

        warmup (as llama.cpp does) evaluates a token and a 1-token step once, so that the decode kernels (compiled
        or loaded from numba's cache) and the first page-in of the weights count as load time, not as prompt
        time. The prefill kernels compile on the first prompt, only those its length needs (a fresh install's
        first long prompt never compiles the short-batch kernels). precompile: those of the integer prefill path
        compile meanwhile in background processes (one per spare core) when numba's disk cache lacks them, so a
        fresh install's first prompt finds them there (kernels.cpu.precompile_background).
        repack: the CPU backend keeps quantized weights as integer panels in RAM beyond the mmap (llama.cpp
        repacks by default; kernels/cpu_repack.py); `repacked_bytes` says how much once loaded.
        cold_start (None: on unless QF_COLD_START=0): when numba's disk cache lacks this model's kernels (a fresh
        install), skip the warm-up, run on numpy + BLAS (kernels/cold.py, nothing to compile) and compile the
        kernels in one background process; each kernel set is used from the forward pass after it is cached
        (qf.runtime.coldstart; `kernels_ready` / `wait_kernels`). Only for a model wholly on the CPU backend it
        builds (no cpu_backend, no GPU layers) and with precompile (background processes allowed).
        """
        t0 = time.perf_counter()
        path = os.fspath(path)
        n_seq = _positive_int(n_seq, "n_seq", MAX_SLOTS)
        n_batch = _positive_int(n_batch, "n_batch", 1 << 16)
        f = open_gguf(path)
        try:
            arch, spec, forward_cls = _architecture(f, path)
            hp = hparams_from_metadata(f.meta, arch, path)
            tokenizer = _tokenizer(f.meta, hp, path)
            ctx = _context_size(n_ctx, hp, allow_context_extension)
            kv = KVSpec(n_seq, ctx, hp.n_head_kv, hp.head_dim, hp.head_dim, type_k, type_v)
            gate = None
            if precompile and cpu_backend is None and coldstart.enabled(cold_start) \
                    and (gpu_layers == 0 or (gpu_layers is None and not gpu_may_exist())):
                key = coldstart.model_key({ti.type for ti in f.tensors.values()}, kv.type_k, kv.type_v,
                                          forward_cls.activation, repack)
                values = sum(math.prod(ti.ne) for ti in f.tensors.values() if len(ti.ne) >= 2)
                gate = coldstart.ColdGate.for_model(key) if values <= coldstart.COLD_MAX_VALUES else None
                gate = None if gate is None or gate.warm else gate
            if gate is not None:
                cpu = ColdStartBackend(gate, n_threads or default_threads(), repack=repack,
                                       wait_decode=values > coldstart.COLD_STEP_MAX_VALUES and not repack)
            else:
                cpu = cpu_backend or CpuBackend(n_threads or default_threads(), repack=repack)
            overrides = moe_overrides(cpu_moe, n_cpu_moe) + parse_overrides(override_tensor)
            placement, plan = _placement(path, ctx, n_batch, hp.n_layer, cpu, gpu_layers, vram, tensor_split, kv,
                                         torch_options, overrides)
            _check_host_memory(kv, sum(be is cpu for be in placement.layers))
            if gate is None and precompile and kernels.INT8_MIN_TOKENS is not None \
                    and any(be is cpu for be in placement.layers):
                kernels.precompile_background({ti.type for ti in f.tensors.values()})
            forward = build_forward(forward_cls, hp, spec, load_tensors(f, hp, path), placement, ctx)
            if gate is not None:  # the file checked out: compile its kernels (the integer ones in turn)
                coldstart.spawn_compile(gate, path, ctx, cpu.n_threads, kv.type_k, kv.type_v, repack)
            template = chat_template_from_metadata(f.meta, *_bos_eos_text(tokenizer))
        except BaseException:
            f.close()
            raise
        adapt = (n_threads is None and cpu_backend is None and plan is None and cpu.n_threads is not None
                 and cpu.n_threads > 1)
        model = cls(path, f, hp, forward, tokenizer, template, n_batch, 0.0, plan,
                    DecodeThreads(cpu.n_threads) if adapt else None, kv.n_slots, kv.type_k, kv.type_v)
        model._cpu = cpu
        model._gate = gate
        if gate is not None and model._scheduler.threads is not None:
            gate.on_switch.append(model._scheduler.threads.reset)  # numpy step times say nothing of the kernels'
        if warmup and (gate is None or gate.decode):
            model._warmup()
        model.load_seconds = time.perf_counter() - t0
        return model

    def _bind_threads(self, n: int | None = None) -> None:
        """Apply each backend's thread count (or n) to the calling thread (numba's setting is per thread)."""
        f = self._forward
        for be in {id(b): b for b in (f.embed_be, *f.placement, f.head_be)}.values():
            be.set_threads(n)

    def _warmup(self) -> None:
        """Evaluate a token and a step (the decode kernels), then empty the cache."""
        eng = self._engine
        tok = self.tokenizer.bos_id or 0
        with eng.lock:
            if eng.n_ctx >= 2:
                eng.prefill([tok])
                eng.step(tok)
            self._warmup_prefill_attention()
            eng.cache.clear()
            if eng.threads is not None:
                eng.threads.reset()

    def _warmup_prefill_attention(self) -> None:
        """Run the tiled prefill attention of the first CPU layer once on zeros (it reads the cache, writes
        nothing): a fresh install compiles it here, while the background processes compile the integer
        prefill kernels, and its first prompt then only waits for those."""
        eng, hp = self._engine, self.hparams
        kv = next((layer for layer in eng.cache.layers if isinstance(layer, CpuKV)), None)
        n = FLASH_MIN_ROWS
        if kv is None or eng.n_ctx < n or hp.head_dim % 16:
            return
        eng.bind_threads()
        q = np.zeros((n, hp.n_head, hp.head_dim), np.float32)  # [M, H, D] as the layers give it
        kv.attend(q, np.zeros(n, np.int64), np.arange(n, dtype=np.int64))

    # -- properties ------------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        """Context length of this model's KV cache."""
        return self._engine.n_ctx

    @property
    def n_past(self) -> int:
        """Positions filled in the slot of the most recent generation (slot 0 before any)."""
        slot = self._last.slot if self._last is not None and self._last.slot is not None else 0
        return self._scheduler.cache.n_past(slot)

    @property
    def n_seq(self) -> int:
        """KV slots: generations that run at once."""
        return self._scheduler.cache.n_slots

    @property
    def kv_spec(self) -> KVSpec:
        """Shape and types of the KV cache."""
        return self._scheduler.cache.spec

    @property
    def kv_bytes(self) -> int:
        """Bytes the KV cache holds on all devices."""
        return self._scheduler.cache.nbytes()

    @property
    def scheduler(self) -> Scheduler:
        """The request scheduler (queue depth, running requests)."""
        return self._scheduler

    @property
    def engine(self) -> Engine:
        """The low-level evaluator (prefill / step over the KV cache), for benchmarks and tools."""
        return self._engine

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        return self.hparams.n_vocab

    @property
    def bos_id(self) -> int | None:
        """The BOS token id (None when the vocabulary has none)."""
        return self.tokenizer.bos_id

    @property
    def add_bos(self) -> bool:
        """Whether tokenize(add_special=True) prepends BOS (tokenizer.ggml.add_bos_token)."""
        return bool(self.tokenizer.vocab.add_bos and self.tokenizer.bos_id is not None)

    @property
    def eos_id(self) -> int | None:
        """The EOS token id."""
        return self.tokenizer.eos_id

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why the most recent generation ended ("stop" | "length" | "cancelled"), None while running."""
        return None if self._last is None else self._last.finish_reason

    @property
    def last_stats(self) -> GenerationStats | None:
        """Token counts and timings of the most recent generation."""
        return None if self._last is None else self._last.stats

    # -- text <-> tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True,
                 max_tokens: int | None = None) -> list[int]:
        """Token ids of text (BOS/EOS per the file when add_special; special-token texts parsed when asked).

        max_tokens: ContextOverflowError as soon as the text is known to take more (tokenizing stops there)."""
        self._check_open()
        if not isinstance(text, str):
            raise ModelError(f"text to tokenize must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special, max_tokens=max_tokens)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of token ids (control tokens rendered only when special=True)."""
        self._check_open()
        ids = _token_ids(tokens)
        self._check_ids(ids)
        return self.tokenizer.decode(ids, special=special)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text the file's (sandboxed) chat template makes of a conversation."""
        self._check_open()
        return self.template.render(messages, add_generation_prompt=add_generation_prompt)

    def chat_tokens(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Prompt tokens for a conversation; BOS added only when the template did not write it."""
        text = self.apply_chat_template(messages)
        tok = self.tokenizer
        ids = self._prompt_ids(text, add_special=False)
        wants_bos = tok.vocab.add_bos and tok.bos_id is not None
        if wants_bos and not text.startswith(tok.token_text(tok.bos_id)):
            ids = [tok.bos_id] + ids
        return ids

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_tokens: int | None = 128, stop: Sequence[str] = (),
                 constraint: LogitsConstraint | None = None, logprobs: int | None = None,
                 **sampling: Any) -> Generation:
        """Stream the continuation of a prompt (text or token ids) as text pieces.

        Sampling keywords: temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed
        (temperature 0 = greedy). max_tokens None or < 0 runs until end of generation or a full context.
        constraint masks the logits each step (structured output); logprobs k records each generated token's
        log-probability and the k most likely alternatives in `Generation.logprobs`.
        Raises ContextOverflowError when the prompt does not fit; ends with finish_reason "length" when
        the budget or the context runs out.
        """
        ids = self._prompt_ids(prompt) if isinstance(prompt, str) else _token_ids(prompt)
        return self._start(ids, max_tokens, stop, sampling, constraint, logprobs)

    def _prompt_ids(self, text: str, add_special: bool = True) -> list[int]:
        """A prompt's tokens; ContextOverflowError (tokenizing stops early) when it cannot fit the context."""
        self._check_open()
        if not isinstance(text, str):
            raise ModelError(f"the prompt must be a str or token ids, got {type(text).__name__}")
        try:
            return self.tokenizer.encode(text, add_special=add_special, max_tokens=self.n_ctx)
        except ContextOverflowError as e:
            raise ContextOverflowError(f"the prompt does not fit in the context of {self.n_ctx} tokens: {e}") from None

    def chat(self, messages: Sequence[Mapping[str, Any]], max_tokens: int | None = 512, stop: Sequence[str] = (),
             constraint: LogitsConstraint | None = None, logprobs: int | None = None, **sampling: Any) -> Generation:
        """Stream the assistant's reply to a conversation [{"role": ..., "content": ...}, ...]."""
        return self._start(self.chat_tokens(messages), max_tokens, stop, sampling, constraint, logprobs)

    def _start(self, ids: list[int], max_tokens: int | None, stop: Sequence[str], sampling: dict,
               constraint: LogitsConstraint | None = None, logprobs: int | None = None) -> Generation:
        """Create a generation (queued on the scheduler at its first iteration)."""
        self._check_open()
        self._check_ids(ids)
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = [stop]
        known = SamplingParams.__dataclass_fields__
        unknown = sorted(k for k in sampling if k not in known)
        if unknown:
            raise ModelError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise ModelError(f"logprobs must be an integer in 0..{MAX_LOGPROBS} or None, got {logprobs!r}")
        gen = Generation(self._scheduler, self.tokenizer, ids, SamplingParams(**sampling),
                         _max_tokens(max_tokens), stop, constraint=constraint, logprobs=logprobs)
        self._last = gen
        return gen

    def cancel(self) -> None:
        """Stop the most recent generation at its next token; safe to call from another thread."""
        gen = self._last
        if gen is not None:
            gen.cancel()

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits f32 [n, n_vocab] of every position for a token sequence evaluated from position 0."""
        self._check_open()
        ids = _token_ids(tokens)
        self._check_ids(ids)
        gen = Generation(self._scheduler, self.tokenizer, ids, SamplingParams(), 0, (), all_logits=True)
        gen.wait()
        return gen.logits

    def _check_ids(self, ids: Sequence[int]) -> None:
        """Token ids must be inside the vocabulary."""
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise ModelError(f"token id {bad[0]} is out of range [0, {self.n_vocab})")

    # -- lifetime --------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        """ModelClosedError once the model is closed."""
        if self._closed:
            raise ModelClosedError(f"{self.path}: the model is closed")

    def close(self) -> None:
        """Stop the scheduler (running generations end with an error) and release the mapped file; every
        method raises ModelError afterwards. Closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        self._scheduler.close()
        self._file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        hp = self.hparams
        return (f"Model({self.path!r}, arch={hp.arch}, layers={hp.n_layer}, n_embd={hp.n_embd}, "
                f"vocab={hp.n_vocab}, n_ctx={self.n_ctx})")


def _context_size(n_ctx: int | None, hp: HParams, allow_extension: bool = False) -> int:
    """Requested context, or min(trained context, DEFAULT_N_CTX); beyond the trained context only when
    allowed (with a warning, as llama.cpp warns)."""
    if n_ctx is None or (isinstance(n_ctx, (int, np.integer)) and not isinstance(n_ctx, bool) and n_ctx == 0):
        return min(hp.n_ctx_train, DEFAULT_N_CTX)
    n = _positive_int(n_ctx, "n_ctx", None)
    if n > hp.n_ctx_train:
        msg = (f"n_ctx = {n} is beyond the model's trained context of {hp.n_ctx_train} "
               f"({hp.arch}.context_length); quality degrades past it")
        if not allow_extension:
            raise ModelError(msg + "; pass allow_context_extension=True (qrun --allow-context-extension) "
                                   "to use it anyway")
        warnings.warn(msg, stacklevel=3)
    return n


def _positive_int(v: Any, name: str, top: int | None) -> int:
    """v as an int in 1..top, or ModelError naming the parameter and the range."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 or (top is not None and v > top):
        rng = f"1..{top}" if top is not None else "a positive integer"
        raise ModelError(f"{name} must be {rng}, got {v!r}")
    return int(v)


def _max_tokens(v: Any) -> int | None:
    """max_tokens as None (no limit) or an int; ModelError for other types (floats, inf, bools)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            return int(v)
        raise ModelError(f"max_tokens must be an integer or None, got {v!r}")
    return int(v)


def _token_ids(tokens: Any) -> list[int]:
    """A token sequence as a list of Python ints; ModelError for anything that is not integers."""
    if isinstance(tokens, (str, bytes)):
        raise ModelError("token ids must be a sequence of integers, got a string")
    try:
        items = list(tokens)
    except TypeError:
        raise ModelError(f"token ids must be a sequence of integers, got {type(tokens).__name__}") from None
    bad = next((t for t in items if isinstance(t, bool) or not isinstance(t, (int, np.integer))), None)
    if bad is not None:
        raise ModelError(f"token ids must be integers, got {bad!r}")
    return [int(t) for t in items]


def _check_host_memory(kv: KVSpec, cpu_layers: int) -> None:
    """The CPU layers' KV cache must fit in the available memory (before anything is allocated)."""
    need = kv.layer_bytes() * cpu_layers
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        return
    if need > RAM_HEADROOM * avail:
        raise ModelError(f"the KV cache needs {need / 2**30:.2f} GiB ({kv.n_slots} slot(s) x n_ctx {kv.n_ctx}, "
                         f"{kv.type_k}/{kv.type_v}) for {cpu_layers} CPU layers but {avail / 2**30:.2f} GiB is "
                         "available; lower n_ctx or n_seq, or use a quantized KV cache (q8_0, q4_0)")


def _bos_eos_text(tok: Tokenizer) -> tuple[str, str]:
    """Texts of the BOS and EOS tokens for templates that print them."""
    text = lambda i: "" if i is None else tok.token_text(i)  # noqa: E731
    return text(tok.bos_id), text(tok.eos_id)
