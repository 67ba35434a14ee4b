"""Gemini through the google-genai SDK (async), with SDK retries off: the runner
owns retries so that Retry-After is honoured and attempts are counted."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlparse

from router_pipeline import settings
from router_pipeline.llm.types import BLOCKED, EMPTY, OK, LLMRequest, LLMResult, RetryableError, retry_after

RETRYABLE_CODES = {408, 429, 500, 502, 503, 504}
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
BATCH_DONE = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED",
              "JOB_STATE_PARTIALLY_SUCCEEDED"}


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


def _reraise(exc: Exception):
    """Raise a provider exception as the runner sees it: RetryableError when trying again
    may work (429, 5xx, timeouts, dropped connections), else the exception itself."""
    from google.genai import errors

    if isinstance(exc, errors.APIError):
        if exc.code in RETRYABLE_CODES:
            raise RetryableError(f"HTTP {exc.code} {exc.status}", retry_after(exc)) from exc
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError, OSError)):
        raise RetryableError(f"{type(exc).__name__}: {exc}", maybe_billed=True) from exc
    elif "Timeout" in type(exc).__name__ or "Connect" in type(exc).__name__:
        raise RetryableError(f"{type(exc).__name__}: {exc}", maybe_billed="Timeout" in type(exc).__name__) from exc
    raise exc


class GeminiClient:
    provider = "gemini"

    def __init__(
        self,
        model: str,
        *,
        price: tuple[float, float],
        base_url: str | None = None,
        timeout_s: float | None = None,
        batch: bool = False,
        batch_poll_s: float = 30.0,
    ):
        from google import genai
        from google.genai import types

        self.model = model
        self.price = price
        self.batch, self.batch_poll_s = batch, batch_poll_s  # runs through the Batch API (runner, llm/batch.py)
        url = urlparse(base_url or DEFAULT_BASE_URL)
        self.endpoint = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))  # runner.reachable
        self._types = types
        self._client = genai.Client(
            api_key=api_key_from_env(),
            http_options=types.HttpOptions(base_url=base_url,
                                           timeout=int((timeout_s or default_timeout_s(model)) * 1000)),
        )

    async def complete(self, request: LLMRequest) -> LLMResult:
        try:
            response = await self._client.aio.models.generate_content(
                model=self.model, contents=request.prompt, config=self._config(request))
        except Exception as exc:
            _reraise(exc)
        return self._to_result(response)

    async def stream(self, request: LLMRequest):
        """``streamGenerateContent``: yields text deltas as they arrive, then the whole
        LLMResult (usage from the last chunk). Failures before the first delta raise
        RetryableError like ``complete``."""
        parts, last = [], None
        try:
            async for chunk in await self._client.aio.models.generate_content_stream(
                    model=self.model, contents=request.prompt, config=self._config(request)):
                last = chunk
                text = _answer_text(chunk.candidates[0]) if chunk.candidates else ""
                if text:
                    parts.append(text)
                    yield text
        except Exception as exc:
            _reraise(exc)
        if last is None:
            yield LLMResult(None, EMPTY)
            return
        result = self._to_result(last)
        whole = "".join(parts).strip()
        result.text, result.status = (whole, OK) if whole else (None, result.status if result.status != OK else EMPTY)
        yield result

    # -- Batch API (llm/batch.py drives it) --------------------------------------
    async def batch_create(self, keyed: list[tuple[str, LLMRequest]]) -> str:
        """Submit one batch job of inlined requests, each tagged with its key; its name."""
        src = [self._types.InlinedRequest(contents=r.prompt, config=self._config(r), metadata={"key": key})
               for key, r in keyed]
        try:
            job = await self._client.aio.batches.create(model=self.model, src=src,
                                                        config={"display_name": f"router-pipeline {len(src)}"})
        except Exception as exc:
            _reraise(exc)
        return job.name

    async def batch_get(self, name: str) -> tuple[str, dict[str, LLMResult] | None]:
        """(state, {key: result} once the job has ended). A request the job failed comes
        back as an ERROR result; one missing from the output is absent."""
        try:
            job = await self._client.aio.batches.get(name=name)
        except Exception as exc:
            _reraise(exc)
        state = str(getattr(job.state, "name", job.state))
        if state not in BATCH_DONE:
            return state, None
        out = {}
        for item in (job.dest.inlined_responses if job.dest and job.dest.inlined_responses else []):
            key = (item.metadata or {}).get("key")
            if key is None:
                continue
            if item.error is not None or item.response is None:
                out[key] = LLMResult.failed(f"batch item failed: {getattr(item.error, 'message', None) or 'no response'}")
            else:
                out[key] = self._to_result(item.response)
        return state, out

    def _config(self, request: LLMRequest):
        return self._types.GenerateContentConfig(
            temperature=request.temperature,
            max_output_tokens=request.max_output_tokens,
            system_instruction=request.system,
            stop_sequences=list(request.stop) or None,
            # A closed set of replies (Gemini's enum output) or JSON of a schema (structured
            # output): anything else is impossible.
            response_mime_type="text/x.enum" if request.choices else "application/json" if request.schema else None,
            response_schema=({"type": "STRING", "enum": list(request.choices)} if request.choices
                             else json.loads(request.schema) if request.schema else None),
        )

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
        text = _answer_text(candidate) if candidate is not None else ""
        if not text.strip():
            status = BLOCKED if finish in {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII"} else EMPTY
            return LLMResult(None, status, input_tokens, output_tokens, finish_reason=finish)
        return LLMResult(text.strip(), OK, input_tokens, output_tokens, finish_reason=finish)

    async def aclose(self) -> None:
        close = getattr(self._client.aio, "aclose", None)
        if close is not None:
            await close()


def _answer_text(candidate) -> str:
    """A candidate's answer text: its parts joined as they are (thoughts left out)."""
    if candidate.content is None or not candidate.content.parts:
        return ""
    return "".join(p.text for p in candidate.content.parts if p.text and not p.thought)
