"""Request bodies of the OpenAI-compatible routes (pydantic), and the OpenAI error body."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error that becomes an OpenAI error body with an HTTP status."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
             409: "ConflictError", 413: "RequestTooLargeError", 429: "RateLimitError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "APIError"),
                          "code": self.code or self.status, "param": self.param}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(BaseModel):
    """What both completion routes share. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 63) - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v):
        if v == 0:
            return -1  # vLLM and OpenAI clients send 0 for "off"
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> str | None:
        """An OpenAI field set to something ssm-server does not do (rather than ignore it)."""
        extra = self.model_extra or {}
        for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
            if extra.get(name) not in (None, False, 0):
                return name
        if extra.get("best_of") not in (None, 1):
            return "best_of"
        if getattr(self, "echo", False):
            return "echo"
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) == 0:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], (str, list)):
                if len(v) != 1:
                    raise ValueError("one prompt per request (batched prompts are not supported)")
                return v[0]
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        for i, part in enumerate(v if isinstance(v, list) else ()):
            if part.get("type") == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i}: a text part's `text` must be a string")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


def check_text(text: str, param: str) -> str:
    """Text that the tokenizer can take: UTF-8 encodable (JSON admits lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param}: not valid Unicode ({e.reason} at character {e.start})", param=param) from None
    return text


def check_ids(ids: list[int], vocab_size: int | None, param: str) -> list[int]:
    """Token ids inside the vocabulary: an id outside it would fail the engine step that every
    running request shares."""
    if vocab_size:
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})",
                           param=param)
    return ids


def parse(model_cls: type[BaseModel], payload: Any) -> BaseModel:
    """Validate ``payload``; a bad field becomes a 400 that names it."""
    if not isinstance(payload, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        model = model_cls.model_validate(payload)
    except ValidationError as e:
        err = e.errors()[0]
        # a union's branch names (`str`, `list[int]`…) are not fields: `prompt`, not `prompt.str`
        field = ".".join(str(p) for p in err["loc"] if not _BRANCH.fullmatch(str(p))) or None
        raise APIError(400, f"{field}: {err['msg']}" if field else err["msg"], param=field) from None
    bad = model.unsupported() if isinstance(model, SamplingFields) else None
    if bad:
        raise APIError(400, f"{bad}: not supported by ssm-server", param=bad)
    return model


_BRANCH = re.compile(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|union\[.*\])")
