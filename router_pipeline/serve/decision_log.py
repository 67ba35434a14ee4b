"""One JSON line per routing decision, for audits and for re-labelling later.

The query itself is not logged (it may hold personal data): its normalised hash
joins a line to the training data.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
from pathlib import Path

from router_pipeline.text import query_hash


def decision_record(decision, mapping, *, latency_ms: float, cost_usd: float = 0.0) -> dict:
    return {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "query_hash": query_hash(decision.query),
        "policy": decision.policy,
        "probabilities": {k: round(v, 6) for k, v in decision.probabilities.items()},
        "parse_ok": decision.parse_ok,
        "fallback_used": decision.fallback_used,
        "model": mapping.model,
        "target": mapping.target,
        "rule": mapping.rule,
        "reasoning": decision.reasoning,
        "latency_ms": round(latency_ms, 2),
        "cost_usd": round(cost_usd, 8),
    }


def append(path: str | Path, record: dict) -> None:
    """Append one line; the lock keeps lines whole when several processes log at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
