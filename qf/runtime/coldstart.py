"""Cold start: a fresh install's first prompt runs on numpy while a background process compiles the kernels.

A model's compiled kernels (numba, cached on disk) cost ~20 CPU s to compile, once per install. When
numba's cache lacks those of a model (`ColdGate.for_model`: marker files next to the cache, named by the
kernel sources' stamp and what the model needs), `Model.load` skips its warm-up, its CPU backend runs each op
on the numpy path of kernels/cold.py (backend.ColdStartBackend), and one background process
(`spawn_compile`, running `main`) loads the same model and runs it, to compile in turn (SETS):

1. "matvec": a one-row product with a weight of each type (most of a decode step's time);
2. "decode": a one-token prefill and a step (row gathers, norms, RoPE, activations, KV stores, row attention);
3. "prefill": the tiled attention of a prompt chunk and a PREFILL_TOKENS-token prompt (the integer products,
   which its own background processes, started after the "matvec" set, compile meanwhile,
   kernels.cpu.precompile_background; a repacked decode step waits for them too);

touching each set's marker when done. The model's gate reads the markers once per forward pass (at its
embedding lookup); from the pass after a marker appears, that set's ops run compiled, loaded from the disk
cache. The KV cache is the same arrays in the same layout either way, so a sequence continues across the
switch. Decode steps of a model past COLD_STEP_MAX_VALUES wait for the "matvec" set rather than decode every
weight per token on numpy; models past COLD_MAX_VALUES take no cold path. While the compile process runs, the
cold backend uses one kernel thread fewer (it holds a core). A compile process that fails leaves no marker;
its gate then lets the kernels compile in-process on first use, as without a cold path.
`QF_COLD_START=0` (or Model.load(cold_start=False)) turns the cold path off.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from qf.format.tensor_roles import LAYER_ROLES
from qf.runtime.backend import linears

ENV = "QF_COLD_START"  # "0": no cold path (every kernel compiles in-process on first use)
NICE_PREFILL = 5  # niceness of the integer-kernel compile processes: the decode kernels come first
# numpy decodes ~300 M weight values/s on one core and multiplies at ~50 GFLOP/s: a 165-token prompt of a
# 1 B model then costs ~10 s, about what compiling (~20 CPU s) and the compiled prompt cost; beyond, no cold path.
COLD_MAX_VALUES = 1_000_000_000
# A cold decode step decodes every weight (~0.5 s for SmolLM2-135M): past ~0.1 s of that, a decode step
# waits for the compiled one-row products instead (~3 CPU s of compiling for four weight types, on a core of
# its own): as soon at the 16th token on 2 idle cores, half the CPU, and much sooner on a loaded machine.
# Not with repacked weights: their one-row products are integer kernels per type (~3x the compile work).
COLD_STEP_MAX_VALUES = 30_000_000
POLL_S = 0.02  # marker polling period of a waiting decode step
PREFILL_TOKENS = 48  # the compile process's prompt: the integer products (>= 16 rows) and BLAS tiles (>= 48)

_PROCS: dict[str, subprocess.Popen] = {}  # decode marker -> the compile process this process started
_LOCK = threading.Lock()


def enabled(requested: bool | None) -> bool:
    """Whether a load may take the cold path: requested, else unless QF_COLD_START=0; never without the JIT."""
    import numba

    if numba.config.DISABLE_JIT:
        return False
    if requested is not None:
        return bool(requested)
    return os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off")


def kernel_stamp() -> str:
    """Hash of every file whose numba kernels the runtime caches (numba re-compiles when one changes)."""
    here = Path(__file__).parent
    files = sorted((here / "kernels").glob("*.py")) + [here / "backend.py"]
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_mtime_ns}:{st.st_size};".encode())
    return h.hexdigest()[:12]


def _cache_folder() -> Path | None:
    """numba's cache folder of the CPU drivers (where the markers live; cleared with the cache), or None."""
    from qf.runtime.kernels import cpu_drivers

    try:
        return Path(cpu_drivers.matvec_kernel._cache._cache_path)
    except AttributeError:
        return None


def model_key(types: Iterable[Any], type_k: str, type_v: str, activation: str, repack: bool) -> str:
    """What selects a model's compiled kernels: its weight types, KV types, activation and repacking."""
    from qf.runtime.kernels import cpu

    names = sorted({getattr(t, "name", str(t)) for t in types})
    text = f"{kernel_stamp()}|{cpu.ISA.name}|{cpu.INT8_PARTS}|{','.join(names)}|{type_k}|{type_v}|{activation}|{repack}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


SETS = ("matvec", "decode", "prefill")  # the kernel sets, in the order the compile process delivers them


class ColdGate:
    """Which of a model's kernel sets (SETS) numba's disk cache holds; `refresh` reads the markers (once per
    forward pass), the attributes `matvec` / `decode` / `prefill` say what the current pass may run compiled."""

    def __init__(self, matvec_marker: Path, decode_marker: Path, prefill_marker: Path) -> None:
        self.markers = {"matvec": matvec_marker, "decode": decode_marker, "prefill": prefill_marker}
        self.matvec = self.decode = self.prefill = False
        for name in SETS:  # each set implies the ones before it
            if not self.markers[name].exists():
                break
            setattr(self, name, True)
        self.on_switch: list[Callable[[], None]] = []  # called when a set becomes compiled (e.g. thread timings reset)
        self.switched_at: dict[str, float] = {}  # set -> time.time() of the first pass that ran it compiled

    @classmethod
    def for_model(cls, key: str) -> "ColdGate | None":
        """The gate of a model key, or None when numba cannot cache (the cold path would never end)."""
        folder = _cache_folder()
        if folder is None:
            return None
        return cls(*(folder / f"qf-cold-{key}-{name}.done" for name in SETS))

    @property
    def warm(self) -> bool:
        """Both sets compiled: the backend is the plain CPU backend from here on."""
        return self.prefill

    @property
    def process(self) -> subprocess.Popen | None:
        """The compile process of this model's kernels started by this process, if any."""
        return _PROCS.get(str(self.markers["decode"]))

    def _ready(self, which: str) -> bool:
        """The set's marker exists, or its compile process is gone without it (then compile in-process)."""
        if self.markers[which].exists():
            return True
        p = self.process
        return p is None or p.poll() is not None

    def refresh(self) -> None:
        """Re-read the markers (switches a set to the compiled kernels once its marker is there)."""
        if self.warm:
            return
        switched = False
        for name in SETS:
            if not getattr(self, name):
                if not self._ready(name):
                    break
                setattr(self, name, True)
                self.switched_at[name] = time.time()
                switched = True
        if switched:
            for f in self.on_switch:
                f()

    def wait_decode(self) -> None:
        """Wait until the one-row products are compiled (or the compile process is gone), then refresh."""
        while not self._ready("matvec"):
            time.sleep(POLL_S)
        self.refresh()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for this process's compile process (the disk cache then holds every kernel); True when done."""
        p = self.process
        if p is not None:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
        self.refresh()
        return self.warm


def spawn_compile(gate: ColdGate, path: str, n_ctx: int, n_threads: int | None, type_k: str, type_v: str,
                  repack: bool) -> subprocess.Popen | None:
    """Start the background process that compiles a model's kernels into the disk cache (once per model key
    and process); None when one is running already or the cache is warm."""
    if gate.warm:
        return None
    key = str(gate.markers["decode"])
    with _LOCK:
        p = _PROCS.get(key)
        if p is not None and p.poll() is None:
            return None
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]),
                                                           *filter(None, [os.environ.get("PYTHONPATH")])]))
        code = "import sys; from qf.runtime.coldstart import main; main(sys.argv[1:])"
        args = [sys.executable, "-c", code, path, str(n_ctx), str(n_threads or 0), type_k, type_v,
                str(int(repack)), *(str(gate.markers[name]) for name in SETS)]
        p = _PROCS[key] = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p


# ---------------------------------------------------------------------------------------- the compile process

def compile_matvec(model: Any) -> None:
    """One-row products with one weight of each type and kind (the CPU backend's matrix-vector kernels), and
    the merged calls of Q/K/V and gate/up (repacked weights): the bulk of a decode step's work, so the cold
    path's steps switch to them first."""
    f = model._forward
    seen: set[tuple[type, Any]] = set()
    calls = [(f.head_be, f.output)]
    for L in f.layers:
        calls += [(L.be, getattr(L, r)) for r in LAYER_ROLES]
        if L.experts is not None:  # one expert's matrices stand for all (same types)
            ex = L.experts
            calls += [(ex.be, m[0]) for m in (ex.gate, ex.up, ex.down) if m]
    for be, w in calls:
        key = (type(w), getattr(w, "type", None), id(be))
        if getattr(w, "n_in", None) is None or key in seen:
            continue
        seen.add(key)
        be.set_threads()
        be.linear(w, np.zeros((1, w.n_in), np.float32))
    groups: set[tuple[Any, ...]] = set()  # the merged calls of weights that read the same rows (repacked)
    for L in f.layers:
        for ws in ((L.wq, L.wk, L.wv), (L.w_gate, L.w_up)):
            key = (id(L.be), *((type(w), getattr(w, "type", None)) for w in ws))
            if all(getattr(w, "n_in", None) is not None for w in ws) and key not in groups:
                groups.add(key)
                L.be.set_threads()
                linears(L.be, ws, np.zeros((1, ws[0].n_in), np.float32), (None,) * len(ws))


def compile_decode(model: Any) -> None:
    """Run what a decode step runs (a one-token prefill and a step), so its kernels compile, with the
    argument types real calls use, into the disk cache."""
    eng = model.engine
    tok = model.tokenizer.bos_id or 0
    with eng.lock:
        eng.prefill([tok])
        if eng.n_ctx >= 2:
            eng.step(tok)
        eng.cache.clear()


def compile_prefill(model: Any) -> None:
    """Run the tiled attention of a prompt chunk, then the prompts of prefill_lengths() (the integer products,
    whose kernels the integer compile processes deliver meanwhile, and the tiled ones of types without
    integer kernels), so they compile into the disk cache. Rarer kernels (the fused products of 2-15-token
    batches, the parallel row attention past ~4096 / n_head_kv keys) still compile in-process on first use."""
    eng = model.engine
    tok = model.tokenizer.bos_id or 0
    with eng.lock:
        model._warmup_prefill_attention()
        for n in prefill_lengths():
            if n <= eng.n_ctx:
                eng.prefill([tok] * n)
                eng.cache.clear()


def prefill_lengths() -> tuple[int, ...]:
    """The prompts the compile process runs: PREFILL_TOKENS, and where AMX-BF16 tiles take long batches
    (kernels.cpu_amx_bf16) one long enough for them, repacked weights included."""
    from qf.runtime.kernels import cpu_amx_bf16

    return (PREFILL_TOKENS,) + ((cpu_amx_bf16.MIN_TOKENS_REPACKED,) if cpu_amx_bf16.ENABLED else ())


def main(argv: list[str]) -> None:
    """The compile process: path n_ctx n_threads type_k type_v repack, then the markers of SETS."""
    path, n_ctx, n_threads, type_k, type_v, repack, matvec_marker, decode_marker, prefill_marker = argv
    from qf.runtime.api import Model
    from qf.runtime.kernels import cpu

    cpu.BACKGROUND_NICE = NICE_PREFILL  # the integer kernels' processes yield to this one and to the caller
    with Model.load(path, n_ctx=int(n_ctx), n_threads=int(n_threads) or None, type_k=type_k,
                    type_v=type_v, repack=bool(int(repack)), warmup=False, cold_start=False,
                    precompile=False) as model:
        compile_matvec(model)  # before the integer compile processes start: nothing here waits for them
        Path(matvec_marker).touch()
        if cpu.INT8_MIN_TOKENS is not None:
            cpu.precompile_background({ti.type for ti in model._file.tensors.values()})
        compile_decode(model)
        Path(decode_marker).touch()
        compile_prefill(model)
        cpu.wait_precompiled()
        Path(prefill_marker).touch()

