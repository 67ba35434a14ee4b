"""Gemini through the google-genai SDK (async), with SDK retries off: the runner
owns retries so that Retry-After is honoured and attempts are counted."""

from __future__ import annotations

import asyncio

from router_pipeline import settings
from router_pipeline.llm.types import BLOCKED, EMPTY, OK, LLMRequest, LLMResult, RetryableError

RETRYABLE_CODES = {408, 429, 500, 502, 503, 504}


class MissingCredentials(RuntimeError):
    pass


def default_timeout_s(model: str) -> float:
    """Pro models think before they answer and take minutes on hard prompts; a timeout
    shorter than that makes the runner retry, and pay for, a call that was still running."""
    return 300.0 if "pro" in model.lower() else 120.0


def api_key_from_env() -> str:
    key = settings.gemini_api_key()
    if key is None:
        raise MissingCredentials(f"a gemini role is configured but none of "
                                 f"{', '.join(settings.GEMINI_API_KEY_VARS)} is set in the environment")
    return key


def _retry_after(exc) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class GeminiClient:
    provider = "gemini"

    def __init__(
        self,
        model: str,
        *,
        price: tuple[float, float],
        base_url: str | None = None,
        timeout_s: float | None = None,
    ):
        from google import genai
        from google.genai import types

        self.model = model
        self.price = price
        self._types = types
        self._client = genai.Client(
            api_key=api_key_from_env(),
            http_options=types.HttpOptions(base_url=base_url,
                                           timeout=int((timeout_s or default_timeout_s(model)) * 1000)),
        )

    async def complete(self, request: LLMRequest) -> LLMResult:
        from google.genai import errors

        config = self._types.GenerateContentConfig(
            temperature=request.temperature,
            max_output_tokens=request.max_output_tokens,
            system_instruction=request.system,
            stop_sequences=list(request.stop) or None,
            # A closed set of replies: Gemini's enum output makes anything else impossible.
            response_mime_type="text/x.enum" if request.choices else None,
            response_schema={"type": "STRING", "enum": list(request.choices)} if request.choices else None,
        )
        try:
            response = await self._client.aio.models.generate_content(
                model=self.model, contents=request.prompt, config=config
            )
        except errors.APIError as exc:
            if exc.code in RETRYABLE_CODES:
                raise RetryableError(f"HTTP {exc.code} {exc.status}", _retry_after(exc)) from exc
            raise
        except (asyncio.TimeoutError, TimeoutError, ConnectionError, OSError) as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}", maybe_billed=True) from exc
        except Exception as exc:
            if "Timeout" in type(exc).__name__ or "Connect" in type(exc).__name__:
                raise RetryableError(f"{type(exc).__name__}: {exc}", maybe_billed="Timeout" in type(exc).__name__) from exc
            raise
        return self._to_result(response)

    def _to_result(self, response) -> LLMResult:
        usage = response.usage_metadata
        input_tokens = (usage.prompt_token_count or 0) if usage else 0
        # Thinking tokens are billed as output.
        output_tokens = ((usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)) if usage else 0
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason:
            return LLMResult(None, BLOCKED, input_tokens, output_tokens, finish_reason=str(feedback.block_reason))
        candidate = response.candidates[0] if response.candidates else None
        finish = str(candidate.finish_reason.value if hasattr(candidate.finish_reason, "value") else candidate.finish_reason) if candidate and candidate.finish_reason else None
        text = ""
        if candidate is not None and candidate.content is not None and candidate.content.parts:
            text = "".join(p.text for p in candidate.content.parts if p.text and not p.thought)
        if not text.strip():
            status = BLOCKED if finish in {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII"} else EMPTY
            return LLMResult(None, status, input_tokens, output_tokens, finish_reason=finish)
        return LLMResult(text.strip(), OK, input_tokens, output_tokens, finish_reason=finish)

    async def aclose(self) -> None:
        close = getattr(self._client.aio, "aclose", None)
        if close is not None:
            await close()
