"""Persistent response cache (SQLite), so a re-run or a resumed run never pays twice."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from router_pipeline.llm.types import CACHEABLE, LLMResult


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, result TEXT NOT NULL, "
            "created TEXT DEFAULT CURRENT_TIMESTAMP)"
        )
        self._db.commit()

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

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()
