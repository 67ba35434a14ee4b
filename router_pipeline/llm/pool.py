"""The model pool: the models a router chooses among, with their backends and prices.

A pool is configuration (YAML, JSON or a dict), one owner for the models a team can
call: each model has a ``name`` (what routers, budgets, feedback and stats call it), a
``backend`` (``gemini``: google-genai; ``local``: transformers; ``openai``: any
OpenAI-compatible endpoint through the ``openai`` client, e.g. vLLM, Ollama or a hosted
provider), the backend's ``model`` id, and its prices in USD per million input and
output tokens. The two-tier pipeline is the pool of ``medium`` and ``large``.

``pool_for(settings)`` is the pool a run answers, judges and routes with: the file
``ROUTER_PIPELINE_POOL`` names, else the profile's default (offline: three stand-ins on
the Gemma 3 270M of the wheels, priced as Flash-Lite, Flash and Pro; gemini: those three).

    models:
      - {name: flash-lite, backend: gemini, model: gemini-2.5-flash-lite, input_usd_per_mtok: 0.10, output_usd_per_mtok: 0.40}
      - {name: llama-70b, backend: openai, model: meta-llama/Llama-3.1-70B-Instruct,
         base_url: http://vllm:8000/v1, api_key_env: VLLM_KEY, input_usd_per_mtok: 0.88, output_usd_per_mtok: 0.88}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from router_pipeline.llm import PROMPT_STYLES, PROVIDERS, RoleSpec
from router_pipeline.llm.models import FLASH, FLASH_LITE, PRICES_PER_MTOK, PRO, cost_usd

BACKENDS = PROVIDERS  # gemini, local, openai (any OpenAI-compatible endpoint)
PRICE_FIELDS = ("input_usd_per_mtok", "output_usd_per_mtok")


class PoolError(ValueError):
    """A pool configuration the router cannot use, with what is wrong in it."""


@dataclass(frozen=True)
class PoolModel:
    name: str
    backend: str
    model: str
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    base_url: str | None = None  # the openai backend's endpoint (".../v1")
    api_key_env: str | None = None  # the variable holding the openai backend's key (never the key itself)
    max_output_tokens: int = 1024
    prompt_style: str = PROMPT_STYLES[0]  # how the pipeline prompts it for labels (labels.answering)
    private: bool = False  # an endpoint on the operator's own machines: privacy rules may send to it

    @property
    def keeps_private(self) -> bool:
        """A query sent to it stays on the operator's machines (a local model, or a private endpoint)."""
        return self.backend == "local" or self.private

    def role(self) -> RoleSpec:
        """The model as an LLM role of the pipeline (its prices, token budget, prompt style)."""
        return RoleSpec(self.backend, self.model, max_output_tokens=self.max_output_tokens,
                        prompt_style=self.prompt_style, input_price_per_mtok=self.input_usd_per_mtok,
                        output_price_per_mtok=self.output_usd_per_mtok)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return cost_usd(input_tokens, output_tokens, (self.input_usd_per_mtok, self.output_usd_per_mtok))


@dataclass(frozen=True)
class Pool:
    models: tuple[PoolModel, ...]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def __getitem__(self, name: str) -> PoolModel:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model {name!r} in the pool; it has {self.names}")

    def by_price(self) -> list[PoolModel]:
        """Cheapest first (output price, then input price): the order fallbacks go down."""
        return sorted(self.models, key=lambda m: (m.output_usd_per_mtok, m.input_usd_per_mtok))

    def fallbacks(self, chosen: str) -> list[str]:
        """Who answers when ``chosen`` cannot: the cheaper models, dearest first (down the
        pool), then the dearer ones, cheapest first (never more than needed)."""
        names = [m.name for m in self.by_price()]
        i = names.index(chosen)
        return names[:i][::-1] + names[i + 1:]

    def to_dict(self) -> dict:
        return {"models": [{f.name: getattr(m, f.name) for f in fields(PoolModel)} for m in self.models]}


def _model(entry, i: int) -> PoolModel:
    where = f"models[{i}]"
    if not isinstance(entry, dict):
        raise PoolError(f"{where} must be a mapping with name, backend, model and prices, got {entry!r}")
    known = {f.name for f in fields(PoolModel)}
    unknown = set(entry) - known
    if unknown:
        raise PoolError(f"{where}: unknown field(s) {sorted(unknown)}; expected some of {sorted(known)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise PoolError(f"{where}: 'name' must be a non-empty name without surrounding spaces, got {name!r}")
    where = f"models[{i}] ({name})"
    if entry.get("backend") not in BACKENDS:
        raise PoolError(f"{where}: unknown backend {entry.get('backend')!r}; expected one of {', '.join(BACKENDS)}")
    if not isinstance(entry.get("model"), str) or not entry["model"]:
        raise PoolError(f"{where}: 'model' (the backend's model id) is missing")
    for price in PRICE_FIELDS:
        value = entry.get(price)
        if value is None:
            raise PoolError(f"{where}: '{price}' is missing: every model needs its prices (0 for a free one)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise PoolError(f"{where}: '{price}' must be a finite number >= 0, got {value!r}")
    if entry["backend"] == "openai":
        url = entry.get("base_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise PoolError(f"{where}: the openai backend needs 'base_url' (http(s)://host/v1), got {url!r}")
    tokens = entry.get("max_output_tokens", 1024)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise PoolError(f"{where}: 'max_output_tokens' must be a positive integer, got {tokens!r}")
    if not isinstance(entry.get("private", False), bool):
        raise PoolError(f"{where}: 'private' must be true or false (unquoted), got {entry['private']!r}")
    if entry.get("prompt_style", PROMPT_STYLES[0]) not in PROMPT_STYLES:
        raise PoolError(f"{where}: unknown prompt_style {entry['prompt_style']!r}; expected one of {PROMPT_STYLES}")
    return PoolModel(**{k: (float(v) if k in PRICE_FIELDS else v) for k, v in entry.items()})


def pool_from_dict(spec) -> Pool:
    """A validated pool from ``{"models": [...]}`` (or the list itself)."""
    entries = spec.get("models") if isinstance(spec, dict) else spec
    if not isinstance(entries, list) or not entries:
        raise PoolError("a pool needs a non-empty 'models' list")
    models = tuple(_model(e, i) for i, e in enumerate(entries))
    seen = set()
    for m in models:
        if m.name in seen:
            raise PoolError(f"duplicate model name {m.name!r}: each model of the pool needs its own name")
        seen.add(m.name)
    return Pool(models)


def load_pool(path: str | Path) -> Pool:
    """A pool from a YAML or JSON file, or PoolError naming the file and what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PoolError(f"{path}: cannot read the pool file ({exc})") from None
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise PoolError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})") from None
    try:
        return pool_from_dict(spec)
    except PoolError as exc:
        raise PoolError(f"{path}: {exc}") from None


def client_for(model: PoolModel, *, gemini_base_url: str | None = None, timeout_s: float | None = None,
               batch_size: int = 8):
    """The LLM client that calls ``model`` on its backend, priced as the pool says."""
    price = (model.input_usd_per_mtok, model.output_usd_per_mtok)
    if model.backend == "openai":
        from router_pipeline.llm.openai_compat import OpenAIClient

        return OpenAIClient(model.model, base_url=model.base_url, price=price, api_key_env=model.api_key_env,
                            timeout_s=timeout_s)
    from router_pipeline.llm import make_client

    return make_client(model.role(), gemini_base_url=gemini_base_url, timeout_s=timeout_s, batch_size=batch_size)


def _entry(name: str, role: RoleSpec, **changes) -> dict:
    role = replace(role, **changes)
    return {"name": name, "backend": role.provider, "model": role.model, "max_output_tokens": role.max_output_tokens,
            "prompt_style": role.prompt_style, "input_usd_per_mtok": role.price[0],
            "output_usd_per_mtok": role.price[1]}


def gemini_pool() -> Pool:
    """The gemini profile's default pool: Flash-Lite, Flash and Pro at list prices, with
    the medium and large roles' token budgets (Pro thinks within its own)."""
    from router_pipeline.llm.roles import gemini_roles
    from router_pipeline.settings import Settings

    roles = gemini_roles(Settings())
    return pool_from_dict([_entry("flash-lite", roles.medium, model=FLASH_LITE, input_price_per_mtok=None,
                                  output_price_per_mtok=None),
                           _entry("flash", replace(roles.medium, model=FLASH)),
                           _entry("pro", replace(roles.large, model=PRO))])


def offline_pool() -> Pool:
    """The offline profile's pool: the Gemma 3 270M of the wheels three ways, priced as
    Flash-Lite, Flash and Pro so that costs keep their meaning. ``flash`` and ``pro`` are
    the offline medium and large roles (their answers are the ones already recorded, never
    generated twice); ``flash-lite`` is the medium role with half its output tokens."""
    from router_pipeline.llm.roles import offline_roles

    roles = offline_roles()
    lite = PRICES_PER_MTOK[FLASH_LITE]
    return pool_from_dict([_entry("flash-lite", roles.medium, max_output_tokens=roles.medium.max_output_tokens // 2,
                                  input_price_per_mtok=lite[0], output_price_per_mtok=lite[1]),
                           _entry("flash", roles.medium), _entry("pro", roles.large)])


def pool_for(settings) -> Pool:
    """The pool of a run: ``settings.pool_file`` when set, else the profile's default."""
    if settings.pool_file is not None:
        return load_pool(settings.pool_file)
    return gemini_pool() if settings.profile == "gemini" else offline_pool()
