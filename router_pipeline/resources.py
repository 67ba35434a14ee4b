"""Dagster resources: where DataFrames are stored, and the LLM roles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import dagster as dg
import pandas as pd
from pydantic import Field

from router_pipeline.llm import RoleSpec, make_client
from router_pipeline.llm.cache import ResponseCache
from router_pipeline.llm.runner import RetryPolicy
from router_pipeline.paths import artifacts_dir

PROFILE_VAR = "ROUTER_PIPELINE_PROFILE"
PROFILES = ("offline", "gemini")


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores each DataFrame asset as artifacts/<key>.parquet, readable without Dagster."""

    base_dir: Optional[str] = None  # None: artifacts/assets, resolved when used

    def _path(self, key: dg.AssetKey) -> Path:
        base = Path(self.base_dir) if self.base_dir else artifacts_dir() / "assets"
        return base.joinpath(*key.path).with_suffix(".parquet")

    def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, expected a DataFrame")
        path = self._path(context.asset_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".parquet.tmp")
        obj.to_parquet(tmp, index=False)
        tmp.replace(path)  # readers never see a half-written file
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        path = self._path(context.asset_key)
        if not path.exists():
            raise FileNotFoundError(f"{context.asset_key.to_user_string()} has not been materialised yet ({path})")
        return pd.read_parquet(path)


class ModelRole(dg.Config):
    provider: str = Field(description="'local' (transformers) or 'gemini' (google-genai)")  # type: ignore[assignment]
    model: str = Field(description="Gemini model id, embedded model name (gemma3-270m) or a local checkpoint dir")  # type: ignore[assignment]
    max_output_tokens: int = 64
    temperature: float = 0.0
    prompt_style: str = "direct"
    input_price_per_mtok: Optional[float] = None
    output_price_per_mtok: Optional[float] = None

    def spec(self) -> RoleSpec:
        return RoleSpec(**self.model_dump())


class LLMRoles(dg.ConfigurableResource):
    """The four LLM roles, configured independently. judge/analyser unset means the
    deterministic grader/analyser."""

    medium: ModelRole
    large: ModelRole
    judge: Optional[ModelRole] = None
    analyser: Optional[ModelRole] = None
    gemini_base_url: Optional[str] = None  # None: GEMINI_BASE_URL or Google's endpoint
    timeout_s: Optional[float] = None  # None: 300 s for Pro models (thinking), 120 s otherwise
    concurrency: int = 16
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    local_batch_size: int = 16
    cache_path: Optional[str] = None  # None: artifacts/cache/llm_cache.sqlite

    def spec(self, role: str) -> RoleSpec | None:
        cfg = getattr(self, role)
        return cfg.spec() if cfg is not None else None

    def client(self, role: str):
        spec = self.spec(role)
        if spec is None:
            return None
        return make_client(spec, gemini_base_url=self.gemini_base_url, timeout_s=self.timeout_s,
                           batch_size=self.local_batch_size)

    def cache(self) -> ResponseCache:
        return ResponseCache(self.cache_path or artifacts_dir() / "cache" / "llm_cache.sqlite")

    def retry(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.max_attempts, base_delay_s=self.backoff_base_s)

    def describe(self) -> dict[str, str]:
        """Role -> 'provider:model' for metadata (never keys or URLs with secrets)."""
        return {r: (f"{s.provider}:{s.model}" if (s := self.spec(r)) else "rules")
                for r in ("medium", "large", "judge", "analyser")}


def offline_roles() -> LLMRoles:
    """Gemma 3 270M from its PyPI wheel for both tiers (zero-shot/short vs few-shot/longer),
    priced as Flash and Pro so cost figures keep their meaning; rules judge and analyser."""
    return LLMRoles(
        medium=ModelRole(provider="local", model="gemma3-270m", max_output_tokens=16, prompt_style="direct",
                         input_price_per_mtok=0.30, output_price_per_mtok=2.50),
        large=ModelRole(provider="local", model="gemma3-270m", max_output_tokens=32, prompt_style="few_shot",
                        input_price_per_mtok=1.25, output_price_per_mtok=10.0),
    )


def gemini_roles() -> LLMRoles:
    # Gemini 2.5 models think before answering; thinking tokens share max_output_tokens.
    return LLMRoles(
        medium=ModelRole(provider="gemini", model=os.environ.get("ROUTER_MEDIUM_MODEL", "gemini-2.5-flash"), max_output_tokens=1024),
        large=ModelRole(provider="gemini", model=os.environ.get("ROUTER_LARGE_MODEL", "gemini-2.5-pro"), max_output_tokens=4096),
        judge=ModelRole(provider="gemini", model=os.environ.get("ROUTER_JUDGE_MODEL", "gemini-2.5-pro"), max_output_tokens=2048),
        analyser=ModelRole(provider="gemini", model=os.environ.get("ROUTER_ANALYSER_MODEL", "gemini-2.5-flash"), max_output_tokens=1024),
        concurrency=int(os.environ.get("ROUTER_CONCURRENCY", "16")),
    )


def default_roles() -> LLMRoles:
    profile = os.environ.get(PROFILE_VAR, "offline")
    if profile not in PROFILES:
        raise ValueError(f"{PROFILE_VAR}={profile!r}; expected one of {PROFILES}")
    return gemini_roles() if profile == "gemini" else offline_roles()
