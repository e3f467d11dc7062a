"""The OpenAI-compatible HTTP app over one loaded model: chat and text completions (streamed as SSE or not),
models, health, Prometheus metrics, tokenize / detokenize.

Requests become generations on the model's scheduler, so concurrent clients are decoded together in one
batch (up to the model's n_seq slots; more wait, up to `max_queue`, then 503). The blocking generation
iterators are read through a bounded thread pool; a client that disconnects cancels its generation.
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from qf.format.errors import ContextOverflowError, ModelClosedError, QFError
from qf.runtime.generate import Generation
from qf.serve import protocol as P
from qf.serve.grammar import GrammarError, GrammarFactory
from qf.serve.metrics import Metrics

MAX_BODY_BYTES = 8 << 20  # request bodies beyond this are refused with 413


@dataclass
class ServerSettings:
    """What the app needs besides the model."""

    model_id: str
    api_key: str | None = None
    max_queue: int = 64  # requests waiting for a slot before new ones get 503
    max_body: int = MAX_BODY_BYTES
    reader_threads: int = 64  # threads that read generations for the async handlers
    extra: dict[str, Any] = field(default_factory=dict)


class ServerState:
    """The model, settings, metrics and the lazily built grammar factory."""

    def __init__(self, model: Any, settings: ServerSettings) -> None:
        self.model, self.settings = model, settings
        self.metrics = Metrics()
        self.limiter = anyio.CapacityLimiter(settings.reader_threads)
        self._grammar: GrammarFactory | None = None

    def grammar(self) -> GrammarFactory:
        """llguidance's tokenizer for this model (built on first use, about a second)."""
        if self._grammar is None:
            self._grammar = GrammarFactory(self.model.tokenizer)
        return self._grammar


def create_app(model: Any, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `model`."""
    state = ServerState(model, settings)
    app = FastAPI(title="qserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qf = state
    _install_errors(app)
    _install_guards(app, state)
    _install_routes(app, state)
    return app


# ----------------------------------------------------------------------------------------------- errors

def _error_response(e: P.OpenAIError) -> JSONResponse:
    """An OpenAI error object with its status."""
    return JSONResponse(e.body(), status_code=e.status)


def _install_errors(app: FastAPI) -> None:
    """Every error is an OpenAI-style error object."""

    @app.exception_handler(P.OpenAIError)
    async def _openai(_: Request, e: P.OpenAIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else str(first.get("msg", "invalid request"))
        return _error_response(P.OpenAIError(400, msg, param=loc))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        return _error_response(P.OpenAIError(500, f"internal error: {e!r}", "server_error"))


def _qf_error(e: QFError) -> P.OpenAIError:
    """Our error types as HTTP errors (bad requests are 400)."""
    if isinstance(e, ContextOverflowError):
        return P.OpenAIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, GrammarError):
        return P.OpenAIError(400, str(e), param="response_format")
    if isinstance(e, ModelClosedError):
        return P.OpenAIError(503, "the server is shutting down", "server_error")
    return P.OpenAIError(400, str(e))


# ----------------------------------------------------------------------------------------------- guards

def _install_guards(app: FastAPI, state: ServerState) -> None:
    """API key (Bearer, constant-time compare; /health open) and the request body limit."""
    key = state.settings.api_key

    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        t0 = time.perf_counter()
        if key is not None and request.url.path != "/health":
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                state.metrics.request(request.url.path, 401, time.perf_counter() - t0)
                return _error_response(P.OpenAIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                                     "authentication_error", code="invalid_api_key"))
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > state.settings.max_body):
            state.metrics.request(request.url.path, 413, time.perf_counter() - t0)
            return _error_response(P.OpenAIError(413, f"request body larger than {state.settings.max_body} bytes"))
        response = await call_next(request)
        state.metrics.request(request.url.path, response.status_code, time.perf_counter() - t0)
        return response


async def _body(request: Request, limit: int) -> dict[str, Any]:
    """The JSON body, read up to `limit` bytes (chunked bodies too); 400/413 otherwise."""
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise P.OpenAIError(413, f"request body larger than {limit} bytes")
    try:
        obj = json.loads(bytes(buf))
    except (ValueError, RecursionError) as e:
        raise P.OpenAIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise P.OpenAIError(400, "the request body must be a JSON object")
    return obj


def _parse(model_cls: type, body: dict[str, Any]) -> Any:
    """A pydantic request from a body, or a 400 naming the field."""
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]) from None


# ----------------------------------------------------------------------------------------------- routes

def _install_routes(app: FastAPI, state: ServerState) -> None:
    """The endpoints."""
    s = state.settings

    @app.get("/health")
    async def health() -> dict[str, Any]:
        sch = state.model.scheduler
        return {"status": "ok", "slots_idle": state.model.n_seq - sch.n_running, "slots_processing": sch.n_running,
                "queue": sch.n_waiting}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        _check_model(state, name)
        return _model_card(state)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(state.model), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = _parse(P.TokenizeRequest, await _body(request, s.max_body))
        return {"tokens": _call(lambda: state.model.tokenize(req.content, add_special=req.add_special))}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = _parse(P.DetokenizeRequest, await _body(request, s.max_body))
        return {"content": _call(lambda: state.model.detokenize(req.tokens))}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = _parse(P.ChatRequest, await _body(request, s.max_body))
        _check_model(state, req.model)
        gen = _start_chat(state, req)
        rid = P.new_id("chatcmpl")
        if req.stream:
            return _sse(request, state, gen, _chat_events(state, req, gen, rid))
        text = await _collect(request, state, gen)
        lp = P.chat_logprobs(state.model.tokenizer, gen.logprobs) if gen.n_logprobs is not None else None
        return P.chat_response(rid, s.model_id, text, _reason(gen), len(gen.prompt), len(gen.tokens), lp)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = _parse(P.CompletionRequest, await _body(request, s.max_body))
        _check_model(state, req.model)
        gen = _start_completion(state, req)
        rid = P.new_id("cmpl")
        prefix = req.prompt if req.echo and isinstance(req.prompt, str) else ""
        if req.stream:
            return _sse(request, state, gen, _completion_events(state, req, gen, rid, prefix))
        text = prefix + await _collect(request, state, gen)
        lp = (P.completion_logprobs(state.model.tokenizer, gen.logprobs, len(prefix))
              if gen.n_logprobs is not None else None)
        return P.completion_response(rid, s.model_id, text, _reason(gen), len(gen.prompt), len(gen.tokens),
                                     logprobs=lp)


def _model_card(state: ServerState) -> dict[str, Any]:
    """The /v1/models entry."""
    m = state.model
    return {"id": state.settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "qf",
            "meta": {"n_ctx": m.n_ctx, "n_seq": m.n_seq, "n_vocab": m.n_vocab, "arch": m.hparams.arch}}


def _check_model(state: ServerState, name: str | None) -> None:
    """The request's model must be the one served (or absent)."""
    if name is not None and name not in (state.settings.model_id, ""):
        raise P.OpenAIError(404, f"the model {name!r} does not exist; this server serves "
                                 f"{state.settings.model_id!r}", code="model_not_found", param="model")


def _call(fn: Callable[[], Any]) -> Any:
    """Run fn, turning our errors into 400s."""
    try:
        return fn()
    except QFError as e:
        raise _qf_error(e) from None


def _prompt(state: ServerState, fn: Callable[[], list[int]], param: str) -> list[int]:
    """Prompt tokens; a prompt that cannot fit is a 400 naming the context length."""
    try:
        return fn()
    except ContextOverflowError as e:
        raise P.OpenAIError(400, f"this model's maximum context length is {state.model.n_ctx} tokens; {e}",
                            param=param, code="context_length_exceeded") from None
    except QFError as e:
        raise _qf_error(e) from None


def _admit(state: ServerState) -> None:
    """503 when the queue for slots is full."""
    sch = state.model.scheduler
    if sch.n_waiting >= state.settings.max_queue:
        raise P.OpenAIError(503, f"the server is busy: {sch.n_waiting} requests are waiting for a slot; "
                                 "retry later", "server_error", code="queue_full")


def _check_budget(state: ServerState, n_prompt: int, max_tokens: int | None) -> None:
    """prompt + max_tokens must fit the context (an explicit 400, never a silent truncation)."""
    n_ctx = state.model.n_ctx
    if max_tokens is not None and n_prompt + max_tokens > n_ctx:
        raise P.OpenAIError(400, f"this model's maximum context length is {n_ctx} tokens; the request asks for "
                                 f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} in the completion)",
                            param="max_tokens", code="context_length_exceeded")


def _constraint(state: ServerState, fmt: P.ResponseFormat | None) -> Any:
    """The logits constraint of a response_format (None for text)."""
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema else None
    if fmt.type == "json_schema" and schema is None:
        raise P.OpenAIError(400, "response_format json_schema needs a schema", param="response_format")
    return _call(lambda: state.grammar().json(schema))


def _start_chat(state: ServerState, req: P.ChatRequest) -> Generation:
    """Validate and queue a chat request."""
    _admit(state)
    m = state.model
    ids = _prompt(state, lambda: m.chat_tokens(req.conversation()), "messages")
    return _queue(state, req, ids, req.limit(), lambda: _constraint(state, req.response_format), req.n_logprobs())


def _start_completion(state: ServerState, req: P.CompletionRequest) -> Generation:
    """Validate and queue a completion request."""
    _admit(state)
    m = state.model
    ids = _prompt(state, lambda: m.tokenize(req.prompt, max_tokens=m.n_ctx) if isinstance(req.prompt, str)
                  else list(req.prompt), "prompt")
    return _queue(state, req, ids, req.max_tokens, lambda: None, req.logprobs)


def _queue(state: ServerState, req: Any, ids: list[int], max_tokens: int | None, constraint_fn: Callable[[], Any],
           logprobs: int | None) -> Generation:
    """Check the context budget, build the output constraint, then start the generation on the scheduler."""
    _check_budget(state, len(ids), max_tokens)
    constraint = constraint_fn()
    gen = _call(lambda: state.model.generate(ids, max_tokens=max_tokens, stop=req.stop, constraint=constraint,
                                             logprobs=logprobs, **req.sampling()))
    state.metrics.started(len(ids))
    return gen.start()


def _reason(gen: Generation) -> str:
    """OpenAI's finish_reason ('stop' or 'length'; a cancelled generation reports 'stop')."""
    return "length" if gen.finish_reason == "length" else "stop"


async def _pieces(state: ServerState, gen: Generation) -> AsyncIterator[str]:
    """The generation's text pieces, read in a worker thread; cancels it if the consumer goes away."""
    try:
        while True:
            piece = await anyio.to_thread.run_sync(_next_piece, gen, limiter=state.limiter)
            if piece is None:
                break
            yield piece
    finally:
        if not gen.done:
            gen.cancel()
        state.metrics.finished(gen)


def _next_piece(gen: Generation) -> str | None:
    """The next piece, None at the end; our errors become OpenAI errors."""
    try:
        return next(gen)
    except StopIteration:
        return None
    except QFError as e:
        raise _qf_error(e) from None


async def _collect(request: Request, state: ServerState, gen: Generation) -> str:
    """All of a generation's text; cancelled when the client disconnects meanwhile."""
    parts: list[str] = []

    async def watch(scope: anyio.abc.CancelScope) -> None:
        while not await request.is_disconnected():
            await anyio.sleep(0.25)
        gen.cancel()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        async for piece in _pieces(state, gen):
            parts.append(piece)
        tg.cancel_scope.cancel()
    return "".join(parts)


def _sse(request: Request, state: ServerState, gen: Generation, events: AsyncIterator[dict[str, Any]]) -> Any:
    """A text/event-stream response of JSON events, then [DONE]; an error mid-stream is an error event."""

    async def body() -> AsyncIterator[str]:
        try:
            async for ev in events:
                yield f"data: {json.dumps(ev, ensure_ascii=False)}\n\n"
        except P.OpenAIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _NewLogprobs:
    """The logprob entries of tokens the caller has read since the last call."""

    def __init__(self, gen: Generation) -> None:
        self.gen, self.done = gen, 0

    def take(self) -> list[Any]:
        """Entries up to the generation's read position (empty when logprobs are off)."""
        if self.gen.n_logprobs is None:
            return []
        new = self.gen.logprobs[self.done:self.gen.n_read]
        self.done += len(new)
        return new


async def _chat_events(state: ServerState, req: P.ChatRequest, gen: Generation, rid: str
                       ) -> AsyncIterator[dict[str, Any]]:
    """chat.completion.chunk events: the role, the content pieces, the finish reason, the usage."""
    mid, tok, fresh = state.settings.model_id, state.model.tokenizer, _NewLogprobs(gen)
    lp = (lambda: P.chat_logprobs(tok, fresh.take()) if gen.n_logprobs is not None else None)  # noqa: E731
    yield P.chat_chunk(rid, mid, {"role": "assistant", "content": ""})
    async for piece in _pieces(state, gen):
        yield P.chat_chunk(rid, mid, {"content": piece}, logprobs=lp())
    yield P.chat_chunk(rid, mid, {}, _reason(gen), logprobs=lp())
    if req.include_usage:
        yield P.chat_chunk(rid, mid, {}, usage_obj=P.usage(len(gen.prompt), len(gen.tokens)), choices=False)


async def _completion_events(state: ServerState, req: P.CompletionRequest, gen: Generation, rid: str,
                             prefix: str) -> AsyncIterator[dict[str, Any]]:
    """text_completion chunks."""
    mid, tok, fresh = state.settings.model_id, state.model.tokenizer, _NewLogprobs(gen)
    offset = [len(prefix)]

    def lp(text: str) -> dict[str, Any] | None:
        if gen.n_logprobs is None:
            return None
        out = P.completion_logprobs(tok, fresh.take(), offset[0])
        offset[0] += len(text)
        return out

    if prefix:
        yield P.completion_response(rid, mid, prefix, None, 0, 0, chunk=True)
    async for piece in _pieces(state, gen):
        yield P.completion_response(rid, mid, piece, None, 0, 0, chunk=True, logprobs=lp(piece))
    last = P.completion_response(rid, mid, "", _reason(gen), 0, 0, chunk=True, logprobs=lp(""))
    if req.include_usage:
        last["usage"] = P.usage(len(gen.prompt), len(gen.tokens))
    yield last
