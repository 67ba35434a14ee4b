"""Any OpenAI-compatible chat endpoint (vLLM, Ollama, a hosted provider) through the
``openai`` client, with the client's retries off: the runner owns retries, so that
Retry-After is honoured and attempts are counted, as for Gemini."""

from __future__ import annotations

from router_pipeline import settings
from router_pipeline.llm.types import EMPTY, OK, LLMRequest, LLMResult, RetryableError, retry_after

RETRYABLE_CODES = {408, 409, 429, 500, 502, 503, 504}
DEFAULT_TIMEOUT_S = 120.0


class OpenAIClient:
    provider = "openai"

    def __init__(self, model: str, *, base_url: str, price: tuple[float, float], api_key_env: str | None = None,
                 timeout_s: float | None = None):
        import openai

        self.model, self.price, self.base_url = model, price, base_url
        # A local server may want no key; the client needs a string, so a placeholder goes instead.
        key = settings.secret(api_key_env) if api_key_env else None
        self._openai = openai
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=key or "unused", max_retries=0,
                                          timeout=timeout_s or DEFAULT_TIMEOUT_S)

    def _messages(self, request: LLMRequest) -> list[dict]:
        system = [{"role": "system", "content": request.system}] if request.system else []
        return system + [{"role": "user", "content": request.prompt}]

    def _raise(self, exc: Exception):
        o = self._openai
        if isinstance(exc, o.APIStatusError) and exc.status_code in RETRYABLE_CODES:
            raise RetryableError(f"HTTP {exc.status_code}", retry_after(exc)) from exc
        if isinstance(exc, o.APITimeoutError):
            raise RetryableError(f"timeout: {exc}", maybe_billed=True) from exc
        if isinstance(exc, o.APIConnectionError):
            raise RetryableError(f"connection: {exc}") from exc
        raise exc

    async def complete(self, request: LLMRequest) -> LLMResult:
        try:
            reply = await self._client.chat.completions.create(
                model=self.model, messages=self._messages(request), max_tokens=request.max_output_tokens,
                temperature=request.temperature, **({"stop": list(request.stop)} if request.stop else {}))
        except Exception as exc:
            self._raise(exc)
        choice = reply.choices[0] if reply.choices else None
        text = (choice.message.content or "").strip() if choice else ""
        usage = reply.usage
        return LLMResult(text or None, OK if text else EMPTY,
                         input_tokens=usage.prompt_tokens if usage else 0,
                         output_tokens=usage.completion_tokens if usage else 0,
                         finish_reason=choice.finish_reason if choice else None)

    async def stream(self, request: LLMRequest):
        """Text deltas as they arrive, then the whole LLMResult (usage from the last chunk)."""
        parts, usage, finish = [], None, None
        try:
            chunks = await self._client.chat.completions.create(
                model=self.model, messages=self._messages(request), max_tokens=request.max_output_tokens,
                temperature=request.temperature, stream=True, stream_options={"include_usage": True},
                **({"stop": list(request.stop)} if request.stop else {}))
            async for chunk in chunks:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    if choice.delta and choice.delta.content:
                        parts.append(choice.delta.content)
                        yield choice.delta.content
        except Exception as exc:
            self._raise(exc)
        text = "".join(parts).strip()
        yield LLMResult(text or None, OK if text else EMPTY, input_tokens=usage.prompt_tokens if usage else 0,
                        output_tokens=usage.completion_tokens if usage else 0, finish_reason=finish)

    async def aclose(self) -> None:
        await self._client.close()
