"""The server's request bodies, declared: every field typed and bounded, as OpenAI-
compatible servers declare them. Fields OpenAI clients send that the router does not
use (temperature, user, ...) are accepted and ignored; a field the router does use
with a wrong type or value is a 400 naming it (``invalid_field``), never coerced
("100" is not 100) and never echoed back.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from router_pipeline.policies import GRADES, TIERS

Role = Literal["system", "developer", "user", "assistant", "tool"]
Tier = Literal[TIERS]  # type: ignore[valid-type]
MAX_MESSAGES = 256
MAX_ID_CHARS = 200


class RequestError(ValueError):
    """A body that is not what the endpoint declares; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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
        """The message's text: a string, or its text parts joined (images and audio are
        not read by the router)."""
        if isinstance(self.content, list):
            return " ".join(p.text for p in self.content if p.type == "text" and p.text)
        return self.content or ""


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
    tier: Tier | None = None
    preferred_tier: Tier | None = None


def parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    """``raw`` (the whole body) as ``model``, or RequestError naming what is wrong."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"request body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise RequestError(f"{param}: {err['msg']}" if param else err["msg"], param) from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
