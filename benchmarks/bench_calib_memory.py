"""Peak RSS of calibrated GPTQ on a synthetic ~2 GB llama checkpoint, against the issue's bound
"one layer in f32 + activations + 1 GiB".

    nice -n 10 python benchmarks/bench_calib_memory.py [--size-gb 2.0] [--type GPTQ-W4G64] [--samples 8] [--seqlen 256]

Builds a random llama checkpoint (transformers' LlamaConfig for config.json, bf16 safetensors written by the
safetensors library, two shards, byte-level tokenizer) in a temporary folder that is deleted afterwards, then runs
`qconvert SRC out.qf --type GPTQ-W4G64 --calib <Jargon File calibration slice>` in a child process. The child's
resident set is sampled from /proc while it runs; its VmRSS is recorded at every per-layer progress line, and its
peak (VmHWM) is printed against the bound next to the RSS of a process that only imports the converter, and
against a strict bound that counts as activations only the layer input [T, hidden] carried between layers. The
child's CPU seconds (getrusage) are printed too: on a shared machine they compare better than its wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20
GIB = 2**30
HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_params() -> dict[str, tuple[int, int]]:
    """HF linear name -> (n_out, n_in) of one decoder layer."""
    kv = HIDDEN // HEADS * KV_HEADS
    return {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (kv, HIDDEN),
            "self_attn.v_proj": (kv, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
            "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def layer_f32_bytes() -> int:
    """One decoder layer's weights (linears and both norms) in f32."""
    return 4 * (sum(o * i for o, i in layer_params().values()) + 2 * HIDDEN)


def activation_bytes(rows: int) -> int:
    """The block's f32 activations for `rows` calibration tokens, all counted as if live at once: four [T, hidden]
    (the layer input, its working copy that becomes the output, q, the attention output), k, v and their f32
    KV cache [T, kv], gate, up and their product [T, inter]."""
    kv = HIDDEN // HEADS * KV_HEADS
    return 4 * rows * (4 * HIDDEN + 4 * kv + 3 * INTER)


def input_bytes(rows: int) -> int:
    """The calibration activations carried from layer to layer: the layer input f32 [T, hidden] (the strict
    reading of "activations")."""
    return 4 * rows * HIDDEN


def n_layers_for(size_gb: float) -> int:
    """Layers so that the bf16 checkpoint (untied head) reaches size_gb."""
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    per = sum(o * i for o, i in layer_params().values()) + 2 * HIDDEN
    return max(1, round((size_gb * GIB / 2 - fixed) / per))


def write_tokenizer(d: Path) -> None:
    """A byte-level BPE tokenizer.json with exactly VOCAB tokens: 256 bytes, the merges of ' t', 'he', ' a', 'in'
    and filler tokens (the runtime's gpt2 tokenizer wants at least one merge)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġ a", "i n"]
    tokens = alphabet + [m.replace(" ", "") for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + [f"tok{i}" for i in range(VOCAB - len(tokens))])}
    tok = {"version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    (d / "tokenizer.json").write_text(json.dumps(tok))


def build_checkpoint(d: Path, layers: int) -> int:
    """config.json (LlamaConfig), bf16 random weights in two safetensors shards + index, tokenizer; -> bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                tie_word_embeddings=False, architectures=["LlamaForCausalLM"]).save_pretrained(d)
    write_tokenizer(d)
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}, {}]
    for b in range(layers):
        sd = shards[0] if b < layers // 2 else shards[1]
        for name, (o, i) in layer_params().items():
            sd[f"model.layers.{b}.{name}.weight"] = rand(o, i)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{b}.{norm}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    shards[1] |= {"model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16), "lm_head.weight": rand(VOCAB, HIDDEN)}
    files = [f"model-0000{k + 1}-of-00002.safetensors" for k in range(2)]
    total = 0
    for f, sd in zip(files, shards):
        save_file(sd, str(d / f), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in sd.values())
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {n: f for f, sd in zip(files, shards) for n in sd}}))
    return total


def status_kib(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


@dataclass
class ChildRun:
    """A child's peak RSS (bytes), seconds, CPU seconds, return code, and (progress line, VmRSS bytes) pairs."""

    peak: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    rc: int = 0
    marks: list[tuple[str, int]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


def run_sampled(cmd: list[str]) -> ChildRun:
    """Run cmd, sampling VmHWM every 20 ms and VmRSS at each stderr line."""
    r = ChildRun()
    t0 = time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def read_err() -> None:
        for line in p.stderr:
            try:
                rss, hwm = (status_kib(p.pid, k) * 1024 for k in ("VmRSS", "VmHWM"))
            except (OSError, RuntimeError):
                rss = hwm = 0
            r.marks.append((line.strip(), rss))
            r.stderr.append(line)
            if "layer" in line:  # live: a long run shows its figures as it goes
                print(f"  VmRSS {rss / MIB:7,.0f} MiB, peak so far {hwm / MIB:7,.0f} MiB  {line.strip()[:100]}",
                      flush=True)

    th = threading.Thread(target=read_err, daemon=True)
    th.start()
    while p.poll() is None:
        try:
            r.peak = max(r.peak, status_kib(p.pid, "VmHWM") * 1024)
        except (OSError, RuntimeError, ValueError):
            pass
        time.sleep(0.02)
    th.join()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child has been waited for: its CPU time is in
    r.cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    r.rc, r.seconds = p.returncode, time.perf_counter() - t0
    return r


def imports_rss() -> int:
    """Peak RSS of a process that imports the converter and the calibration code, and does nothing else."""
    code = ("import qf.tools.qconvert, qf.convert.pipeline, qf.calib.driver, qf.quant.gptq, qf.runtime; "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) * 1024


def table(rows: list[tuple[str, float]]) -> str:
    """A two-column markdown table of MiB figures."""
    lines = ["| quantity | MiB |", "|---|---:|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in rows]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size (bf16) [2.0]")
    ap.add_argument("--type", default="GPTQ-W4G64")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--keep", type=Path, help="build the checkpoint here and keep it (default: a deleted tmp dir)")
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # internal: build the checkpoint in a child
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    return ap.parse_args()


def measure(a: argparse.Namespace, work: Path) -> None:
    """Build, convert, print the table."""
    d = work / "ckpt"
    d.mkdir(parents=True, exist_ok=True)
    layers = n_layers_for(a.size_gb)
    t0 = time.perf_counter()
    built = subprocess.run([sys.executable, __file__, "--build", str(d), "--layers", str(layers)],
                           capture_output=True, text=True, check=True)
    total = int(built.stdout)
    print(f"checkpoint: {total / GIB:.2f} GiB bf16 ({layers} layers, hidden {HIDDEN}, intermediate {INTER}, "
          f"vocab {VOCAB}, untied head), built in {time.perf_counter() - t0:.0f} s", flush=True)
    from qf.eval.text import write_slice

    calib = write_slice("calibration", work / "calib.txt")
    out = work / "out.qf"
    cmd = [sys.executable, "-m", "qf.tools.qconvert", str(d), str(out), "--type", a.type, "--calib", str(calib),
           "--calib-samples", str(a.samples), "--calib-seqlen", str(a.seqlen)]
    r = run_sampled(cmd)
    if r.rc != 0:
        sys.exit(f"qconvert failed (exit {r.rc}):\n{''.join(r.stderr[-20:])}")
    for line, rss in r.marks:
        if "calibration" in line:
            print(f"  VmRSS {rss / MIB:7,.0f} MiB  {line[:110]}")
    base = imports_rss()
    rows = a.samples * a.seqlen
    bound = layer_f32_bytes() + activation_bytes(rows) + GIB
    strict = layer_f32_bytes() + input_bytes(rows) + GIB
    print(f"\nqconvert --type {a.type} --calib-samples {a.samples} --calib-seqlen {a.seqlen}: {r.seconds:.0f} s, "
          f"{r.cpu:.0f} CPU s, output {out.stat().st_size / MIB:,.0f} MiB\n")
    print(table([("checkpoint (bf16 on disk)", total / MIB), ("one layer's weights in f32", layer_f32_bytes() / MIB),
                 (f"activations estimate ({rows} rows)", activation_bytes(rows) / MIB),
                 ("bound = layer f32 + activations + 1 GiB", bound / MIB),
                 (f"strict bound = layer f32 + layer input ({input_bytes(rows) / MIB:.0f}) + 1 GiB", strict / MIB),
                 ("imports alone (peak RSS)", base / MIB),
                 ("**qconvert peak RSS**", r.peak / MIB), ("peak - imports", (r.peak - base) / MIB)]))
    for name, b in (("the bound", bound), ("the strict bound", strict)):
        verdict = "within" if r.peak <= b else "EXCEEDS"
        print(f"peak RSS {r.peak / MIB:,.0f} MiB {verdict} {name} {b / MIB:,.0f} MiB ({100 * r.peak / b:.0f}%)")


def main() -> None:
    a = parse_args()
    if a.build:
        print(build_checkpoint(a.build, a.layers))
        return
    if a.keep:
        measure(a, a.keep)
        return
    with tempfile.TemporaryDirectory(prefix="qf-calibmem-", dir="/tmp") as td:
        measure(a, Path(td))


if __name__ == "__main__":
    main()
