"""One small LLM interface with two real implementations: ``gemini`` and ``local``.

Roles (medium, large, judge, analyser) are configured independently with a RoleSpec;
``make_client`` turns one into a client the runner can drive.
"""

from __future__ import annotations

from dataclasses import dataclass

from router_pipeline.llm.models import price_for
from router_pipeline.llm.types import LLMRequest, LLMResult

PROVIDERS = ("gemini", "local", "openai")  # openai: any OpenAI-compatible endpoint (llm.pool)
RULES = "rules"  # what a role without a model is recorded as: the deterministic grader or analyser
PROMPT_STYLES = ("direct", "few_shot")  # how an answerer is prompted (labels.answering.answer_prompt)


@dataclass(frozen=True)
class RoleSpec:
    provider: str
    model: str
    max_output_tokens: int = 64
    temperature: float = 0.0
    prompt_style: str = PROMPT_STYLES[0]  # answerers only: one of PROMPT_STYLES
    input_price_per_mtok: float | None = None  # None: the price table (local models: free)
    output_price_per_mtok: float | None = None

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}; expected one of {PROVIDERS}")
        if not self.model:
            raise ValueError("a role needs a model name")

    @property
    def price(self) -> tuple[float, float]:
        if self.input_price_per_mtok is None and self.output_price_per_mtok is None:
            return price_for(self.model)
        return (self.input_price_per_mtok or 0.0, self.output_price_per_mtok or 0.0)

    def request(self, prompt: str, *, system: str | None = None, stop: tuple[str, ...] = (),
                choices: tuple[str, ...] = (), schema: str | None = None) -> LLMRequest:
        return LLMRequest(
            prompt=prompt,
            max_output_tokens=self.max_output_tokens,
            temperature=self.temperature,
            system=system,
            stop=stop,
            choices=choices,
            schema=schema,
        )


def make_client(spec: RoleSpec, *, gemini_base_url: str | None = None, timeout_s: float | None = None,
                batch_size: int = 8, batch: bool = False, batch_poll_s: float = 30.0):
    """A client for a role; ``timeout_s`` None: a default that fits the model (Pro is slow).
    ``batch``: a Gemini client's runs go through the Batch API (llm/batch.py)."""
    if spec.provider == "gemini":
        from router_pipeline.llm.gemini import GeminiClient

        return GeminiClient(spec.model, price=spec.price, base_url=gemini_base_url, timeout_s=timeout_s,
                            batch=batch, batch_poll_s=batch_poll_s)
    if spec.provider == "openai":  # its endpoint and key live in its pool entry
        raise ValueError(f"{spec.model}: an OpenAI-compatible model is called through its pool entry "
                         "(llm.pool.client_for), which has its base_url")
    from router_pipeline.llm.local import LocalClient

    return LocalClient(spec.model, price=spec.price, batch_size=batch_size)


__all__ = ["LLMRequest", "LLMResult", "RoleSpec", "make_client", "PROVIDERS"]
