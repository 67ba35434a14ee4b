"""What the server has done, per caller profile: requests, policies, models, spend,
savings against always calling the large model, latency. Served as JSON
(``/v1/stats``) and in Prometheus' text format (``/metrics``).

The counters live in the state database (serve/database.py), so they survive restarts
and add up over the processes (and, on PostgreSQL, the hosts) that share it; latency
percentiles are this process's recent requests."""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from router_pipeline.online_quality import quality

WINDOW = 10_000  # latency samples kept per profile (the most recent)


@dataclass
class _ProfileStats:
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    escalations: int = 0
    router_failures: int = 0  # requests answered without the router's decision (it raised or timed out)
    privacy: Counter = field(default_factory=Counter)  # privacy rule -> requests it kept private
    policies: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)  # every model called, a cascade's steps included
    cascades: int = 0  # requests a cascade answered
    cascade_escalations: int = 0  # ... that called more than its first step
    spend_usd: float = 0.0
    large_equivalent_usd: float = 0.0  # what the same tokens would have cost on the large model
    router_ms: list = field(default_factory=list)
    total_ms: list = field(default_factory=list)


def _percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    a = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}


_SCHEMA = ("CREATE TABLE IF NOT EXISTS stats (profile TEXT NOT NULL, metric TEXT NOT NULL, key TEXT NOT NULL, "
           "value DOUBLE PRECISION NOT NULL, PRIMARY KEY (profile, metric, key))")
_ADD = ("INSERT INTO stats (profile, metric, key, value) VALUES (?, ?, ?, ?) ON CONFLICT (profile, metric, key) "
        "DO UPDATE SET value = stats.value + excluded.value")
COUNTERS = ("requests", "errors", "fallbacks", "escalations", "router_failures", "spend_usd", "large_equivalent_usd",
            "cascades", "cascade_escalations")


class Stats:
    """Counters in the state database; latency windows in this process."""

    def __init__(self, db):
        self._lock = threading.Lock()
        self._latency: dict[str, tuple[deque, deque]] = {}  # profile -> (router_ms, total_ms)
        self.db = db
        db.execute(_SCHEMA)

    def _persist(self, profile: str, increments: list[tuple[str, str, float]]) -> None:
        with self.db.transaction():
            for metric, key, value in increments:
                if value:
                    self.db.execute(_ADD, (profile, metric, key, float(value)))

    def record(self, profile: str, *, policy: str, model: str | None, router_ms: float, total_ms: float,
               cost_usd: float = 0.0, large_equivalent_usd: float = 0.0, fell_back: bool = False,
               escalated: bool = False, privacy_rule: str | None = None, router_failed: bool = False,
               called: tuple[str, ...] | None = None, cascade_escalated: bool | None = None) -> None:
        """``called``: every model the request called (default: the one that answered);
        ``cascade_escalated``: for a cascade's request, whether it went past its first step."""
        with self._lock:
            router, total = self._latency.setdefault(profile, (deque(maxlen=WINDOW), deque(maxlen=WINDOW)))
            router.append(router_ms)
            total.append(total_ms)
        self._persist(profile, [("requests", "", 1), ("policies", policy, 1), ("models", model or "none", 1),
                                ("spend_usd", "", cost_usd), ("large_equivalent_usd", "", large_equivalent_usd),
                                ("fallbacks", "", int(fell_back)), ("escalations", "", int(escalated)),
                                ("router_failures", "", int(router_failed)), ("privacy", privacy_rule or "", 1 if privacy_rule else 0),
                                *(("calls", m, 1) for m in (called if called is not None else [model] if model else [])),
                                ("cascades", "", int(cascade_escalated is not None)),
                                ("cascade_escalations", "", int(bool(cascade_escalated)))])

    def record_error(self, profile: str, privacy_rule: str | None = None) -> None:
        self._persist(profile, [("errors", "", 1), ("privacy", privacy_rule or "", 1 if privacy_rule else 0)])

    def _counters(self) -> dict[str, _ProfileStats]:
        """Profile -> counters from the database (every process that shares it), with this
        process's latency windows."""
        out: dict[str, _ProfileStats] = {}
        for profile, metric, key, value in self.db.execute("SELECT profile, metric, key, value FROM stats"):
            p = out.setdefault(profile, _ProfileStats())
            if metric in ("policies", "models", "privacy", "calls"):
                getattr(p, metric)[key] = int(value)
            elif metric in COUNTERS:
                setattr(p, metric, value if metric.endswith("usd") else int(value))
        with self._lock:
            for name, (router, total) in self._latency.items():
                p = out.setdefault(name, _ProfileStats())
                p.router_ms, p.total_ms = list(router), list(total)
        return out

    def snapshot(self) -> dict:
        out = {}
        graded = quality(self.db)  # feedback accuracy per model, policy and experiment arm
        for name, p in self._counters().items():
            saved = p.large_equivalent_usd - p.spend_usd
            out[name] = {
                "requests": p.requests, "errors": p.errors, "fallbacks": p.fallbacks,
                "escalations": p.escalations, "router_failures": p.router_failures,
                "privacy_rules": dict(p.privacy), "policies": dict(p.policies), "models": dict(p.models),
                "calls": dict(p.calls),
                "cascade": {"requests": p.cascades, "escalated": p.cascade_escalations,
                            "escalated_share": round(p.cascade_escalations / p.cascades, 4) if p.cascades else None},
                "spend_usd": round(p.spend_usd, 8),
                "always_large_usd": round(p.large_equivalent_usd, 8),
                "savings_usd": round(saved, 8),
                "savings_share": round(saved / p.large_equivalent_usd, 4) if p.large_equivalent_usd else None,
                "router_latency_ms": _percentiles(p.router_ms),
                "total_latency_ms": _percentiles(p.total_ms),
                "quality": graded.get(name, {"models": {}, "policies": {}, "experiments": {}}),
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
        metric("router_model_calls_total", "counter", "Models called, every step of a cascade included.",
               [({"profile": n, "model": m}, c) for n, s in snap.items() for m, c in s["calls"].items()])
        metric("router_cascade_escalations_total", "counter", "Cascaded requests that went past their first step.",
               [({"profile": n}, s["cascade"]["escalated"]) for n, s in snap.items()])
        metric("router_errors_total", "counter", "Requests that failed.",
               [({"profile": n}, s["errors"]) for n, s in snap.items()])
        metric("router_fallbacks_total", "counter", "Requests served by a fallback target.",
               [({"profile": n}, s["fallbacks"]) for n, s in snap.items()])
        metric("router_escalations_total", "counter", "Requests escalated to the council.",
               [({"profile": n}, s["escalations"]) for n, s in snap.items()])
        metric("router_failures_total", "counter", "Requests answered without the router (it raised or timed out).",
               [({"profile": n}, s["router_failures"]) for n, s in snap.items()])
        metric("router_privacy_rule_activations_total", "counter", "Requests a privacy rule kept on its models.",
               [({"profile": n, "rule": r}, c) for n, s in snap.items() for r, c in s["privacy_rules"].items()])
        metric("router_spend_usd_total", "counter", "Model spend in USD.",
               [({"profile": n}, s["spend_usd"]) for n, s in snap.items()])
        metric("router_savings_usd_total", "counter", "Spend avoided against always calling the large model.",
               [({"profile": n}, s["savings_usd"]) for n, s in snap.items()])
        accuracy = [(n, facet, key, f) for n, s in snap.items() for facet in ("models", "policies")
                    for key, f in s["quality"][facet].items()]
        accuracy += [(n, "arms", f"{e}/{arm}", f) for n, s in snap.items()
                     for e, ex in s["quality"]["experiments"].items() for arm, f in ex["arms"].items()]
        metric("router_feedback_graded_total", "counter", "Requests whose answering model feedback graded.",
               [({"profile": n, "facet": facet, "name": key}, f["graded"]) for n, facet, key, f in accuracy])
        metric("router_feedback_accuracy", "gauge", "Share of graded answers that were Correct, with its 95% "
               "Wilson interval (bound: estimate, lo95, hi95).",
               [({"profile": n, "facet": facet, "name": key, "bound": bound}, value)
                for n, facet, key, f in accuracy if f["graded"]
                for bound, value in zip(("estimate", "lo95", "hi95"), (f["accuracy"], *f["accuracy_95"]))])
        metric("router_overhead_ms", "summary", "Router decision latency (queueing + forward pass).",
               [({"profile": n, "quantile": q}, v) for n, s in snap.items()
                for q, v in (("0.5", s["router_latency_ms"]["p50"]), ("0.95", s["router_latency_ms"]["p95"]),
                             ("0.99", s["router_latency_ms"]["p99"])) if v is not None])
        return "\n".join(lines) + "\n"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
