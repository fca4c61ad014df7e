"""The OpenAI request bodies the server accepts, and the one-line errors for everything else.

Fields are typed strictly (a string where a number belongs is an error, not a guess); fields OpenAI defines that
the server does not implement are accepted only at their neutral value (`n=1`, penalties 0, ...), and any other
field is refused by name, as OpenAI does."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dsv4.serve.scheduler import MAX_TOP_LOGPROBS

MAX_STOP = 4                 # stop strings per request (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # `logprobs` of /v1/completions (OpenAI's limit)


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Common(BaseModel):
    """Fields both endpoints share."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP or not all(stop):
            raise APIError(400, f"stop must be up to {MAX_STOP} non-empty strings", "stop")
        return stop


class CompletionRequest(Common):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: Literal[False] = False
    max_tokens: int | None = 16         # OpenAI's default for completions


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "message content parts must be {\"type\": \"text\", \"text\": ...}; other "
                                    "kinds are not supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = None


def parse(body: bytes, kind: type[BaseModel]) -> Any:
    """The request body as `kind`, or an APIError naming what is wrong with it."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        field = str(error["loc"][0]) if error["loc"] else None
        if error["type"] == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument supplied: {where}", field) from None
        if error["type"] == "literal_error" and field in ("n", "echo", "presence_penalty", "frequency_penalty"):
            raise APIError(400, f"{field}={error['input']!r} is not supported by this server", field) from None
        got = json.dumps(error.get("input"))[:60]
        raise APIError(400, f"{where}: {error['msg']} (got {got})", field) from None
