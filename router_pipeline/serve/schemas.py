"""The server's request bodies, declared: every field typed and bounded, as OpenAI-
compatible servers declare them. A field the router uses with a wrong type or value is
a 400 naming it (``invalid_field``), never coerced ("100" is not 100) and never echoed
back.

Nothing a caller asks for is dropped without a word: a chat field this server does not
honour (tools and tool turns, ``n`` > 1, ``logprobs``, ``response_format`` other than
text, ``stop``, ``seed``, content parts other than text, any field it does not know) is a
400 ``unsupported_parameter`` naming it, unless it holds the value that asks for
nothing (``n: 1``, ``tools: []``, ``null``, ...). Sampling hints the answer does not
depend on (``IGNORED``: temperature, top_p, ...) are accepted and named in the reply's
``routing.ignored_parameters``. JSON's NaN and Infinity are refused.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator

from router_pipeline.policies import GRADES, TIERS

Role = Literal["system", "developer", "user", "assistant", "tool"]
Tier = Literal[TIERS]  # type: ignore[valid-type]
MAX_MESSAGES = 256
MAX_ID_CHARS = 200
UNSUPPORTED = "unsupported_parameter"
# Accepted, not honoured, named in the reply: the models' own sampling settings answer instead.
IGNORED = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "user", "metadata", "store")
# Unknown fields accepted only with the value that asks for nothing beyond a plain answer.
NO_OP = {"n": (1,), "logprobs": (False,), "top_logprobs": (0,), "response_format": ({"type": "text"},),
         "stop": ([],), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
         "parallel_tool_calls": (True, False), "modalities": (["text"],), "logit_bias": ({},)}


class RequestError(ValueError):
    """A body that is not what the endpoint declares; ``param`` names the field, ``code``
    says why when it is not a wrong value (``unsupported_parameter``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def _asks_nothing(name: str, value) -> bool:
    return value is None or any(type(value) is type(v) and value == v for v in NO_OP.get(name, ()))


def _unsupported(param: str, what: str) -> RequestError:
    return RequestError(f"{param}: {what} is not supported by this server", param, UNSUPPORTED)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self):
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs a string 'text'")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Role
    content: StrictStr | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text: a string, or its text parts joined."""
        if isinstance(self.content, list):
            return " ".join(p.text for p in self.content if p.type == "text" and p.text)
        return self.content or ""

    def check_supported(self, where: str) -> None:
        """RequestError for what this message holds that would not reach the model."""
        if self.role == "tool":
            raise _unsupported(f"{where}.role", "a tool result (role 'tool': tool calling)")
        for name in ("tool_calls", "function_call"):
            if (self.model_extra or {}).get(name) not in (None, []):
                raise _unsupported(f"{where}.{name}", "an assistant's tool call (tool calling)")
        for i, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.type != "text":
                raise _unsupported(f"{where}.content.{i}.type", f"a {part.type!r} content part (only text is read)")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class Conversation(BaseModel):
    """/v1/route: ``messages`` (OpenAI chat format) or a plain ``query``."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    query: StrictStr | None = None

    @model_validator(mode="after")
    def _messages_or_query(self):
        if self.messages is None and self.query is None:
            raise ValueError("give 'messages' (a non-empty list of {role, content}) or 'query'")
        return self

    def check_supported(self) -> None:
        for i, m in enumerate(self.messages or []):
            m.check_supported(f"messages.{i}")

    def plain_messages(self) -> list[dict]:
        """The conversation as {role, content: str} dicts."""
        if self.messages is None:
            return [{"role": "user", "content": self.query}]
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class ChatRequest(Conversation):
    """/v1/chat/completions."""

    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, value in (self.model_extra or {}).items():
            if name not in IGNORED and not _asks_nothing(name, value):
                raise _unsupported(name, "this field" if name not in NO_OP else f"{name} with this value")

    @property
    def ignored(self) -> list[str]:
        """The fields given that are accepted but not honoured (IGNORED)."""
        return [n for n in IGNORED if (self.model_extra or {}).get(n) is not None]

    @property
    def output_tokens(self) -> tuple[str, int] | None:
        """(field, value) of the caller's output budget, max_completion_tokens first."""
        for name in ("max_completion_tokens", "max_tokens"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: StrictStr = Field(min_length=1, max_length=MAX_ID_CHARS)
    grade: Literal[GRADES] | None = None  # type: ignore[valid-type]
    # The model graded: medium / large, or a pool router's model by its pool name (``model``
    # says the same; the server answers 400 for a name outside its pool).
    tier: StrictStr | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    model: StrictStr | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    preferred_tier: Tier | None = None


class AdminChange(BaseModel):
    """POST /v1/admin/profiles/{name}: the fields to change (serve/live.py), for ``ttl_s``
    seconds or for good. What the values may be is the profiles file's check."""

    model_config = ConfigDict(extra="forbid")
    set: dict
    ttl_s: StrictInt | StrictFloat | None = None


def parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    """``raw`` (the whole body) as ``model``, or RequestError naming what is wrong."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise RequestError("request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"request body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise RequestError(f"{param}: {err['msg']}" if param else err["msg"], param) from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    if hasattr(parsed, "check_supported"):
        parsed.check_supported()
    return parsed


def _no_constant(name: str):
    raise RequestError(f"request body holds {name}, which is not a JSON number")
