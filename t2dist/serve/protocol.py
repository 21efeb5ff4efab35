"""The OpenAI API's request and response shapes that ``t2dist serve`` speaks (completions, chat, models).

Requests are pydantic models: a field of the wrong type or out of range is a 400 whose ``param``
names the field (:func:`parse_request`).  Fields of the OpenAI API the server does not implement
are refused by name when set to anything but their neutral value (``logprobs``, ``best_of``,
``logit_bias``, penalties, ``tools``, ``suffix``); unknown extra fields are ignored, as vLLM does.
Defaults follow the OpenAI API (``temperature`` 1, ``top_p`` 1, ``n`` 1, no stop strings), except
``max_tokens``: ``serve.max_tokens`` when the request names none (capped to what the model's
length leaves after the prompt).

Every answer carries a ``t2dist`` object (which expert answered and why; see docs/serving.md) next
to the OpenAI fields; the ``openai`` client keeps it (``response.model_extra["t2dist"]``).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from t2dist.serve.errors import ServeError, bad_request

MAX_N = 16
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_PROMPTS = 64


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return ()
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
        return tuple(stops)

    def unsupported(self) -> list[str]:
        """Fields set to something the server does not implement."""
        out = []
        if self.presence_penalty or self.frequency_penalty:
            out.append("presence_penalty" if self.presence_penalty else "frequency_penalty")
        if self.logit_bias:
            out.append("logit_bias")
        return out

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(...)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.logprobs:
            out.append("logprobs")
        if self.best_of not in (None, 1):
            out.append("best_of")
        if self.suffix:
            out.append("suffix")
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list[dict[str, Any]] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.logprobs:
            out.append("logprobs")
        if self.tools:
            out.append("tools")
        return out

    def user_text(self) -> str:
        """The text the first pass classifies: the last user message."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.text
        return self.messages[-1].text


def parse_request(raw: bytes, cls: type[_Request]) -> _Request:
    """A request model from a request body; any problem is a 400 naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        req = cls.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        param = ".".join(str(p) for p in e["loc"]) or None
        msg = e["msg"].removeprefix("Value error, ")
        raise bad_request(f"{param}: {msg}" if param else msg, param=param) from None
    bad = req.unsupported()
    if bad:
        raise bad_request(f"{bad[0]} is not supported by this server", param=bad[0], code="unsupported")
    return req


# -- responses ---------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[dict], use: dict, info: dict, chat: bool) -> dict:
    """A whole answer; ``choices`` hold ``index``, ``text``, ``finish_reason``."""
    if chat:
        out = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                "finish_reason": c["finish_reason"]} for c in choices]
        obj = "chat.completion"
    else:
        out = [{"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
               for c in choices]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": out,
            "usage": use, "t2dist": info}


def chunk_body(rid: str, model: str, index: int, *, text: str | None = None, finish: str | None = None,
               chat: bool, first: bool = False, info: dict | None = None, use: dict | None = None) -> dict:
    """One server-sent event of a streamed answer (``choices`` empty for the final usage chunk)."""
    if chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
                           "choices": [] if use is not None else [choice]}
    if use is not None:
        out["usage"] = use
    if info is not None:
        out["t2dist"] = info
    return out


def sse(data: dict | str) -> bytes:
    """One server-sent event line pair."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def error_event(err: ServeError) -> bytes:
    return sse(err.body())


def model_card(model_id: str, info: dict) -> dict:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "t2dist", "t2dist": info}
