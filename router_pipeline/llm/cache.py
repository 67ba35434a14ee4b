"""Persistent response cache (SQLite), so a re-run or a resumed run never pays twice.

It also holds the in-flight claims: a run claims a prompt's key before paying for it,
so that two runs (two Dagster runs, a run and the CLI) never pay for the same prompt at
the same time; the second waits for the first one's result. A claim whose process is
gone (same host, dead pid) or that is older than CLAIM_TTL_S is stale and taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from router_pipeline.llm.types import CACHEABLE, LLMResult


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        # Two runs opening a new cache at once: switching to WAL takes a lock that the
        # busy timeout does not wait for, so wait here.
        for attempt in range(300):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, result TEXT NOT NULL, "
                    "created TEXT DEFAULT CURRENT_TIMESTAMP)"
                )
                self._db.execute("CREATE TABLE IF NOT EXISTS inflight (key TEXT PRIMARY KEY, owner TEXT NOT NULL, since REAL)")
                self._db.execute("CREATE TABLE IF NOT EXISTS batch_jobs (name TEXT PRIMARY KEY, model TEXT NOT NULL, "
                                 "keys TEXT NOT NULL, created REAL, finished REAL)")
                self._db.commit()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 299:
                    raise
                self._db.rollback()
                time.sleep(0.1)

    def get(self, key: str) -> LLMResult | None:
        with self._lock:
            row = self._db.execute("SELECT result FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        result = LLMResult.from_json(row[0])
        result.cached = True
        result.latency_ms = 0.0
        return result

    def put(self, key: str, result: LLMResult) -> None:
        """Store a settled result at once (errors are not stored: they are retried next run)."""
        if result.status not in CACHEABLE:
            return
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, result) VALUES (?, ?)", (key, result.to_json())
            )
            self._db.commit()

    def claim(self, key: str, owner: str) -> bool:
        """Take the right to pay for ``key``; False while another live run holds it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the check and the insert are one step across processes
            try:
                row = self._db.execute("SELECT owner, since FROM inflight WHERE key = ?", (key,)).fetchone()
                if row is not None and row[0] != owner and not _stale(*row):
                    self._db.rollback()
                    return False
                self._db.execute("INSERT OR REPLACE INTO inflight (key, owner, since) VALUES (?, ?, ?)",
                                 (key, owner, time.time()))
                self._db.commit()
                return True
            except BaseException:
                self._db.rollback()
                raise

    def release(self, key: str, owner: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM inflight WHERE key = ? AND owner = ?", (key, owner))
            self._db.commit()

    # -- batch jobs: a job's name is stored before it is polled, so a run killed while the
    # job is pending resumes it instead of submitting (and paying for) a second one.
    def record_batch(self, name: str, model: str, keys: list[str]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO batch_jobs (name, model, keys, created) VALUES (?, ?, ?, ?)",
                             (name, model, json.dumps(keys), time.time()))
            self._db.commit()

    def open_batches(self, model: str) -> list[tuple[str, list[str]]]:
        """(name, keys) of this model's jobs not yet finished, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT name, keys FROM batch_jobs WHERE model = ? AND finished IS NULL "
                                    "ORDER BY created", (model,)).fetchall()
        return [(name, json.loads(keys)) for name, keys in rows]

    def finish_batch(self, name: str) -> None:
        with self._lock:
            self._db.execute("UPDATE batch_jobs SET finished = ? WHERE name = ?", (time.time(), name))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


CLAIM_TTL_S = 3600.0


def new_owner() -> str:
    """An in-flight claim owner: this host, this process, this run."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _stale(owner: str, since: float | None) -> bool:
    host, pid, _ = (owner.split(":") + ["", "", ""])[:3]
    if since is None or time.time() - since > CLAIM_TTL_S:
        return True
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True  # the claiming process died (killed mid-run): take over
        except PermissionError:
            return False
    return False
