"""qserve: an OpenAI-compatible HTTP server for one model, llama-server style.

    qserve MODEL --host 127.0.0.1 --port 8080 -np 4 -c 8192
    # then: OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused").chat.completions.create(...)

Needs the server extra: pip install 'qf[server]' (FastAPI, uvicorn, llguidance for structured output).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

import click

from qf.format.errors import QFError
from qf.tools.kv_options import kv_cache_options
from qf.tools.qrun import _gpu_layers, moe_kwargs, moe_options

DEFAULT_PORT = 8080


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 exposes the server to the network: set --api-key then).")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("-np", "--parallel", "n_seq", type=int, default=4, show_default=True,
              help="KV slots: requests decoded together (more wait in the queue).")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=0, show_default=True,
              help="Context per slot (0: the model's, at most 4096).")
@click.option("-t", "--threads", "n_threads", type=int, default=None, help="CPU threads.")
@click.option("-b", "--batch-size", "n_batch", type=int, default=256, show_default=True,
              help="Prompt tokens per forward pass (the chunk interleaved with decode steps).")
@click.option("-ngl", "--gpu-layers", "--n-gpu-layers", "gpu_layers", default=None,
              help="Layers on the GPU: N, 'auto' or 'all' (as qrun).")
@click.option("--vram", default=None, help="Cap the GPU budget, e.g. 6GiB.")
@click.option("-ts", "--tensor-split", default=None, help="Split layers across GPUs by these ratios.")
@kv_cache_options
@moe_options
@click.option("--api-key", default=None, envvar="QF_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health (or $QF_API_KEY).")
@click.option("--alias", default=None, help="Model id the API reports and accepts (default: the file's stem).")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests waiting for a slot before new ones get HTTP 503.")
@click.option("--max-body", type=int, default=8 << 20, show_default=True, help="Largest request body in bytes.")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="Seconds SIGTERM waits for in-flight requests before cancelling them.")
def main(model_path: Path, host: str, port: int, n_seq: int, n_ctx: int, n_threads: int | None, n_batch: int,
         gpu_layers: str | None, vram: str | None, tensor_split: str | None, type_k: str, type_v: str,
         cpu_moe: bool, n_cpu_moe: int, override_tensor: tuple[str, ...], api_key: str | None, alias: str | None, max_queue: int, max_body: int, shutdown_timeout: float) -> None:
    """Serve MODEL_PATH (.qf or .gguf) over the OpenAI API."""
    try:
        import uvicorn

        from qf.serve.app import ServerSettings, create_app
    except ImportError as e:
        click.echo(f"qserve: error: the server extra is not installed ({e}); pip install 'qf[server]'", err=True)
        sys.exit(2)
    from qf.runtime import Model

    api_key = api_key or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"qserve: warning: listening on {host} without --api-key: anyone who can reach it can use it",
                   err=True)
    try:
        model = Model.load(model_path, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch,
                           gpu_layers=_gpu_layers(gpu_layers), vram=vram, tensor_split=tensor_split, n_seq=n_seq,
                           type_k=type_k, type_v=type_v, **moe_kwargs(cpu_moe, n_cpu_moe, override_tensor))
    except (QFError, ValueError) as e:
        click.echo(f"qserve: error: {e}", err=True)
        sys.exit(1)
    settings = ServerSettings(model_id=alias or model_path.stem, api_key=api_key, max_queue=max_queue,
                              max_body=max_body)
    click.echo(f"qserve: {model} with {n_seq} slots, KV {type_k}/{type_v}; listening on http://{host}:{port}/v1",
               err=True)
    with model:
        server = uvicorn.Server(uvicorn.Config(create_app(model, settings), host=host, port=port,
                                               log_level="warning", timeout_graceful_shutdown=shutdown_timeout))
        _serve(server)
    click.echo("qserve: stopped", err=True)


def _serve(server: Any) -> None:
    """Run uvicorn with our own SIGTERM/SIGINT handling: the first signal stops accepting and lets in-flight
    requests finish (up to the graceful timeout, then they are cancelled); a second forces the exit. Then
    the caller closes the model and the process exits 0 (uvicorn would re-raise the signal instead)."""

    def stop(signum: int, _frame: Any) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    server.capture_signals = contextlib.nullcontext  # uvicorn's own handlers re-raise the signal on exit
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
