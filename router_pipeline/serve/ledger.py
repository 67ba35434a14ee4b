"""The budget ledger: money already spent, per period, in a small JSON file.

Spend is money state, so the file must survive a crash and must never be read as
less than it holds:
- updates run under an exclusive lock on a sidecar ``.lock`` file, so concurrent
  processes (CLI calls, workers) add up exactly;
- each update writes a temporary file, fsyncs it and renames it over the ledger: a
  process killed mid-write leaves the previous total, never a truncated file;
- a ledger that cannot be read (empty, not JSON, not UTF-8, a negative or non-finite
  amount) stops spending with an error naming the file (fail closed): it is never
  reset to zero or bypassed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import time
import uuid
from pathlib import Path

PERIODS = ("total", "day", "month")
RESERVATION_TTL_S = 900.0  # a reservation older than this is dropped: its request has ended (or its process died)


class LedgerError(ValueError):
    """The ledger is unreadable or an amount is invalid: spending stops until a person fixes it.
    ``file``: the ledger's file name (what a caller may be told; the message has the path)."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file


def _valid_amount(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


class BudgetLedger:
    def __init__(self, path: str | Path, period: str = "month"):
        if period not in PERIODS:
            raise LedgerError(f"budget period must be one of {PERIODS}, got {period!r}")
        self.path, self.period = Path(path), period

    def key(self, now: dt.datetime | None = None) -> str:
        now = now or dt.datetime.now(dt.timezone.utc)
        return {"total": "total", "day": now.strftime("%Y-%m-%d"), "month": now.strftime("%Y-%m")}[self.period]

    def read(self) -> dict[str, float]:
        """Every period's spend; {} only when the ledger does not exist yet."""
        if not self.path.exists():
            return {}
        where = f"budget ledger {self.path}"
        if self.path.is_dir():
            raise LedgerError(f"{where} is a directory, not a file", self.path.name)
        try:
            text = self.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise LedgerError(f"{where} is not UTF-8 text; spending is stopped until it is restored", self.path.name) from None
        if not text.strip():
            raise LedgerError(f"{where} is empty (cut by a crash or a tool?); spending is stopped until it is "
                              "restored from a backup, or deleted to start again from zero", self.path.name)
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise LedgerError(f"{where} is not valid JSON ({exc}); spending is stopped until it is fixed", self.path.name) from None
        if not isinstance(data, dict):
            raise LedgerError(f"{where} must hold an object of period -> USD, found {type(data).__name__}", self.path.name)
        bad = {k: v for k, v in data.items() if not _valid_amount(v)}
        if bad:
            raise LedgerError(f"{where} holds invalid amounts {bad!r} (expected finite numbers >= 0)", self.path.name)
        return {k: float(v) for k, v in data.items()}

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive lock on the sidecar ``.lock`` file, across processes of this host."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, path: Path, data: dict) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def _update(self, change) -> dict[str, float]:
        with self._locked():
            data = self.read()
            change(data)
            self._write(self.path, data)
            return data

    def spent(self) -> float:
        return self.read().get(self.key(), 0.0)

    def add(self, usd: float) -> float:
        """Record a spend; returns the period's new total."""
        if not _valid_amount(usd):
            raise LedgerError(f"spend must be a finite number >= 0, got {usd!r}")
        key = self.key()

        def bump(data: dict) -> None:
            data[key] = round(data.get(key, 0.0) + float(usd), 10)

        return self._update(bump)[key]

    # -- reservations: a budget check and the spend it allows are one step -----------
    # A request that may spend reserves an upper bound of its cost while it runs, in the
    # same locked step as the check; the check counts spend plus live reservations. So
    # processes charging one budget together exceed it by one request's cost at most.
    @property
    def _reserved_path(self) -> Path:
        return self.path.with_name(self.path.name + ".reserved")

    def _reservations(self) -> dict[str, list]:
        """id -> [usd, period key, unix time], the expired ones dropped."""
        if not self._reserved_path.exists():
            return {}
        try:
            data = json.loads(self._reserved_path.read_text(encoding="utf-8"))
            now = time.time()
            return {k: v for k, v in data.items() if now - float(v[2]) < RESERVATION_TTL_S}
        except (ValueError, TypeError, IndexError, KeyError, AttributeError, UnicodeDecodeError):
            raise LedgerError(f"budget reservations {self._reserved_path} are unreadable; spending is stopped "
                              "until the file is fixed or deleted", self._reserved_path.name) from None

    def committed(self) -> float:
        """This period's spend plus what requests in flight have reserved."""
        key = self.key()
        return self.spent() + sum(float(v[0]) for v in self._reservations().values() if v[1] == key)

    def admit(self, limit_usd: float, estimate_usd: float) -> str | None:
        """Reserve ``estimate_usd`` when the period's committed spend is below the limit;
        the reservation's id, or None (the budget is used up)."""
        key = self.key()
        with self._locked():
            committed = self.read().get(key, 0.0)
            reserved = self._reservations()
            committed += sum(float(v[0]) for v in reserved.values() if v[1] == key)
            if committed >= limit_usd:
                return None
            rid = uuid.uuid4().hex
            reserved[rid] = [float(estimate_usd), key, time.time()]
            self._write(self._reserved_path, reserved)
            return rid

    def settle(self, reservation: str | None, usd: float) -> float:
        """Replace a reservation by the spend it became (None: a spend without one)."""
        if not _valid_amount(usd):
            raise LedgerError(f"spend must be a finite number >= 0, got {usd!r}")
        key = self.key()
        with self._locked():
            data = self.read()
            if reservation is not None:
                reserved = self._reservations()
                if reserved.pop(reservation, None) is not None:
                    self._write(self._reserved_path, reserved)
            data[key] = round(data.get(key, 0.0) + float(usd), 10)
            self._write(self.path, data)
            return data[key]

    def release(self, reservation: str) -> None:
        """Drop a reservation whose request spent nothing (every model failed)."""
        with self._locked():
            reserved = self._reservations()
            if reserved.pop(reservation, None) is not None:
                self._write(self._reserved_path, reserved)


_LEDGER_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spend (ledger TEXT NOT NULL, period TEXT NOT NULL, "
    "usd DOUBLE PRECISION NOT NULL DEFAULT 0, PRIMARY KEY (ledger, period))",
    "CREATE TABLE IF NOT EXISTS reservations (id TEXT PRIMARY KEY, ledger TEXT NOT NULL, period TEXT NOT NULL, "
    "usd DOUBLE PRECISION NOT NULL, at DOUBLE PRECISION NOT NULL)",
)


class DatabaseLedger(BudgetLedger):
    """The same ledger in the server's state database (serve/database.py), for replicas on
    several hosts: spend per (ledger, period) and the live reservations, each check and
    reservation one transaction with the period's row locked. ``name`` is the ledger
    file's name in the mapper config, so profiles that named one file share one budget."""

    def __init__(self, db, name: str, period: str = "month"):
        super().__init__(Path(name), period)
        self.db, self.name = db, name
        for statement in _LEDGER_SCHEMA:
            db.execute(statement)

    def read(self) -> dict[str, float]:
        return {period: float(usd) for period, usd in self.db.execute(
            "SELECT period, usd FROM spend WHERE ledger = ?", (self.name,))}

    def _reserved(self, key: str) -> float:
        rows = self.db.execute("SELECT COALESCE(SUM(usd), 0) FROM reservations WHERE ledger = ? AND period = ? "
                               "AND at > ?", (self.name, key, time.time() - RESERVATION_TTL_S))
        return float(rows[0][0])

    def committed(self) -> float:
        key = self.key()
        return self.read().get(key, 0.0) + self._reserved(key)

    @contextlib.contextmanager
    def _row(self, key: str):
        """The period's spend row, locked until the transaction ends."""
        self.db.execute("INSERT INTO spend (ledger, period, usd) VALUES (?, ?, 0) ON CONFLICT (ledger, period) "
                        "DO NOTHING", (self.name, key))
        with self.db.transaction():
            rows = self.db.execute("SELECT usd FROM spend WHERE ledger = ? AND period = ?"
                                   + (" FOR UPDATE" if self.db.postgres else ""), (self.name, key))
            yield float(rows[0][0])

    def admit(self, limit_usd: float, estimate_usd: float) -> str | None:
        key = self.key()
        with self._row(key) as spent:
            if spent + self._reserved(key) >= limit_usd:
                return None
            rid = uuid.uuid4().hex
            self.db.execute("INSERT INTO reservations (id, ledger, period, usd, at) VALUES (?, ?, ?, ?, ?)",
                            (rid, self.name, key, float(estimate_usd), time.time()))
            return rid

    def settle(self, reservation: str | None, usd: float) -> float:
        if not _valid_amount(usd):
            raise LedgerError(f"spend must be a finite number >= 0, got {usd!r}")
        key = self.key()
        with self._row(key) as spent:
            if reservation is not None:
                self.db.execute("DELETE FROM reservations WHERE id = ?", (reservation,))
            total = round(spent + float(usd), 10)
            self.db.execute("UPDATE spend SET usd = ? WHERE ledger = ? AND period = ?", (total, self.name, key))
            return total

    def add(self, usd: float) -> float:
        return self.settle(None, usd)

    def release(self, reservation: str) -> None:
        self.db.execute("DELETE FROM reservations WHERE id = ?", (reservation,))
