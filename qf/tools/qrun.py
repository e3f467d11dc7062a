"""qrun: run a .qf/.gguf model on the CPU, llama-cli style.

    qrun MODEL -p "Once upon a time" -n 128      # complete a prompt, streaming
    qrun MODEL -p "What is 2+2?" --chat          # one chat turn through the file's template
    qrun MODEL                                   # interactive chat: one line per turn, Ctrl-D ends
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO

import click

from qf.format.errors import QFError
from qf.runtime.generate import Generation, GenerationStats
from qf.tools.kv_options import kv_cache_options

MAX_PROMPT_FILE_BYTES = 64 << 20  # -f reads at most this much (a prompt beyond it cannot fit any context)


def _err(msg: str) -> None:
    click.echo(msg, err=True)


class Totals:
    """Prompt and generation token counts and times summed over turns."""

    def __init__(self) -> None:
        self.total = GenerationStats()

    def add(self, s: GenerationStats) -> None:
        t = self.total
        t.n_prompt += s.n_prompt
        t.t_prompt += s.t_prompt
        t.n_gen += s.n_gen
        t.t_gen += s.t_gen
        t.n_cached += s.n_cached

    def report(self, load_seconds: float) -> str:
        t = self.total
        return (f"qrun: load time = {load_seconds * 1000:10.2f} ms\n"
                f"qrun: prompt eval = {t.t_prompt * 1000:10.2f} ms / {t.n_prompt:5d} tokens "
                f"({t.prompt_tps:8.2f} tokens per second)"
                + (f", {t.n_cached} reused from the cache" if t.n_cached else "") + "\n"
                f"qrun: generation  = {t.t_gen * 1000:10.2f} ms / {t.n_gen:5d} tokens "
                f"({t.gen_tps:8.2f} tokens per second)")


@contextmanager
def _ctrl_c_cancels(model: Any) -> Iterator[None]:
    """While generating, Ctrl-C stops the generation instead of the program."""
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: model.cancel())
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stream(model: Any, gen: Generation, out: TextIO, totals: Totals) -> str:
    """Print a generation as it arrives; returns its text."""
    parts = []
    with _ctrl_c_cancels(model):
        for piece in gen:
            out.write(piece)
            out.flush()
            parts.append(piece)
    totals.add(gen.stats)
    if gen.finish_reason != "stop":
        _err(f"\n[generation ended: {gen.finish_reason}"
             + (f" - the context of {model.n_ctx} tokens is full]" if model.n_past >= model.n_ctx
                else "]"))
    return "".join(parts)


def _interactive(model: Any, system: str | None, sampling: dict, n_predict: int, stop: tuple[str, ...],
                 inp: TextIO, out: TextIO, totals: Totals) -> None:
    """Chat turns from input lines until EOF (Ctrl-D); history is kept and its cached prefix reused."""
    history = [{"role": "system", "content": system}] if system else []
    tty = inp.isatty()
    if tty:
        _err("qrun: interactive chat - type a message and press Enter; Ctrl-D ends, Ctrl-C stops a reply")
    while True:
        if tty:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            gen = model.chat(history, max_tokens=n_predict, stop=stop, **sampling)
            reply = _stream(model, gen, out, totals)
        except QFError as e:  # e.g. the conversation outgrew the context: start over
            _err(f"qrun: {e}; the conversation is cleared")
            history = history[:1] if system else []
            continue
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": reply})


def read_prompt_file(path: Path, limit: int = MAX_PROMPT_FILE_BYTES) -> str:
    """A prompt file's text: a regular file of at most `limit` bytes, UTF-8 (QFError otherwise)."""
    import os
    import stat

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise QFError(f"{path}: not a regular file (a FIFO, device or directory cannot be a prompt file)")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise QFError(f"{path}: cannot read the prompt file: {e.strerror or e}") from None
    if len(data) > limit:
        raise QFError(f"{path}: the prompt file is larger than {limit >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QFError(f"{path}: the prompt file is not UTF-8 (byte {e.start})") from None


def _gpu_layers(value: str | None) -> int | str | None:
    """-ngl's value: None (default), 'auto', 'all' or a non-negative layer count."""
    if value is None or value in ("auto", "all"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a layer count, 'auto' or 'all'", param_hint="--gpu-layers")
    if n < 0:
        raise click.BadParameter("must be >= 0", param_hint="--gpu-layers")
    return n


def moe_options(f: Any) -> Any:
    """--cpu-moe, --n-cpu-moe N, -ot/--override-tensor REGEX=DEVICE (llama.cpp's expert placement flags)."""
    f = click.option("-ot", "--override-tensor", "override_tensor", multiple=True,
                     help="Put tensors matching REGEX on DEVICE (CPU, CUDA0), e.g. exps=CPU; repeatable or "
                          "comma-separated. Expert tensors (ffn_*_exps) only.")(f)
    f = click.option("--n-cpu-moe", type=int, default=0, show_default=True,
                     help="Keep the expert tensors of the first N layers on the CPU.")(f)
    return click.option("--cpu-moe", is_flag=True, help="Keep every layer's expert tensors on the CPU.")(f)


def moe_kwargs(cpu_moe: bool, n_cpu_moe: int, override_tensor: tuple[str, ...]) -> dict[str, Any]:
    """The expert placement flags as Model.load keyword arguments."""
    return dict(cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, override_tensor=list(override_tensor) or None)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-p", "--prompt", default=None, help="Prompt to complete (no prompt: interactive chat).")
@click.option("-f", "--file", "prompt_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the prompt from a file (a regular file of at most 64 MiB).")
@click.option("-n", "--n-predict", type=int, default=-1, show_default=True,
              help="Tokens to generate (-1: until end of generation or a full context).")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=0, show_default=True,
              help="Context size (0: the model's, at most 4096).")
@click.option("-t", "--threads", "n_threads", type=int, default=None,
              help="CPU threads (default: physical cores; decode drops to half while that measures faster).")
@click.option("-b", "--batch-size", "n_batch", type=int, default=256, show_default=True, help="Prompt batch size.")
@click.option("--temp", "temperature", type=float, default=0.8, show_default=True, help="Temperature (0: greedy).")
@click.option("--top-k", type=int, default=40, show_default=True, help="Top-k (0: off).")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Top-p (1.0: off).")
@click.option("--min-p", type=float, default=0.05, show_default=True, help="Min-p (0.0: off).")
@click.option("--repeat-penalty", type=float, default=1.0, show_default=True, help="Repetition penalty (1.0: off).")
@click.option("--repeat-last-n", type=int, default=64, show_default=True, help="Tokens the penalty looks back.")
@click.option("-s", "--seed", type=int, default=-1, show_default=True, help="RNG seed (-1: random).")
@click.option("-sys", "--system-prompt", default=None, help="System message for chat.")
@click.option("--chat", "force_chat", is_flag=True, help="Apply the chat template to -p.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--no-display-prompt", is_flag=True, help="Do not echo a completion prompt.")
@click.option("-ngl", "--gpu-layers", "--n-gpu-layers", "gpu_layers", default=None,
              help="Layers on the GPU: N (the last N, as llama.cpp), 'auto' (as many as fit) or 'all'. "
                   "Default: auto when a GPU exists, else 0.")
@click.option("--vram", default=None, help="Cap the GPU budget, e.g. 6GiB (per GPU, or '8GiB,4GiB').")
@click.option("-ts", "--tensor-split", default=None, help="Split layers across GPUs by these ratios, e.g. 3,1.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the device placement and memory breakdown without loading weights, then exit.")
@click.option("--repack", is_flag=True,
              help="Keep quantized weights as integer panels in RAM (faster decode; the RAM it takes is printed).")
@kv_cache_options
@moe_options
@click.option("--allow-context-extension", is_flag=True,
              help="Allow -c beyond the model's trained context (quality degrades there).")
def main(model_path: Path, prompt: str | None, prompt_file: Path | None, n_predict: int, n_ctx: int,
         n_threads: int | None, n_batch: int, temperature: float, top_k: int, top_p: float, min_p: float,
         repeat_penalty: float, repeat_last_n: int, seed: int, system_prompt: str | None, force_chat: bool,
         stop: tuple[str, ...], no_display_prompt: bool, gpu_layers: str | None, vram: str | None,
         tensor_split: str | None, plan_only: bool, type_k: str, type_v: str, cpu_moe: bool, n_cpu_moe: int,
         override_tensor: tuple[str, ...], allow_context_extension: bool, repack: bool) -> None:
    """Run MODEL_PATH (.qf or .gguf): complete -p, or chat interactively when no prompt is given."""
    from qf.runtime import Model

    if prompt_file is not None:
        try:
            prompt = read_prompt_file(prompt_file)
        except QFError as e:
            _err(f"qrun: error: {e}")
            sys.exit(1)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                    repeat_last_n=repeat_last_n, seed=None if seed < 0 else seed)
    out = sys.stdout
    ngl = _gpu_layers(gpu_layers)
    try:
        if plan_only:
            from qf.runtime.planner import format_plan, moe_overrides, parse_overrides, plan_from_file

            overrides = moe_overrides(cpu_moe, n_cpu_moe) + parse_overrides(list(override_tensor))
            click.echo(format_plan(plan_from_file(model_path, n_ctx or None, "auto" if ngl is None else ngl,
                                                  vram=vram, n_batch=n_batch, tensor_split=tensor_split,
                                                  type_k=type_k, type_v=type_v, overrides=overrides)))
            if repack:
                from qf.runtime.planner import format_repack

                click.echo(format_repack(model_path))
            return
        model = Model.load(model_path, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, gpu_layers=ngl,
                           vram=vram, tensor_split=tensor_split, type_k=type_k, type_v=type_v,
                           allow_context_extension=allow_context_extension, repack=repack,
                           **moe_kwargs(cpu_moe, n_cpu_moe, override_tensor))
        if model.plan is not None:
            _err(f"qrun: {model.plan.summary()}")
        _err(f"qrun: loaded {model} in {model.load_seconds:.2f} s")
        if repack:
            from qf.runtime.planner import fmt_bytes

            _err(f"qrun: repacked weights: {fmt_bytes(model.repacked_bytes)} of RAM beyond the mmap'd file")
        totals = Totals()
        with model:
            if prompt is None:
                _interactive(model, system_prompt, sampling, n_predict, stop, sys.stdin, out,
                             totals)
            elif force_chat or system_prompt:
                msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
                _stream(model, model.chat(msgs + [{"role": "user", "content": prompt}], max_tokens=n_predict,
                                          stop=stop, **sampling), out, totals)
                out.write("\n")
            else:
                if not no_display_prompt:
                    out.write(prompt)
                _stream(model, model.generate(prompt, max_tokens=n_predict, stop=stop, **sampling), out, totals)
                out.write("\n")
            out.flush()
            _err(totals.report(model.load_seconds))
    except (QFError, ValueError) as e:
        _err(f"qrun: error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C while waiting for input
        _err("")
        sys.exit(130)


if __name__ == "__main__":
    main()
