"""What the server has done, per caller profile: requests, policies, models, spend,
savings against always calling the large model, latency. Served as JSON
(``/v1/stats``) and in Prometheus' text format (``/metrics``)."""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

WINDOW = 10_000  # latency samples kept per profile (the most recent)


@dataclass
class _ProfileStats:
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    escalations: int = 0
    policies: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    spend_usd: float = 0.0
    large_equivalent_usd: float = 0.0  # what the same tokens would have cost on the large model
    router_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    total_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))


def _percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    a = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}


class Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self._by_profile: dict[str, _ProfileStats] = {}

    def _p(self, profile: str) -> _ProfileStats:
        return self._by_profile.setdefault(profile, _ProfileStats())

    def record(self, profile: str, *, policy: str, model: str | None, router_ms: float, total_ms: float,
               cost_usd: float = 0.0, large_equivalent_usd: float = 0.0, fell_back: bool = False,
               escalated: bool = False) -> None:
        with self._lock:
            p = self._p(profile)
            p.requests += 1
            p.policies[policy] += 1
            p.models[model or "none"] += 1
            p.spend_usd += cost_usd
            p.large_equivalent_usd += large_equivalent_usd
            p.fallbacks += int(fell_back)
            p.escalations += int(escalated)
            p.router_ms.append(router_ms)
            p.total_ms.append(total_ms)

    def record_error(self, profile: str) -> None:
        with self._lock:
            self._p(profile).errors += 1

    def snapshot(self) -> dict:
        with self._lock:
            out = {}
            for name, p in self._by_profile.items():
                saved = p.large_equivalent_usd - p.spend_usd
                out[name] = {
                    "requests": p.requests, "errors": p.errors, "fallbacks": p.fallbacks,
                    "escalations": p.escalations, "policies": dict(p.policies), "models": dict(p.models),
                    "spend_usd": round(p.spend_usd, 8),
                    "always_large_usd": round(p.large_equivalent_usd, 8),
                    "savings_usd": round(saved, 8),
                    "savings_share": round(saved / p.large_equivalent_usd, 4) if p.large_equivalent_usd else None,
                    "router_latency_ms": _percentiles(p.router_ms),
                    "total_latency_ms": _percentiles(p.total_ms),
                }
            return out

    def prometheus(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        snap = self.snapshot()
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{rendered}}} {value}")

        metric("router_requests_total", "counter", "Requests routed.",
               [({"profile": n, "policy": pol}, c) for n, s in snap.items() for pol, c in s["policies"].items()])
        metric("router_model_requests_total", "counter", "Requests by the model that answered.",
               [({"profile": n, "model": m}, c) for n, s in snap.items() for m, c in s["models"].items()])
        metric("router_errors_total", "counter", "Requests that failed.",
               [({"profile": n}, s["errors"]) for n, s in snap.items()])
        metric("router_fallbacks_total", "counter", "Requests served by a fallback target.",
               [({"profile": n}, s["fallbacks"]) for n, s in snap.items()])
        metric("router_escalations_total", "counter", "Requests escalated to the council.",
               [({"profile": n}, s["escalations"]) for n, s in snap.items()])
        metric("router_spend_usd_total", "counter", "Model spend in USD.",
               [({"profile": n}, s["spend_usd"]) for n, s in snap.items()])
        metric("router_savings_usd_total", "counter", "Spend avoided against always calling the large model.",
               [({"profile": n}, s["savings_usd"]) for n, s in snap.items()])
        metric("router_overhead_ms", "summary", "Router decision latency (queueing + forward pass).",
               [({"profile": n, "quantile": q}, v) for n, s in snap.items()
                for q, v in (("0.5", s["router_latency_ms"]["p50"]), ("0.95", s["router_latency_ms"]["p95"]),
                             ("0.99", s["router_latency_ms"]["p99"])) if v is not None])
        return "\n".join(lines) + "\n"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
