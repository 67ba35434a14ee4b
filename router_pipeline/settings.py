"""The one reader of the environment.

Every environment variable the package honours is read here, when ``load()`` is
called (building the Dagster definitions, starting the CLI), never at import: a test
or a deployment changes a variable and builds again, no module reload. Secrets are
read by the functions at the bottom, at the moment a client needs them, and are
never part of ``Settings`` (so they cannot end up in a repr, a log or metadata).

| variable | setting | default |
|---|---|---|
| ROUTER_PIPELINE_PROFILE | ``profile``: offline (local Gemma tiers) or gemini | offline |
| ROUTER_PIPELINE_ARTIFACTS | ``artifacts_dir``: everything the pipeline writes | ./artifacts |
| ROUTER_PIPELINE_MODELS | ``models_dir``: converted offline models | <artifacts>/models |
| ROUTER_PIPELINE_ALLOW_HUB | ``allow_hub``: 1 lets model names resolve on the HF hub | 0 |
| ROUTER_PIPELINE_POOL | ``pool_file``: the model pool (YAML/JSON, llm/pool.py) | the profile's pool |
| ROUTER_PIPELINE_COUNCIL_DIR | ``council_dir``: the llm-council drop folder | ./council_sessions |
| ROUTER_{MEDIUM,LARGE,JUDGE,ANALYSER}_MODEL | ``gemini_models``: a role's model in the gemini profile | llm.roles.GEMINI_MODELS |
| ROUTER_CONCURRENCY | ``concurrency``: model calls in flight (gemini profile) | 16 |
| GEMINI_BASE_URL | ``gemini_base_url``: a Gemini-protocol endpoint | Google's |
| ROUTER_RETRAIN_CRON | ``retrain_cron`` of the weekly retrain | 0 3 * * 1 |
| ROUTER_RETRAIN_SAMPLE_SIZE | ``retrain_sample_size`` (0 = every question) | 0 |
| ROUTER_RETRAIN_COMPUTE | ``retrain_compute``: modal or local | modal |
| ROUTER_RETRAIN_SOURCES | ``retrain_sources``: comma-separated ``source`` or ``source:path`` | bundled |
| ROUTER_MODAL_HF_SECRET | ``modal_hf_secret``: the Modal Secret holding HF_TOKEN | huggingface |
| ROUTER_MODAL_RUNS_ROOT, ROUTER_MODAL_DATASETS_ROOT | where Modal functions keep runs and datasets | their Volumes |
| GEMINI_API_KEY / GOOGLE_API_KEY | ``gemini_api_key()`` (secret) | |
| MODAL_TOKEN_ID + MODAL_TOKEN_SECRET | ``modal_credentials_present()`` (secret) | ~/.modal.toml |
| the ``keys_env`` of a serving profile | ``secret(var)``: that profile's API keys | |
| ROUTER_ADMIN_KEY | ``secret(var)``: the routing server's admin keys, name=key pairs (/metrics, the admin API) | |
| ROUTER_DATABASE_URL | ``secret(var)``: the routing server's PostgreSQL state database | |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, get_args

from router_pipeline.policies import TIERS


PROFILES = ("offline", "gemini")
SOURCES = ("bundled", "hf", "url", "jsonl", "outcomes", "traffic", "cascade")  # where questions come from (labels.questions)
Compute = Literal["local", "modal"]  # where training and evaluation run (the `compute` resource's choices)
COMPUTES = get_args(Compute)
ROLES = (*TIERS, "judge", "analyser")  # the LLM roles, each with its ROUTER_<ROLE>_MODEL variable
GEMINI_API_KEY_VARS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
DEFAULT_RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00 UTC


class SettingsError(ValueError):
    """An environment variable holds a value the pipeline cannot use."""


@dataclass(frozen=True)
class Settings:
    profile: str = "offline"
    artifacts_dir: Path = Path("artifacts")
    models_dir: Path = Path("artifacts/models")
    allow_hub: bool = False
    council_dir: Path = Path("council_sessions")
    pool_file: Path | None = None  # None: the profile's default pool (llm.pool.pool_for)
    gemini_models: dict[str, str] = field(default_factory=dict)  # role -> model id set in the environment
    concurrency: int = 16
    gemini_base_url: str | None = None
    retrain_cron: str = DEFAULT_RETRAIN_CRON
    retrain_sample_size: int = 0
    retrain_compute: str = "modal"
    retrain_sources: tuple[tuple[str, str | None], ...] = (("bundled", None),)
    modal_hf_secret: str = "huggingface"
    modal_runs_root: str = "/vol/runs"
    modal_datasets_root: str = "/datasets"


def _int(env: Mapping[str, str], var: str, default: int, minimum: int) -> int:
    raw = env.get(var)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{var}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{var}={value} must be at least {minimum}")
    return value


def _choice(env: Mapping[str, str], var: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(var) or default
    if value not in choices:
        raise SettingsError(f"{var}={value!r}; expected one of {', '.join(choices)}")
    return value


def _sources(env: Mapping[str, str], var: str) -> tuple[tuple[str, str | None], ...]:
    """``bundled,traffic:logs/q.jsonl`` -> (("bundled", None), ("traffic", "logs/q.jsonl"))."""
    if not env.get(var):
        return Settings.retrain_sources
    out = []
    for item in env[var].split(","):
        source, _, path = item.strip().partition(":")
        if source not in SOURCES:
            raise SettingsError(f"{var}: unknown source {source!r}; expected {', '.join(SOURCES)} (source or source:path)")
        out.append((source, path or None))
    return tuple(out)


def load(env: Mapping[str, str] | None = None) -> Settings:
    """The settings the environment gives now (``env``: a mapping to read instead); what
    a variable does not set keeps ``Settings``' default."""
    env = os.environ if env is None else env
    d = Settings()
    artifacts = Path(env.get("ROUTER_PIPELINE_ARTIFACTS") or Path.cwd() / d.artifacts_dir).expanduser()
    return Settings(
        profile=_choice(env, "ROUTER_PIPELINE_PROFILE", d.profile, PROFILES),
        artifacts_dir=artifacts,
        models_dir=Path(env.get("ROUTER_PIPELINE_MODELS") or artifacts / d.models_dir.name).expanduser(),
        allow_hub=env.get("ROUTER_PIPELINE_ALLOW_HUB", "0") == "1",
        council_dir=Path(env.get("ROUTER_PIPELINE_COUNCIL_DIR") or Path.cwd() / d.council_dir).expanduser(),
        pool_file=Path(env["ROUTER_PIPELINE_POOL"]).expanduser() if env.get("ROUTER_PIPELINE_POOL") else d.pool_file,
        gemini_models={r: env[f"ROUTER_{r.upper()}_MODEL"] for r in ROLES if env.get(f"ROUTER_{r.upper()}_MODEL")},
        concurrency=_int(env, "ROUTER_CONCURRENCY", d.concurrency, 1),
        gemini_base_url=env.get("GEMINI_BASE_URL") or d.gemini_base_url,
        retrain_cron=env.get("ROUTER_RETRAIN_CRON") or d.retrain_cron,
        retrain_sample_size=_int(env, "ROUTER_RETRAIN_SAMPLE_SIZE", d.retrain_sample_size, 0),
        retrain_compute=_choice(env, "ROUTER_RETRAIN_COMPUTE", d.retrain_compute, COMPUTES),
        retrain_sources=_sources(env, "ROUTER_RETRAIN_SOURCES"),
        modal_hf_secret=env.get("ROUTER_MODAL_HF_SECRET") or d.modal_hf_secret,
        modal_runs_root=env.get("ROUTER_MODAL_RUNS_ROOT") or d.modal_runs_root,
        modal_datasets_root=env.get("ROUTER_MODAL_DATASETS_ROOT") or d.modal_datasets_root,
    )


# -- secrets: read when a client needs them, never stored -----------------------
def gemini_api_key() -> str | None:
    return next((os.environ[v] for v in GEMINI_API_KEY_VARS if os.environ.get(v)), None)


def secret(var: str) -> str | None:
    """A secret another file names by its variable (e.g. a serving profile's API keys)."""
    return os.environ.get(var) or None


def modal_credentials_present() -> bool:
    has_env = os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET")
    return bool(has_env) or (Path.home() / ".modal.toml").exists()
