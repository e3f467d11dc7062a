"""qserve under load, measured with the `openai` client on loopback: aggregate tokens/s at -np 4 against
-np 1 under the same load, time to first token, and the per-token cost of JSON-schema output.

    python benchmarks/bench_serve.py [--type Q4_0] [--threads 2] [--clients 16] [--requests 2] [-n 32] [-r 2]

Each round runs the same load against a server with 1 slot and one with 4 (alternating, so drifting machine
load hits both): `--clients` threads each stream `--requests` completions of `-n` tokens at temperature 0.
"aggregate" = completion tokens / wall time of the whole load; TTFT = request start to first streamed text.
The structured-output line times llguidance's mask + advance per token inside the scheduler (a JSON-schema
chat reply), against that reply's decode time per token.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench_runtime import model_file

PROMPTS = ["The capital of France is", "List three colours:", "def fibonacci(n):", "Water boils at",
           "Once upon a time, in a small village,", "The best way to learn a language is", "My favourite book is",
           "In 1969, the first"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "cities": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "cities"], "additionalProperties": False}


def run_load(base: str, clients: int, requests: int, n_gen: int) -> tuple[float, list[float]]:
    """(aggregate completion tokens/s, TTFTs in seconds) of the load."""
    import openai

    ttfts: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=600)
        for j in range(requests):
            t0 = time.perf_counter()
            first = None
            stream = c.completions.create(model="m", prompt=PROMPTS[(i + j) % len(PROMPTS)], max_tokens=n_gen,
                                          temperature=0, stream=True, stream_options={"include_usage": True})
            for ch in stream:
                if first is None and ch.choices and ch.choices[0].text:
                    first = time.perf_counter() - t0
                if ch.usage is not None:
                    with lock:
                        tokens[0] += ch.usage.completion_tokens
            with lock:
                ttfts.append(first if first is not None else time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.perf_counter() - t0), ttfts


class Served:
    """A model behind uvicorn in a background thread."""

    def __init__(self, path: Path, n_seq: int, threads: int) -> None:
        import socket

        import uvicorn

        from qf.runtime import Model
        from qf.serve.app import ServerSettings, create_app

        self.model = Model.load(path, n_ctx=1024, n_seq=n_seq, n_threads=threads)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.base = f"http://127.0.0.1:{self.port}"
        app = create_app(self.model, ServerSettings(model_id="m", max_queue=1024))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.model.close()


def grammar_cost(path: Path, threads: int) -> tuple[float, float, int]:
    """(ms per token in llguidance's mask + advance, ms per token of decoding, tokens) for a JSON-schema reply."""
    from qf.runtime import Model
    from qf.serve.grammar import GrammarFactory

    with Model.load(path, n_ctx=1024, n_threads=threads) as m:
        t0 = time.perf_counter()
        factory = GrammarFactory(m.tokenizer)
        build = time.perf_counter() - t0
        con = factory.json(SCHEMA)
        spent = [0.0]
        mask, accept = con.mask, con.accept

        def timed_mask(logits: Any) -> Any:
            t = time.perf_counter()
            out = mask(logits)
            spent[0] += time.perf_counter() - t
            return out

        def timed_accept(tok: int) -> None:
            t = time.perf_counter()
            accept(tok)
            spent[0] += time.perf_counter() - t

        con.mask, con.accept = timed_mask, timed_accept
        msgs = [{"role": "user", "content": "Describe a person: name, age and cities they lived in."}]
        g = m.chat(msgs, max_tokens=120, temperature=0, constraint=con).wait()
        n = max(1, len(g.tokens))
        print(f"llguidance tokenizer for {m.n_vocab} tokens built in {build:.2f} s; reply: {g.text[:80]!r}")
        return spent[0] / n * 1000, g.stats.t_gen / n * 1000, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--rounds", type=int, default=2)
    args = ap.parse_args()
    path = model_file(args.type)
    servers = {n: Served(path, n, args.threads) for n in (1, 4)}
    try:
        run_load(servers[4].base, 4, 1, 8)  # warm-up: compiles the batched kernels
        run_load(servers[1].base, 1, 1, 8)
        tps: dict[int, list[float]] = {1: [], 4: []}
        ttft: dict[int, list[float]] = {1: [], 4: []}
        ratios = []
        for _ in range(args.rounds):
            for n in (1, 4):
                t, tt = run_load(servers[n].base, args.clients, args.requests, args.n_gen)
                tps[n].append(t)
                ttft[n] += tt
            ratios.append(tps[4][-1] / tps[1][-1])
    finally:
        for s in servers.values():
            s.close()
    print(f"{path.name}, {args.threads} threads; load: {args.clients} streaming clients x {args.requests} "
          f"completions of {args.n_gen} tokens; {args.rounds} rounds\n")
    print("| server | aggregate tok/s (median) | TTFT median | TTFT p90 |")
    print("|---|---|---|---|")
    for n in (1, 4):
        q = statistics.quantiles(ttft[n], n=10)
        print(f"| -np {n} | {statistics.median(tps[n]):.1f} | {statistics.median(ttft[n]) * 1000:.0f} ms | "
              f"{q[-1] * 1000:.0f} ms |")
    print(f"\n-np 4 / -np 1 aggregate: {statistics.median(ratios):.2f}x (median of per-round ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    mask_ms, tok_ms, n = grammar_cost(path, args.threads)
    print(f"structured output: {mask_ms:.3f} ms per token in the grammar mask against {tok_ms:.2f} ms per decoded "
          f"token ({n} tokens, {100 * mask_ms / tok_ms:.1f}% overhead)")


if __name__ == "__main__":
    main()
