"""Feedback on served requests, turned into rows the pipeline's ``outcomes`` source reads,
so that the weekly retrain learns from production traffic.

Every feedback is appended to ``feedback.jsonl`` (with the query's hash, never its
text). A request becomes a row of ``outcomes.jsonl`` (query, medium_grade,
large_grade) once both grades are known and its profile allows storing queries:

- ``preferred_tier: medium`` -> medium Correct, large Correct (the medium model sufficed)
- ``preferred_tier: large``  -> medium Incorrect, large Correct (it needed the large model)
- ``grade`` grades the answer that was served (its tier), or the tier named in
  ``tier``; the row is written when the other tier has a grade too.

Requests are remembered in memory (the most recent ``capacity``), so feedback must
come while the server that served them runs.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from router_pipeline.policies import LABELS
from router_pipeline.serve import decision_log
from router_pipeline.text import query_hash

TIERS = ("medium", "large")
PREFERRED = {"medium": {"medium": "Correct", "large": "Correct"}, "large": {"medium": "Incorrect", "large": "Correct"}}


class FeedbackError(ValueError):
    pass


class UnknownRequest(KeyError):
    pass


@dataclass
class ServedRequest:
    request_id: str
    profile: str
    query: str
    tier: str | None  # medium / large when one of them answered
    store_query: bool
    grades: dict[str, str] = field(default_factory=dict)
    written: bool = False


class FeedbackStore:
    def __init__(self, folder: str | Path, capacity: int = 100_000):
        self.folder, self.capacity = Path(folder), capacity
        self.outcomes_path = self.folder / "outcomes.jsonl"
        self.log_path = self.folder / "feedback.jsonl"
        self._requests: OrderedDict[str, ServedRequest] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, request: ServedRequest) -> None:
        with self._lock:
            self._requests[request.request_id] = request
            while len(self._requests) > self.capacity:
                self._requests.popitem(last=False)

    def add(self, request_id: str, *, grade: str | None = None, tier: str | None = None,
            preferred_tier: str | None = None, profile: str) -> dict:
        """Record one feedback; returns what was stored (and whether an outcomes row was written)."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.profile != profile:  # a caller sees its own requests only
                raise UnknownRequest(request_id)
            if (grade is None) == (preferred_tier is None):
                raise FeedbackError("give exactly one of 'grade' (with an optional 'tier') or 'preferred_tier'")
            if preferred_tier is not None:
                if preferred_tier not in TIERS:
                    raise FeedbackError(f"preferred_tier must be one of {TIERS}, got {preferred_tier!r}")
                req.grades.update(PREFERRED[preferred_tier])
            else:
                if grade not in LABELS:
                    raise FeedbackError(f"grade must be one of {LABELS}, got {grade!r}")
                tier = tier or req.tier
                if tier not in TIERS:
                    raise FeedbackError(f"this request was not answered by medium or large ({req.tier}); "
                                        f"name the graded tier with 'tier' ({' or '.join(TIERS)})")
                req.grades[tier] = grade
            now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
            decision_log.append(self.log_path, {"timestamp": now, "request_id": request_id, "profile": profile,
                                                "query_hash": query_hash(req.query), "grade": grade, "tier": tier,
                                                "preferred_tier": preferred_tier})
            row = None
            if req.store_query and not req.written and all(t in req.grades for t in TIERS):
                row = {"query": req.query, "medium_grade": req.grades["medium"], "large_grade": req.grades["large"],
                       "request_id": request_id, "profile": profile, "timestamp": now}
                decision_log.append(self.outcomes_path, row)
                req.written = True
            return {"request_id": request_id, "grades": dict(req.grades), "outcome_row": row is not None,
                    "query_stored": req.store_query}
