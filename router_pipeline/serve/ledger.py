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

import datetime as dt
import fcntl
import json
import math
import os
from pathlib import Path

PERIODS = ("total", "day", "month")


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

    def _update(self, change) -> dict[str, float]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            change(data)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(data, indent=2, sort_keys=True))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power cut
            finally:
                os.close(dir_fd)
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
