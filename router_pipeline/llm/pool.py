"""The model pool: the models a router chooses among, with their backends and prices.

A pool is configuration (YAML, JSON or a dict), one owner for the models a team can
call: each model has a ``name`` (what routers, budgets, feedback and stats call it), a
``backend`` (``gemini``: google-genai; ``local``: transformers; ``openai``: any
OpenAI-compatible endpoint through the ``openai`` client, e.g. vLLM, Ollama or a hosted
provider), the backend's ``model`` id, and its prices in USD per million input and
output tokens. The two-tier pipeline is the pool of ``medium`` and ``large``.

    models:
      - {name: flash-lite, backend: gemini, model: gemini-2.5-flash-lite, input_usd_per_mtok: 0.10, output_usd_per_mtok: 0.40}
      - {name: llama-70b, backend: openai, model: meta-llama/Llama-3.1-70B-Instruct,
         base_url: http://vllm:8000/v1, api_key_env: VLLM_KEY, input_usd_per_mtok: 0.88, output_usd_per_mtok: 0.88}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from router_pipeline.llm.models import FLASH, FLASH_LITE, PRICES_PER_MTOK, PRO, cost_usd

BACKENDS = ("gemini", "local", "openai")
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


def client_for(model: PoolModel, *, gemini_base_url: str | None = None, timeout_s: float | None = None):
    """The LLM client that calls ``model`` on its backend, priced as the pool says."""
    price = (model.input_usd_per_mtok, model.output_usd_per_mtok)
    if model.backend == "openai":
        from router_pipeline.llm.openai_compat import OpenAIClient

        return OpenAIClient(model.model, base_url=model.base_url, price=price, api_key_env=model.api_key_env,
                            timeout_s=timeout_s)
    from router_pipeline.llm import RoleSpec, make_client

    return make_client(RoleSpec(model.backend, model.model, max_output_tokens=model.max_output_tokens,
                                input_price_per_mtok=price[0], output_price_per_mtok=price[1]),
                       gemini_base_url=gemini_base_url, timeout_s=timeout_s)


def gemini_pool() -> Pool:
    """The gemini profile's default pool: Flash-Lite, Flash and Pro at list prices."""
    return pool_from_dict([{"name": name, "backend": "gemini", "model": model,
                            "input_usd_per_mtok": PRICES_PER_MTOK[model][0],
                            "output_usd_per_mtok": PRICES_PER_MTOK[model][1]}
                           for name, model in (("flash-lite", FLASH_LITE), ("flash", FLASH), ("pro", PRO))])
