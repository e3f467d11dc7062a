"""qserve driven by the real `openai` client: chat and completions (streamed and not), stop, max_tokens, JSON
schema output, context overflow, API keys, hostile requests, disconnects, a 16-client load test, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from qf.runtime import Model  # noqa: E402

KEY = "test-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The capital of France is", "List three colours:", "def fibonacci(n):", "Water boils at",
           "Once upon a time, in a small village,", "The best way to learn a language is", "My favourite book is",
           "In 1969, the first", "A haiku about the sea:", "The three primary colours are", "Python is",
           "The largest planet in the solar system is", "To make tea, first", "The opposite of hot is",
           "Monday, Tuesday,", "2 + 2 ="]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """uvicorn serving a model in a background thread."""

    def __init__(self, model: Model, **settings: Any) -> None:
        import uvicorn

        from qf.serve.app import ServerSettings, create_app

        self.model = model
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        app = create_app(model, ServerSettings(model_id="smol", api_key=KEY, **settings))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def client(self, key: str = KEY, **kw: Any) -> Any:
        """An OpenAI client pointed at this server."""
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, **kw)

    def post(self, path: str, body: Any = None, raw: bytes | None = None, key: str = KEY) -> httpx.Response:
        """A raw POST (for malformed requests)."""
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx.post(self.base + path, content=content, timeout=60,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def smollm2_q4_0(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted to Q4_0 from its HF export."""
    from qf.convert.pipeline import convert

    out = tmp_path_factory.mktemp("serve") / "smollm2-q4_0.qf"
    convert(smollm2_hf, out, qtype="Q4_0")
    return out


@pytest.fixture(scope="module")
def server(smollm2_q4_0: Path) -> Iterator[Server]:
    with Model.load(smollm2_q4_0, n_ctx=512, n_seq=4, n_threads=2) as m:
        s = Server(m)
        yield s
        s.stop()


pytestmark = pytest.mark.slow


def test_chat_non_streaming(server: Server) -> None:
    r = server.client().chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(server.model.chat_tokens(QUESTION))
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(server: Server) -> None:
    c = server.client()
    whole = c.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=24)
    chunks = list(c.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streaming_and_not(server: Server) -> None:
    c = server.client()
    r = c.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smol", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    echoed = c.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0,
                                  echo=True)
    assert echoed.choices[0].text == "The capital of France is" + r.choices[0].text


def test_stop_and_max_tokens(server: Server) -> None:
    c = server.client()
    r = c.completions.create(model="smol", prompt="Monday, Tuesday,", max_tokens=20, temperature=0, stop=[","])
    assert "," not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_json_schema_response_validates(server: Server) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "cities": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "age", "cities"], "additionalProperties": False}
    r = server.client().chat.completions.create(
        model="smol", temperature=0, max_tokens=120,
        messages=[{"role": "user", "content": "Describe a person: name, age and cities they lived in."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    jsonschema.validate(obj, schema)
    r = server.client().chat.completions.create(model="smol", temperature=0, max_tokens=80, messages=QUESTION,
                                                response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_context_overflow_is_a_400_naming_the_numbers(server: Server) -> None:
    c = server.client()
    with pytest.raises(openai.BadRequestError, match=r"maximum context length is 512 tokens"):
        c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi " * 600}], max_tokens=8)
    with pytest.raises(openai.BadRequestError, match=r"in the completion"):
        c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=500)


def test_api_key(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert httpx.get(server.base + "/health").json()["status"] == "ok"  # open without a key
    assert [m.id for m in server.client().models.list().data] == ["smol"]


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400), (b"[1, 2]", 400), (b'{"messages": "hi"}', 400),
    (json.dumps({"messages": QUESTION, "temperature": "hot"}).encode(), 400),
    (json.dumps({"messages": QUESTION, "max_tokens": -1}).encode(), 400),
    (json.dumps({"messages": QUESTION, "max_tokens": 10**12}).encode(), 400),
    (json.dumps({"messages": QUESTION, "n": 3}).encode(), 400),
    (json.dumps({"messages": QUESTION, "model": "gpt-9"}).encode(), 404),
    (json.dumps({"messages": QUESTION, "seed": -5}).encode(), 400),
    (json.dumps({"messages": QUESTION, "response_format": {"type": "json_schema"}}).encode(), 400),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    (b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", 400),
])
def test_bad_requests_are_openai_errors(server: Server, body: bytes, status: int) -> None:
    r = server.post("/v1/chat/completions", raw=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]


def test_oversized_body_is_413_and_the_server_keeps_serving(server: Server) -> None:
    r = server.post("/v1/chat/completions", raw=b'{"messages": [{"role": "user", "content": "' + b"a" * (9 << 20)
                    + b'"}]}')
    assert r.status_code == 413
    assert server.client().completions.create(model="smol", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_disconnect_cancels_and_a_slow_reader_does_not_block_others(server: Server) -> None:
    """A client that stops reading or hangs up never holds up the others; a hang-up frees its slot."""
    body = json.dumps({"messages": QUESTION, "stream": True, "max_tokens": 400, "temperature": 0.7}).encode()
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    t0 = time.perf_counter()
    r = server.client().chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=16)
    assert r.choices[0].message.content and time.perf_counter() - t0 < 60
    slow.close()  # hang up mid-stream
    deadline = time.time() + 30
    while server.model.scheduler.n_running and time.time() < deadline:
        time.sleep(0.05)
    assert server.model.scheduler.n_running == 0


def test_tokenize_detokenize_metrics(server: Server) -> None:
    ids = server.post("/tokenize", {"content": "Hello world"}).json()["tokens"]
    assert ids == server.model.tokenize("Hello world", add_special=False)
    assert server.post("/detokenize", {"tokens": ids}).json()["content"] == "Hello world"
    text = httpx.get(server.base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'qf_requests_total{path="/v1/chat/completions",status="200"}' in text and "qf_slots_total 4" in text


def test_sixteen_streaming_clients_get_their_solo_greedy_text(server: Server) -> None:
    """16 concurrent streaming clients x 4 requests each on -np 4: every request completes, and at temperature
    0 each text equals that prompt's solo greedy output."""
    c = server.client(timeout=300)
    solo = {p: c.completions.create(model="smol", prompt=p, max_tokens=12, temperature=0).choices[0].text
            for p in PROMPTS}
    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def client(i: int) -> None:
        cc = server.client(timeout=300)
        try:
            for j in range(4):
                p = PROMPTS[(i + 5 * j) % len(PROMPTS)]
                text = "".join(ch.choices[0].text for ch in cc.completions.create(
                    model="smol", prompt=p, max_tokens=12, temperature=0, stream=True))
                results.append((p, text))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    assert len(results) == 64
    assert all(text == solo[p] for p, text in results), [(p, t, solo[p]) for p, t in results if t != solo[p]][:3]
    assert server.model.scheduler.max_batch == 4


def test_qserve_cli_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The command: starts, answers, and on SIGTERM finishes in-flight work and exits 0."""
    from test_runtime_forward import build_tiny_gguf

    path = build_tiny_gguf(tmp_path / "tiny.gguf")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qf.tools.qserve", str(path), "--port", str(port), "-c", "64",
                             "-np", "2", "-t", "1", "--shutdown-timeout", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"QF_API_KEY": ""})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        r = c.completions.create(model="tiny", prompt="ab", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens <= 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert b"qserve: stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_full_queue_is_503_and_the_rest_complete(server: Server) -> None:
    """With the scheduler paused, requests pile up; past max_queue they get 503, the others finish after."""
    busy = Server(server.model, max_queue=2)
    statuses: list[int] = []
    lock = threading.Lock()

    def send() -> None:
        r = busy.post("/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        with lock:
            statuses.append(r.status_code)

    try:
        with server.model.scheduler.paused():
            threads = [threading.Thread(target=send) for _ in range(10)]
            for t in threads:
                t.start()
            deadline = time.time() + 30
            while 503 not in statuses and time.time() < deadline:
                time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
    finally:
        busy.stop()


def test_logprobs(server: Server) -> None:
    """Chat and completion logprobs: one entry per generated token, the greedy token the most likely, the
    alternatives sorted, streamed entries equal to the non-streamed ones."""
    import math

    c = server.client()
    r = c.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=6, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert math.isclose(e.top_logprobs[0].logprob, e.logprob, abs_tol=1e-6) and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    streamed = [e for ch in c.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=6,
                                                      logprobs=True, top_logprobs=3, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    # same tokens; logprobs agree to prefill-path noise (the second request reuses the cached prompt prefix, so
    # its last prompt token runs as a single-row product instead of inside the integer-prefill batch)
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(abs(a.logprob - b.logprob) < 1e-2 for a, b in zip(streamed, content))
    t = c.completions.create(model="smol", prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    lp = t.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == t.choices[0].text and lp.text_offset[0] == 0
    assert all(max(alts.values()) == pytest.approx(v, abs=1e-6) for alts, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert server.post("/v1/chat/completions", {"messages": QUESTION, "logprobs": True,
                                                "top_logprobs": 21}).status_code == 400
