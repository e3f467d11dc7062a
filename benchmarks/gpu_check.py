"""The GPU visit in one command: CUDA tests, placements against the CPU, kernel figures, 8B-shaped decode and
the planner's prediction against real allocations, written to one markdown report (partial on failure).

    python benchmarks/gpu_check.py --out gpu-report.md            # on a CUDA machine (~5-8 minutes)
    python benchmarks/gpu_check.py --dry-run --out /tmp/r.md      # anywhere: tiny shapes, the torch CPU
                                                                  # stand-in, Triton's interpreter
Steps (each timed; a failing step is reported and the next one runs):
1. environment (torch, Triton, device, commit);
2. the CUDA tests (pytest: test_backend_torch -k cuda, test_triton_kernels on the device);
3. logits of a synthetic Q4_K model with 0, half and all layers on the GPU against the CPU path;
4. y = x @ W.T at 4096x4096 and 14336x4096, M = 1 and 16, Q4_0 and Q4_K: the fused Triton kernel and the
   dequantized-tile path against torch's bf16 F.linear on the same weight, in the same run;
5. decode tokens/s of a Llama-3-8B-shaped model (random valid blocks, written straight to a GGUF file: no
   quantization search) at Q4_0 and Q4_K_M, all and half of the layers on the GPU, with the planner's
   predicted GPU bytes against torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EIGHT_B = dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
SMALL = dict(n_layer=8, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816, n_vocab=32000)
DRY = dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_vocab=400)
SHAPES = ((4096, 4096), (14336, 4096))
DRY_SHAPES = ((64, 256),)


class Report:
    """Markdown sections, flushed to disk after each step so a timeout still leaves the partial report."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines = path, ["# GPU check", ""]

    def add(self, *lines: str) -> None:
        self.lines += list(lines)
        self.path.write_text("\n".join(self.lines) + "\n")

    def step(self, title: str, fn: Callable[[], list[str]]) -> None:
        """Run one step; its lines, or the error, under a heading with its duration."""
        t0 = time.perf_counter()
        try:
            body = fn()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - a failed step is reported, the next one runs
            body = ["```", *traceback.format_exception(e)[-12:], "```"]
            status = f"FAILED: {type(e).__name__}: {str(e)[:200]}"
        self.add(f"## {title} ({time.perf_counter() - t0:.1f} s, {status})", "", *body, "")
        print(f"[gpu_check] {title}: {status}", flush=True)


def environment(dry: bool) -> list[str]:
    """Versions and the device."""
    import torch

    lines = [f"- python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}"]
    try:
        import triton

        lines.append(f"- triton {triton.__version__}" + (" (interpreter)" if os.environ.get("TRITON_INTERPRET") else ""))
    except ImportError:
        lines.append("- triton: not importable")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
    else:
        lines.append("- device: none (dry run on the torch CPU stand-in)" if dry else "- device: NO CUDA DEVICE")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines.append(f"- qf commit {rev.strip() or '?'}")
    return lines


def cuda_tests(dry: bool) -> list[str]:
    """The CUDA tests (skipped without CUDA) and the Triton kernel tests on the device."""
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_backend_torch.py",
            "-k", "cuda"] if not dry else [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                           "tests/test_triton_kernels.py", "-k", "bad_shapes"]
    if not dry:
        args += ["tests/test_triton_kernels.py", "-m", "not slow"]
        args[args.index("-k") + 1] = "cuda or qmm or kernel or fused"
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = (r.stdout + r.stderr).strip().splitlines()[-6:]
    return [f"`{' '.join(args[2:])}` -> exit {r.returncode}", "", "```", *tail, "```"]


# ------------------------------------------------------------------------------------------ synthetic models

def _vocab(n: int) -> tuple[list[str], list[int]]:
    """n unique token strings (3 specials, the 256 byte characters, fillers) and their types."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + chars + ["ab"]
    tokens += [f"tok{i}" for i in range(n - len(tokens))]
    return tokens, [3, 3, 3] + [1] * (n - 3)


def sane_blocks(qtype: Any, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks u8 [n_out, row_bytes] whose weights have a standard deviation of about 1/sqrt(n_in)
    (random codes; the fp16 block scales rescaled after measuring a few dequantized rows)."""
    from qf.quant.codecs import get_codec
    from qf.runtime.kernels.torch_dequant import FIELDS, random_packed

    data = random_packed(qtype, n_out, n_in, rng)
    sample = get_codec(qtype).dequantize(data[:8]).astype(np.float64)
    factor = (1.0 / np.sqrt(n_in)) / max(float(sample.std()), 1e-12)
    bs, ts = __import__("qf.format.ggml_types", fromlist=["BLOCK"]).BLOCK[qtype]
    blocks = data.reshape(n_out, n_in // bs, ts)
    for f in FIELDS[qtype]:
        if f.np_dtype == np.float16:  # d / dmin / m: scale every block's fp16 factors alike
            v = blocks[:, :, f.start:f.start + f.size].copy().view(np.float16)
            blocks[:, :, f.start:f.start + f.size] = (v.astype(np.float32) * factor).astype(np.float16).view(np.uint8)
    return data


def write_model(path: Path, shape: dict[str, int], layer_type: str, head_type: str, seed: int = 0) -> Path:
    """A llama GGUF of random valid blocks (no quantization search): layer matrices in layer_type (Q4_K_M:
    Q4_K with Q6_K attn_v and ffn_down, as llama.cpp's mix), the tied embedding/head in head_type."""
    from qf.format.ggml_types import GGMLType
    from qf.format.writer import QFWriter

    rng = np.random.default_rng(seed)
    s = shape
    hd = s["n_embd"] // s["n_head"]
    e, q, kv, ff = s["n_embd"], s["n_head"] * hd, s["n_head_kv"] * hd, s["n_ff"]
    mix = {"attn_v": "Q6_K", "ffn_down": "Q6_K"} if layer_type == "Q4_K_M" else {}
    base = "Q4_K" if layer_type == "Q4_K_M" else layer_type
    tensors: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (e, s["n_vocab"]), head_type),
                                                       ("output_norm.weight", (e,), "F32")]
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (e,), "F32"), (p + "ffn_norm.weight", (e,), "F32")]
        for role, ne in (("attn_q", (e, q)), ("attn_k", (e, kv)), ("attn_v", (e, kv)), ("attn_output", (q, e)),
                         ("ffn_gate", (e, ff)), ("ffn_up", (e, ff)), ("ffn_down", (ff, e))):
            tensors.append((p + role + ".weight", ne, mix.get(role, base)))
    tokens, types = _vocab(s["n_vocab"])
    kvs = {"general.architecture": "llama", "llama.block_count": s["n_layer"], "llama.context_length": 8192,
           "llama.embedding_length": e, "llama.feed_forward_length": ff, "llama.attention.head_count": s["n_head"],
           "llama.attention.head_count_kv": s["n_head_kv"], "llama.attention.layer_norm_rms_epsilon": 1e-5,
           "llama.rope.freq_base": 500000.0, "llama.rope.dimension_count": hd, "llama.vocab_size": s["n_vocab"],
           "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
           "tokenizer.ggml.token_type": np.asarray(types, dtype=np.int32), "tokenizer.ggml.merges": ["a b"],
           "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0}
    with QFWriter(path) as w:
        for k, v in kvs.items():
            w.add_kv(k, v)
        for name, ne, t in tensors:
            w.add_tensor_info(name, ne, GGMLType[t])
        w.write_header()
        for name, ne, t in tensors:
            if t == "F32":
                data = (1.0 + 0.1 * rng.standard_normal(ne[0])).astype(np.float32)
            else:
                data = sane_blocks(GGMLType[t], ne[1], ne[0], rng)
            w.write_tensor(name, data)
        w.finish()
    return path


def _load(path: Path, gpu_layers: int, dry: bool, n_ctx: int = 256, threads: int | None = None) -> Any:
    """The model with gpu_layers on the GPU (on the dry run: the torch CPU stand-in, Triton interpreted)."""
    from qf.runtime import Model

    opts: dict[str, Any] = {"kernels": "triton"}
    if dry:  # the stand-in: torch's CPU device, dequantized tiles (Triton's interpreter is far too slow here)
        opts = {"device_map": {"cuda:0": "cpu"}, "kernels": "torch"}
    return Model.load(path, n_ctx=n_ctx, n_threads=threads, gpu_layers=gpu_layers, warmup=False,
                      vram=None if not dry else "4GiB", torch_options=opts if gpu_layers else None)


def placements(work: Path, dry: bool) -> list[str]:
    """Logits of 0, half and all layers on the GPU against the CPU path (a synthetic Q4_K model)."""
    shape = DRY if dry else SMALL
    path = write_model(work / "small.gguf", shape, "Q4_K", "Q6_K", seed=1)
    ids = list(np.random.default_rng(2).integers(0, shape["n_vocab"], 24))
    with _load(path, 0, dry) as m:
        ref = m.logits(ids)
    rows = ["| layers on GPU | max abs diff | relative to max logit | same argmax |", "|---|---|---|---|"]
    n = shape["n_layer"]
    for ngl in (0, n // 2, n + 1):
        with _load(path, ngl, dry) as m:
            got = m.logits(ids)
        d = float(np.abs(got - ref).max())
        rows.append(f"| {ngl} | {d:.3g} | {d / float(np.abs(ref).max()):.2e} | "
                    f"{float((got.argmax(-1) == ref.argmax(-1)).mean()) * 100:.0f}% |")
    return [f"synthetic llama {shape}, 24 tokens, all logits; the output head is on the GPU when layers > {n}", "",
            *rows]


def _time(fn: Callable[[], Any], iters: int, cuda: bool) -> float:
    """Median seconds per call (bench_gpu's timer: CUDA events on a GPU)."""
    from bench_gpu import time_call

    return time_call(fn, iters, "cuda" if cuda else "cpu")


def kernels(dry: bool) -> list[str]:
    """Fused Triton kernel and dequantized tiles against bf16 F.linear, M = 1 and 16."""
    import torch
    import torch.nn.functional as F

    from qf.format.ggml_types import GGMLType
    from qf.runtime.kernels import torch_dequant as tq
    from qf.runtime.kernels import triton_qmm

    cuda = torch.cuda.is_available() and not dry
    dev = "cuda" if cuda else "cpu"
    iters = 1 if dry else 100
    rng = np.random.default_rng(0)
    rows = ["| type | n_out x n_in | M | bf16 F.linear us | fused us | fused vs bf16 | tiles us | fused GB/s |",
            "|---|---|---|---|---|---|---|---|"]
    for n_out, n_in in DRY_SHAPES if dry else SHAPES:
        for name in ("Q4_0", "Q4_K"):
            qt = GGMLType[name]
            w = tq.pack(qt, sane_blocks(qt, n_out, n_in, rng), n_in, dev)
            wb = tq.dequantize(w, None, torch.float32).to(torch.bfloat16).contiguous()
            for m in (1, 16):
                x = torch.randn(m, n_in, device=dev)
                xb = x.to(torch.bfloat16)
                t_ref = _time(lambda: F.linear(xb, wb), iters, cuda)
                t_fused = _time(lambda: triton_qmm.qmm(w, x), iters, cuda)
                t_tiles = _time(lambda: tq.matmul(w, x, torch.float16 if cuda else torch.float32), iters, cuda)
                rows.append(f"| {name} | {n_out}x{n_in} | {m} | {t_ref * 1e6:.1f} | {t_fused * 1e6:.1f} | "
                            f"{t_ref / t_fused:.2f}x | {t_tiles * 1e6:.1f} | {w.nbytes / t_fused / 1e9:.0f} |")
            del w, wb
    note = "(dry run: CPU interpreter timings, meaningless)" if dry else "(CUDA events, median of batches of 10)"
    return [note, "", *rows]


def decode(work: Path, dry: bool) -> list[str]:
    """8B-shaped decode tok/s at Q4_0 and Q4_K_M, all and half of the layers on the GPU; planner vs allocations."""
    import torch

    shape = DRY if dry else EIGHT_B
    cuda = torch.cuda.is_available() and not dry
    rows = ["| weights | layers on GPU | decode tok/s | planned GPU bytes (weights + KV + compute) | torch max allocated | planned / real |",
            "|---|---|---|---|---|---|"]
    n = shape["n_layer"]
    for layer_type in ("Q4_0", "Q4_K_M"):
        t0 = time.perf_counter()
        path = write_model(work / f"8b-{layer_type}.gguf", shape, layer_type, "Q6_K", seed=3)
        written = time.perf_counter() - t0
        for ngl in (n + 1, n // 2):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with _load(path, ngl, dry, n_ctx=512) as m:
                eng = m.engine
                eng.prefill(list(range(10, 26)))
                steps = []
                for i in range(2 if dry else 48):
                    t1 = time.perf_counter()
                    eng.step(100 + i)
                    steps.append(time.perf_counter() - t1)
                tps = 1 / statistics.median(steps[2:] if len(steps) > 4 else steps)
                planned = sum(u.weights + u.kv + u.compute for u in m.plan.usage if u.device != "cpu") if m.plan else 0
                real = torch.cuda.max_memory_allocated() if cuda else 0
            ratio = f"{planned / real:.2f}" if real else "n/a"
            rows.append(f"| {layer_type} | {min(ngl, n)}/{n}{' + head' if ngl > n else ''} | {tps:.1f} | "
                        f"{planned / 2**30:.2f} GiB | {real / 2**30:.2f} GiB | {ratio} |")
        path.unlink()
        rows.append(f"| ({layer_type} file written in {written:.0f} s) | | | | | |")
    return [f"model {shape}, n_ctx 512, f16 KV, 16-token prompt then single steps", "", *rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-report.md"))
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU stand-in (a check of the script)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the synthetic model files")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    report = Report(args.out)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        report.step("Environment", lambda: environment(dry))
        report.step("CUDA tests", lambda: cuda_tests(dry))
        report.step("Placements against the CPU path", lambda: placements(work, dry))
        report.step("Kernels: fused 4-bit matmul against bf16", lambda: kernels(dry))
        report.step("Decode and the planner, 8B-shaped model", lambda: decode(work, dry))
    print(f"[gpu_check] report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
