"""OpenAI request bodies (validated with pydantic) and the response objects the `openai` client expects."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOPS = 16  # OpenAI allows 4; llama-server allows any number: a generous bound
MAX_STOP_CHARS = 1024


class OpenAIError(Exception):
    """An error answered as OpenAI's {"error": {...}} object with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """Fields shared by chat and text completions (unknown fields are ignored, as OpenAI-compatible servers do)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0, le=1 << 20)
    # defaults of llama-server (the local server these apps are used with), not of OpenAI's hosted models
    temperature: float = Field(default=0.8, ge=0.0, le=100.0)
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=1 << 20)  # llama.cpp extension (0: off)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)  # llama.cpp extension
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=100.0)  # llama.cpp extension
    seed: int | None = Field(default=None, ge=0, le=(1 << 63) - 1)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        """A list of at most MAX_STOPS strings of at most MAX_STOP_CHARS characters."""
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters")
        return stops

    def sampling(self) -> dict[str, Any]:
        """Keywords for Model.generate / chat."""
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    repeat_penalty=self.repeat_penalty, seed=self.seed)

    @property
    def include_usage(self) -> bool:
        """stream_options.include_usage."""
        return bool((self.stream_options or {}).get("include_usage"))


class ContentPart(BaseModel):
    """One part of a message's content: only text parts are supported."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class JsonSchemaSpec(BaseModel):
    """response_format.json_schema."""

    model_config = ConfigDict(extra="ignore")
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """response_format: text, json_object or json_schema."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaSpec | None = None


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=1 << 20)
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def n_logprobs(self) -> int | None:
        """Alternatives to record per token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def limit(self) -> int | None:
        """max_completion_tokens, else max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template wants them (developer -> system)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    """POST /v1/completions (one prompt: a string or a list of token ids)."""

    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=0, le=1 << 20)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy API's alternatives per token


class TokenizeRequest(BaseModel):
    """POST /tokenize (llama-server's shape)."""

    content: str
    add_special: bool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    tokens: list[int]


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    """The usage object."""
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def chat_response(rid: str, model: str, text: str, reason: str, n_prompt: int, n_gen: int,
                  logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A chat.completion object."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": reason}],
            "usage": usage(n_prompt, n_gen)}


def _token(tok: Any, tid: int) -> tuple[str, list[int]]:
    """A token's text (invalid UTF-8 replaced, as OpenAI does) and its bytes."""
    b = tok.token_bytes(tid)
    return b.decode("utf-8", errors="replace"), list(b)


def chat_logprobs(tok: Any, entries: list[Any]) -> dict[str, Any]:
    """choices[].logprobs of the chat API: one entry per token with its top alternatives."""
    content = []
    for e in entries:
        text, raw = _token(tok, e.token)
        top = []
        for tid, lp in e.top:
            t, b = _token(tok, tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(tok: Any, entries: list[Any], offset: int) -> dict[str, Any]:
    """choices[].logprobs of the legacy completions API (tokens, token_logprobs, top_logprobs, text_offset)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text = _token(tok, e.token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({_token(tok, tid)[0]: lp for tid, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_chunk(rid: str, model: str, delta: dict[str, Any], reason: str | None = None,
               usage_obj: dict[str, int] | None = None, choices: bool = True,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A chat.completion.chunk object (choices empty for the final usage chunk)."""
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]
                           if choices else []}
    if usage_obj is not None:
        out["usage"] = usage_obj
    return out


def completion_response(rid: str, model: str, text: str, reason: str | None, n_prompt: int, n_gen: int,
                        chunk: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A text_completion object (or one streamed chunk of it)."""
    out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
    if not chunk:
        out["usage"] = usage(n_prompt, n_gen)
    return out
