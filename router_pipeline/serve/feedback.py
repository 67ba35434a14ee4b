"""Feedback on served requests, turned into rows the pipeline's ``outcomes`` source reads,
so that the weekly retrain learns from production traffic.

Every feedback is recorded (with the query's hash, never its text). A request becomes an
outcomes row (query, medium_grade, large_grade) once both grades are known and its
profile allows storing queries:

- ``preferred_tier: medium`` -> medium Correct, large Correct (the medium model sufficed)
- ``preferred_tier: large``  -> medium Incorrect, large Correct (it needed the large model)
- ``grade`` grades the answer that was served (its tier), or the tier named in
  ``tier``; the row is written when the other tier has a grade too.

Feedback for a grade a tier already has, with another grade, is a conflict: refused,
and the stored grades (and the outcomes row) stay as they were.

All of it is in the state database (serve/database.py: SQLite, ``requests.sqlite`` in
the feedback folder, or PostgreSQL), one transaction per feedback: the most recent
``capacity`` served requests, the feedback and the outcomes rows. Feedback for a request
served before a restart or a crash, or by another server process (another host, with
PostgreSQL), still lands. A query's text is stored only for profiles that allow it (its
hash otherwise). The pipeline's ``outcomes`` source reads the SQLite file directly, or
the JSONL that ``export_outcomes`` writes (``router-pipeline export-outcomes``).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

from router_pipeline.artifacts import OUTCOME_FIELDS, OUTCOMES_QUERY
from router_pipeline.policies import GRADES, TIERS
from router_pipeline.serve.config import DEFAULTS
from router_pipeline.serve.database import Database, state_database
from router_pipeline.serve.experiments import SCHEMA as SERVED_SCHEMA
from router_pipeline.text import query_hash

PREFERRED = {"medium": {"medium": "Correct", "large": "Correct"}, "large": {"medium": "Incorrect", "large": "Correct"}}
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, profile TEXT NOT NULL, query TEXT, query_hash TEXT NOT NULL, tier TEXT,
    store_query INTEGER NOT NULL, grades TEXT NOT NULL DEFAULT '{}', written INTEGER NOT NULL DEFAULT 0,
    served_at BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS feedback (
    timestamp TEXT NOT NULL, request_id TEXT NOT NULL, profile TEXT NOT NULL, query_hash TEXT NOT NULL,
    grade TEXT, tier TEXT, preferred_tier TEXT)""",
    """CREATE TABLE IF NOT EXISTS outcomes (
    query TEXT NOT NULL, medium_grade TEXT NOT NULL, large_grade TEXT NOT NULL, request_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL, timestamp TEXT NOT NULL)""",
    # What a cascade's models answered for a request (its profile storing queries): pool outcomes rows
    # without grades, whose agreement is a label no judge was paid for.
    """CREATE TABLE IF NOT EXISTS cascade_outcomes (
    request_id TEXT PRIMARY KEY, profile TEXT NOT NULL, query TEXT NOT NULL, answers TEXT NOT NULL,
    costs TEXT NOT NULL, agreed TEXT, timestamp TEXT NOT NULL)""",
)


class FeedbackError(ValueError):
    pass


class FeedbackConflict(FeedbackError):
    """The feedback contradicts a grade the request already has."""


class UnknownRequest(KeyError):
    pass


@dataclass
class ServedRequest:
    request_id: str
    profile: str
    query: str
    tier: str | None  # medium / large when one of them answered
    store_query: bool


class FeedbackStore:
    """``database``: None for SQLite in the feedback folder (requests.sqlite), or a
    postgresql:// URL shared by several server hosts."""

    def __init__(self, folder: str | Path, capacity: int = 100_000, database: str | None = None,
                 timeout_s: float = DEFAULTS.database_timeout_s, tiers: tuple[str, ...] = TIERS):
        """``tiers``: the models a grade may name (a pool router's pool; medium and large by
        default). An outcomes row is written once medium and large are both graded."""
        self.folder, self.capacity, self.tiers = Path(folder), capacity, tuple(tiers)
        self._db = state_database(self.folder, database, timeout_s)
        self._inserted = 0
        for statement in (*_SCHEMA, *SERVED_SCHEMA):
            self._db.execute(statement)

    @property
    def db(self) -> Database:
        """The state database (shared with the stats counters)."""
        return self._db

    def close(self) -> None:
        self._db.close()  # opened again on next use (a server that stops and starts with the same state)

    def remember(self, request: ServedRequest) -> None:
        self._db.execute(
            "INSERT INTO requests (request_id, profile, query, query_hash, tier, store_query, served_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
            (request.request_id, request.profile, request.query if request.store_query else None,
             query_hash(request.query), request.tier, int(request.store_query), time.time_ns()))
        self._inserted += 1
        if self._inserted % 1000 == 0:  # keep the most recent `capacity`
            self._db.execute("DELETE FROM requests WHERE served_at < (SELECT served_at FROM requests "
                             "ORDER BY served_at DESC LIMIT 1 OFFSET ?)", (self.capacity,))

    def add(self, request_id: str, *, grade: str | None = None, tier: str | None = None,
            preferred_tier: str | None = None, profile: str) -> dict:
        """Record one feedback; returns what was stored (and whether an outcomes row was written)."""
        if (grade is None) == (preferred_tier is None):
            raise FeedbackError("give exactly one of 'grade' (with an optional 'tier') or 'preferred_tier'")
        if preferred_tier is not None and preferred_tier not in TIERS:
            raise FeedbackError(f"preferred_tier must be one of {TIERS}")
        if grade is not None and grade not in GRADES:
            raise FeedbackError(f"grade must be one of {GRADES}")
        with self._db.transaction():  # one writer across processes and hosts from read to update
            return self._add(request_id, grade, tier, preferred_tier, profile)

    def _add(self, request_id, grade, tier, preferred_tier, profile) -> dict:
        rows = self._db.execute("SELECT profile, query, query_hash, tier, store_query, grades, written FROM requests "
                                "WHERE request_id = ?" + (" FOR UPDATE" if self._db.postgres else ""), (request_id,))
        row = rows[0] if rows else None
        if row is None or row[0] != profile:  # a caller sees its own requests only
            raise UnknownRequest(request_id)
        _, query, qhash, served_tier, store_query, grades_json, written = row
        grades = json.loads(grades_json)
        if preferred_tier is not None:
            new = PREFERRED[preferred_tier]
        else:
            tier = tier or served_tier
            if tier not in self.tiers:
                raise FeedbackError(f"{tier!r} is not a model of this server's pool {list(self.tiers)}" if tier else
                                    f"this request was not answered by a model of {list(self.tiers)}; name the "
                                    f"graded model with 'tier' (or 'model')")
            new = {tier: grade}
        clash = {t: (grades[t], g) for t, g in new.items() if t in grades and grades[t] != g}
        if clash:
            raise FeedbackConflict("this feedback contradicts the grades already given ("
                                   + ", ".join(f"{t}: {old}, now {g}" for t, (old, g) in clash.items())
                                   + "); grades are final once given")
        grades.update(new)
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        self._db.execute("INSERT INTO feedback (timestamp, request_id, profile, query_hash, grade, tier, "
                         "preferred_tier) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (now, request_id, profile, qhash, grade, tier, preferred_tier))
        outcome = None
        if store_query and not written and all(t in grades for t in TIERS):
            outcome = (query, grades["medium"], grades["large"], request_id, profile, now)
            self._db.execute(f"INSERT INTO outcomes ({', '.join(OUTCOME_FIELDS)}) VALUES (?, ?, ?, ?, ?, ?)", outcome)
            written = 1
        self._db.execute("UPDATE requests SET grades = ?, written = ? WHERE request_id = ?",
                         (json.dumps(grades), int(written), request_id))
        return {"request_id": request_id, "grades": grades, "outcome_row": outcome is not None,
                "query_stored": bool(store_query)}


def record_cascade(db: Database, request_id: str, profile: str, query: str, answers: dict[str, str | None],
                   costs: dict[str, float], agreed: str | None) -> None:
    """A cascaded request's answers (model -> answer, None when it gave none), what each
    call cost and the answer two or more of them agreed on (None: none did)."""
    db.execute("INSERT INTO cascade_outcomes (request_id, profile, query, answers, costs, agreed, timestamp) "
               "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
               (request_id, profile, query, json.dumps(answers, ensure_ascii=False), json.dumps(costs), agreed,
                dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")))


def cascade_rows(db: Database) -> list[dict]:
    """The cascades' rows, oldest first, in the pool outcomes' columns: query,
    ``<model>_answer`` and ``<model>_cost_usd`` for every model called, ``agreed``."""
    rows = db.execute("SELECT request_id, profile, query, answers, costs, agreed, timestamp FROM cascade_outcomes "
                      "ORDER BY timestamp, request_id")
    return [{"query": query, **{f"{m}_answer": a for m, a in json.loads(answers).items()},
             **{f"{m}_cost_usd": c for m, c in json.loads(costs).items()}, "agreed": agreed,
             "request_id": rid, "profile": profile, "timestamp": ts}
            for rid, profile, query, answers, costs, agreed, ts in rows]


def outcome_rows(db: Database) -> list[dict]:
    """Every outcomes row, oldest first."""
    rows = db.execute(OUTCOMES_QUERY)
    return [dict(zip(OUTCOME_FIELDS, row)) for row in rows]


def export_outcomes(db: Database, path: str | Path, rows: list[dict] | None = None) -> int:
    """The outcomes rows (default: the graded two-tier rows, what the ``outcomes`` source
    reads) as JSONL, written whole or not at all; the number of rows."""
    path = Path(path)
    rows = outcome_rows(db) if rows is None else rows
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return len(rows)
