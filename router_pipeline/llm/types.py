"""Plain data passed to and from every LLM provider."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

OK = "ok"  # the model produced text
EMPTY = "empty"  # the call succeeded but the text is empty
BLOCKED = "blocked"  # the provider refused (safety, recitation, ...)
ERROR = "error"  # the call failed after all retries; never cached, retried next run
CACHEABLE = (OK, EMPTY, BLOCKED)


@dataclass(frozen=True)
class LLMRequest:
    prompt: str
    max_output_tokens: int = 64
    temperature: float = 0.0
    system: str | None = None
    stop: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()  # the reply must be exactly one of these (constrained where the API can)
    schema: str | None = None  # the reply is JSON of this schema (JSON text, so the request stays hashable)

    def settings(self) -> dict:
        settings = {
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "system": self.system,
            "stop": list(self.stop),
        }
        if self.choices:  # only then, so that existing cache keys stay valid
            settings["choices"] = list(self.choices)
        if self.schema:
            settings["schema"] = self.schema
        return settings


def cache_key(provider: str, model: str, request: LLMRequest) -> str:
    """Key of the persistent cache: (provider, model, prompt, generation settings)."""
    blob = json.dumps(
        {"provider": provider, "model": model, "prompt": request.prompt, **request.settings()},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class LLMResult:
    text: str | None
    status: str
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    latency_ms: float = 0.0
    attempts: int = 1
    cached: bool = False
    cost_usd: float = 0.0
    meta: dict = field(default_factory=dict)

    @classmethod
    def failed(cls, error: str, attempts: int = 1) -> "LLMResult":
        return cls(text=None, status=ERROR, error=error, attempts=attempts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, blob: str) -> "LLMResult":
        return cls(**json.loads(blob))


class PromptTooLong(ValueError):
    """A prompt over what a model may be given (a local model's input cap): another model
    may take it; retrying this one cannot help."""


class RetryableError(Exception):
    """A transient failure (429, 5xx, timeout): the runner backs off and tries again."""

    def __init__(self, message: str, retry_after: float | None = None, maybe_billed: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        # A timeout or a dropped connection: the provider may have finished (and billed)
        # the call we are about to send again.
        self.maybe_billed = maybe_billed


def retry_after(exc) -> float | None:
    """The seconds an HTTP error's Retry-After header asks for (None when absent or not a number)."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    value = (headers.get("Retry-After") or headers.get("retry-after")) if headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
