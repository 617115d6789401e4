"""The OpenAI wire format: request schemas, their checks, prompts from messages, and response bodies.

Pure functions and pydantic models, no web framework: :mod:`tunelab.serve.app` wires them to HTTP. Fields OpenAI
defines that tunelab cannot honour are accepted only at their neutral value (no logprobs, tools or penalties,
``best_of=1``) and refused otherwise with a 400 that names the field; unknown fields are refused too, so a typo is
never silently a default. ``n`` answers to one prompt are ``n`` choices, each with its ``index``; usage counts the
prompt once and the completion tokens of every choice. ``min_tokens`` is vLLM's extension, kept for
compatibility.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.data.record import Turn

MAX_STOP_STRINGS = 16
MAX_CHOICES = 128
"""OpenAI's own limit on ``n``; the server also refuses an ``n`` above its ``--max-batch-size``."""


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _GenerationRequest(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    """OpenAI's default is 1 (sampling); 0 decodes greedily."""
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    """Answers to generate for the prompt (default 1), decoded together as rows of one batch."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    """Seeds the sampling of this request alone (choice i: seed + i), whatever else is in the batch; with
    ``--max-batch-size 1`` concurrent generations share one random state and it is ignored."""
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=0, le=0, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="only 0 is supported")
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="not supported")
    top_logprobs: int | None = Field(None, ge=0, le=0)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.tools:
            raise ValueError("tools are not supported; put tool descriptions in the system prompt")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format: only {'type': 'text'} is supported")
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's (the model answers it)")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> tuple[str | None, list[Turn]]:
        """System prompt (system/developer messages joined) and the user/assistant turns, in order."""
        system = [m.text for m in self.messages if m.role in ("system", "developer")]
        turns = [Turn(m.role, m.text) for m in self.messages if m.role in ("user", "assistant")]  # type: ignore[arg-type]
        return ("\n\n".join(system) if system else None), turns


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]
    echo: bool = Field(False, description="not supported")
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)
    logprobs: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: one prompt per request (a string, or a list of one string)")
        return self

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def parse_request(kind: type[_GenerationRequest], body: bytes) -> Any:
    """The request in ``body``, or an :class:`ApiError` (400) that names the bad field."""
    import json

    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unrecognized request argument"
        field = str(error["loc"][0]) if error["loc"] else None
        raise ApiError(400, f"{where}: {message}" if where else message, param=field) from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseIds:
    """Ids and timestamps of one response, shared by all its stream chunks."""

    def __init__(self, prefix: str, model: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def head(self, object: str) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}


def chat_response(
    ids: ResponseIds, answers: Sequence[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict:
    """The whole response; ``answers`` holds ``(text, finish_reason)`` per choice, in index order."""
    return {**ids.head("chat.completion"),
            "choices": [{"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish} for index, (text, finish) in enumerate(answers)],
            "usage": _usage(prompt_tokens, completion_tokens)}


def chat_chunk(
    ids: ResponseIds, delta: dict[str, str], finish: str | None, with_usage: bool, index: int = 0
) -> dict:
    chunk = {**ids.head("chat.completion.chunk"),
             "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return {**chunk, "usage": None} if with_usage else chunk


def completion_response(
    ids: ResponseIds, answers: Sequence[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict:
    """The whole response; ``answers`` holds ``(text, finish_reason)`` per choice, in index order."""
    return {**ids.head("text_completion"),
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}
                        for index, (text, finish) in enumerate(answers)],
            "usage": _usage(prompt_tokens, completion_tokens)}


def completion_chunk(ids: ResponseIds, text: str, finish: str | None, with_usage: bool, index: int = 0) -> dict:
    chunk = {**ids.head("text_completion"),
             "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}
    return {**chunk, "usage": None} if with_usage else chunk


def usage_chunk(ids: ResponseIds, object: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {**ids.head(object), "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}


def models_list(model_ids: list[str], created: int) -> dict:
    return {"object": "list",
            "data": [{"id": m, "object": "model", "created": created, "owned_by": "tunelab"} for m in model_ids]}
