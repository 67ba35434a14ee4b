"""The budget ledger: money already spent, per budget and period, in the routing server's
state database (serve/database.py: SQLite in the feedback folder by default, PostgreSQL
with --database), with the reservations of requests in flight.

Spend is money state: a budget check and the reservation it allows are one transaction
with the period's row locked, so processes (and, on PostgreSQL, hosts) charging one budget
together exceed it by one request's cost at most; a database that cannot be read stops
spending with an error naming the budget (fail closed), never a reset to zero.

A budget named ``*.json`` may be a ledger file written by an older version: its spend is
taken into the database once, before the budget is first used; an unreadable one stops
spending until a person fixes or deletes it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import time
import uuid
from pathlib import Path

from router_pipeline.serve.database import Database, DatabaseError

PERIODS = ("total", "day", "month")
RESERVATION_TTL_S = 900.0  # a reservation older than this is dropped: its request has ended (or its process died)


class LedgerError(ValueError):
    """The ledger is unreadable or an amount is invalid: spending stops until a person fixes it.
    ``file``: the budget's name (what a caller may be told; the message may hold a path)."""

    def __init__(self, message: str, file: str | None = None, database: bool = False, transient: bool = False):
        super().__init__(message)
        self.file = file
        self.database = database  # the state database failed, not the ledger's content
        self.transient = transient  # ... in a way that may pass by itself (DatabaseError.transient)


def _valid_amount(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def read_json_ledger(path: Path) -> dict[str, float]:
    """An older version's ledger file (period -> USD), checked strictly: {} when absent."""
    if not path.exists():
        return {}
    where = f"budget ledger {path}"
    if path.is_dir():
        raise LedgerError(f"{where} is a directory, not a file", path.name)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise LedgerError(f"{where} is not UTF-8 text; spending is stopped until it is restored", path.name) from None
    if not text.strip():
        raise LedgerError(f"{where} is empty (cut by a crash or a tool?); spending is stopped until it is "
                          "restored from a backup, or deleted to start again from zero", path.name)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LedgerError(f"{where} is not valid JSON ({exc}); spending is stopped until it is fixed", path.name) from None
    if not isinstance(data, dict):
        raise LedgerError(f"{where} must hold an object of period -> USD, found {type(data).__name__}", path.name)
    bad = {k: v for k, v in data.items() if not _valid_amount(v)}
    if bad:
        raise LedgerError(f"{where} holds invalid amounts {bad!r} (expected finite numbers >= 0)", path.name)
    return {k: float(v) for k, v in data.items()}


_LEDGER_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spend (ledger TEXT NOT NULL, period TEXT NOT NULL, "
    "usd DOUBLE PRECISION NOT NULL DEFAULT 0, PRIMARY KEY (ledger, period))",
    "CREATE TABLE IF NOT EXISTS reservations (id TEXT PRIMARY KEY, ledger TEXT NOT NULL, period TEXT NOT NULL, "
    "usd DOUBLE PRECISION NOT NULL, at DOUBLE PRECISION NOT NULL)",
)


class BudgetLedger:
    """One budget: ``name`` is the mapper config's ``budget.ledger``, so profiles that name
    one budget share it. ``legacy``: an older version's ledger file to take over. Usable
    once ``bind`` gave it the state database."""

    def __init__(self, name: str, period: str = "month", legacy: Path | None = None):
        if period not in PERIODS:
            raise LedgerError(f"budget period must be one of {PERIODS}, got {period!r}")
        self.name, self.period, self.legacy = name, period, legacy
        self.db: Database | None = None
        self._adopted = legacy is None
        self.parts: dict[str, BudgetLedger] = {}

    def bind(self, db: Database) -> "BudgetLedger":
        with self._guard():
            for statement in _LEDGER_SCHEMA:
                db.execute(statement)
        self.db = db
        for part in self.parts.values():
            part.db = db
        return self

    def part(self, model: str) -> "BudgetLedger":
        """The spend on one model under this budget (``<name>/<model>``: its own rows, the
        same period and database), for a per-model limit."""
        if model not in self.parts:
            self.parts[model] = BudgetLedger(f"{self.name}/{model}", self.period)
            self.parts[model].db = self.db
        return self.parts[model]

    def key(self, now: dt.datetime | None = None) -> str:
        now = now or dt.datetime.now(dt.timezone.utc)
        return {"total": "total", "day": now.strftime("%Y-%m-%d"), "month": now.strftime("%Y-%m")}[self.period]

    @contextlib.contextmanager
    def _guard(self):
        """Database failures as LedgerError: the request is refused, nothing is spent."""
        try:
            yield
        except DatabaseError as exc:
            raise LedgerError(f"budget ledger {self.name}: {exc}; spending is stopped", self.name, database=True,
                              transient=exc.transient) from None

    def _adopt(self) -> None:
        """Take an older version's ledger file into the database, once (no spend rows yet)."""
        if self._adopted:
            return
        data = read_json_ledger(self.legacy)
        with self.db.transaction():
            if data and not self.db.execute("SELECT 1 FROM spend WHERE ledger = ?", (self.name,)):
                for period, usd in data.items():
                    self.db.execute("INSERT INTO spend (ledger, period, usd) VALUES (?, ?, ?)", (self.name, period, usd))
        self._adopted = True

    @contextlib.contextmanager
    def _ready(self):
        """Bound, the older ledger file taken over, database failures as LedgerError."""
        if self.db is None:
            raise RuntimeError(f"budget ledger {self.name} is not bound to a state database")
        with self._guard():
            self._adopt()
            yield

    def _spent(self, key: str) -> float:
        rows = self.db.execute("SELECT usd FROM spend WHERE ledger = ? AND period = ?", (self.name, key))
        return float(rows[0][0]) if rows else 0.0

    def spent(self) -> float:
        """This period's spend."""
        with self._ready():
            return self._spent(self.key())

    def _reserved(self, key: str) -> float:
        rows = self.db.execute("SELECT COALESCE(SUM(usd), 0) FROM reservations WHERE ledger = ? AND period = ? "
                               "AND at > ?", (self.name, key, time.time() - RESERVATION_TTL_S))
        return float(rows[0][0])

    def committed(self) -> float:
        """This period's spend plus what requests in flight have reserved."""
        key = self.key()
        with self._ready():
            return self._spent(key) + self._reserved(key)

    def headroom(self, limit_usd: float | None) -> dict:
        """This period's limit, spend, reservations in flight and what is left: what a
        caller reads in /v1/stats (one read: the same period for every figure)."""
        key = self.key()
        with self._ready():
            spent, reserved = self._spent(key), self._reserved(key)
        return {"period": key, "limit_usd": limit_usd, "spent_usd": round(spent, 8), "reserved_usd": round(reserved, 8),
                "left_usd": None if limit_usd is None else round(max(0.0, limit_usd - spent - reserved), 8)}

    @contextlib.contextmanager
    def _row(self, key: str):
        """The period's spend row, locked until the transaction ends."""
        with self._ready(), self.db.transaction():
            yield _locked_spend(self.db, self.name, key)

    def admit(self, limit_usd: float, estimate_usd: float) -> str | None:
        """Reserve ``estimate_usd`` when the period's committed spend is below the limit;
        the reservation's id, or None (the budget is used up)."""
        key = self.key()
        with self._row(key) as spent:
            if spent + self._reserved(key) >= limit_usd:
                return None
            rid = uuid.uuid4().hex
            self.db.execute("INSERT INTO reservations (id, ledger, period, usd, at) VALUES (?, ?, ?, ?, ?)",
                            (rid, self.name, key, float(estimate_usd), time.time()))
            return rid

    def settle(self, reservation: str | None, usd: float) -> float:
        """Replace a reservation by the spend it became (None: a spend without one)."""
        if not _valid_amount(usd):
            raise LedgerError(f"spend must be a finite number >= 0, got {usd!r}")
        with self._ready(), self.db.transaction():
            return apply_spend(self.db, self.name, self.key(), usd, reservation)

    def settlement(self, reservation: str | None, usd: float) -> dict:
        """What ``settle`` writes, as a journal entry (serve/journal.py) for when it cannot."""
        return {"ledger": self.name, "period": self.key(), "usd": float(usd), "reservation": reservation}

    def release(self, reservation: str) -> None:
        """Drop a reservation whose request spent nothing (every model failed)."""
        with self._ready():
            self.db.execute("DELETE FROM reservations WHERE id = ?", (reservation,))


def _locked_spend(db: Database, ledger: str, key: str) -> float:
    """The period's spend, its row locked until the caller's transaction ends."""
    db.execute("INSERT INTO spend (ledger, period, usd) VALUES (?, ?, 0) ON CONFLICT (ledger, period) DO NOTHING",
               (ledger, key))
    rows = db.execute("SELECT usd FROM spend WHERE ledger = ? AND period = ?" + (" FOR UPDATE" if db.postgres else ""),
                      (ledger, key))
    return float(rows[0][0])


def replay_spend(db: Database, spend: dict) -> bool:
    """A journaled spend (``BudgetLedger.settlement``) written inside the caller's
    transaction, unless its reservation is gone: the settle that journaled it had landed
    after all (its acknowledgement was lost), and adding it again would charge twice.
    Whether it was written."""
    rid = spend["reservation"]
    if rid is not None and not db.execute("SELECT 1 FROM reservations WHERE id = ?", (rid,)):
        return False
    apply_spend(db, spend["ledger"], spend["period"], spend["usd"], rid)
    return True


def apply_spend(db: Database, ledger: str, key: str, usd: float, reservation: str | None) -> float:
    """Add ``usd`` to the period's spend in place of ``reservation``, inside the caller's
    transaction (a settle now, or a journal entry replayed later); the new total."""
    spent = _locked_spend(db, ledger, key)
    if reservation is not None:
        db.execute("DELETE FROM reservations WHERE id = ?", (reservation,))
    total = round(spent + float(usd), 10)
    db.execute("UPDATE spend SET usd = ? WHERE ledger = ? AND period = ?", (total, ledger, key))
    return total
