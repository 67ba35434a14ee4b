"""Requests that carry an ``Idempotency-Key``: a retry with the same key (per profile)
within the window gets the answer recorded for the first, instead of paying again.

A key is claimed before anything is reserved or called (one transaction, the row locked,
so two retries racing through two replicas claim it once); the answer is recorded when
the request is settled (or journaled with its spend when the state database fails then:
serve/journal.py), and a claim whose request failed is dropped so that a retry may try
again. A claim still unanswered is a request in flight: a retry is told to wait; after
``RESERVATION_TTL_S`` (its process died) it may be claimed again. Each claim names its
owner (one attempt), so that an attempt drops only its own claim: one whose commit may
have landed although the database failed is dropped later from the journal, never a
newer attempt's.
"""

from __future__ import annotations

import hashlib
import json
import time

from router_pipeline.serve.database import Database, DatabaseError
from router_pipeline.serve.ledger import RESERVATION_TTL_S

MAX_KEY_CHARS = 255
_SCHEMA = ("CREATE TABLE IF NOT EXISTS idempotency (profile TEXT NOT NULL, key TEXT NOT NULL, "
           "fingerprint TEXT NOT NULL, response TEXT, at DOUBLE PRECISION NOT NULL, owner TEXT, PRIMARY KEY (profile, key))")
_WRITE = ("INSERT INTO idempotency (profile, key, fingerprint, response, at) VALUES (?, ?, ?, ?, ?) "
          "ON CONFLICT (profile, key) DO UPDATE SET response = excluded.response")


class KeyReused(ValueError):
    """The key was used for a different request."""


class InProgress(RuntimeError):
    """The request first sent with this key is still being answered."""


def check_key(key: str) -> str | None:
    """Why ``key`` is not a usable Idempotency-Key (None: it is)."""
    if not 1 <= len(key) <= MAX_KEY_CHARS or not all(33 <= ord(c) <= 126 for c in key):
        return f"must be 1 to {MAX_KEY_CHARS} printable ASCII characters without spaces"
    return None


def fingerprint(body) -> str:
    """What makes two requests the same request (a pydantic body)."""
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, db: Database, window_s: float):
        self.db, self.window_s = db, window_s
        self._claims = 0
        db.execute(_SCHEMA)
        try:  # a table made before claims had owners
            db.execute("SELECT owner FROM idempotency WHERE 1 = 0")
        except DatabaseError:
            db.execute("ALTER TABLE idempotency ADD COLUMN owner TEXT")

    def claim(self, profile: str, key: str, print_: str, owner: str) -> dict | None:
        """The answer recorded for ``(profile, key)``, or None once the key is claimed for
        this request (its attempt ``owner``). KeyReused, InProgress, or DatabaseError."""
        now = time.time()
        with self.db.transaction():
            rows = self.db.execute("SELECT fingerprint, response, at FROM idempotency WHERE profile = ? AND key = ?"
                                   + (" FOR UPDATE" if self.db.postgres else ""), (profile, key))
            if rows and rows[0][2] > now - self.window_s:
                seen, response, at = rows[0]
                if seen != print_:
                    raise KeyReused("this Idempotency-Key was used for a different request")
                if response is not None:
                    return json.loads(response)
                if at > now - RESERVATION_TTL_S:
                    raise InProgress("the request first sent with this Idempotency-Key is still being answered")
            self.db.execute("INSERT INTO idempotency (profile, key, fingerprint, response, at, owner) "
                            "VALUES (?, ?, ?, NULL, ?, ?) ON CONFLICT (profile, key) DO UPDATE SET "
                            "fingerprint = excluded.fingerprint, response = NULL, at = excluded.at, owner = excluded.owner",
                            (profile, key, print_, now, owner))
        self._claims += 1
        if self._claims % 1000 == 0:  # keys older than the window are forgotten
            self.db.execute("DELETE FROM idempotency WHERE at < ?", (now - self.window_s,))
        return None

    @staticmethod
    def forget(db: Database, profile: str, key: str, owner: str | None) -> None:
        """Drop the unanswered claim of attempt ``owner`` (its request failed: nothing was
        paid); ``owner`` None (a journal written before claims had owners): any one."""
        db.execute("DELETE FROM idempotency WHERE profile = ? AND key = ? AND response IS NULL"
                   + ("" if owner is None else " AND owner = ?"), (profile, key) + (() if owner is None else (owner,)))

    def release(self, claim: dict) -> None:
        self.forget(self.db, claim["profile"], claim["key"], claim["owner"])

    @staticmethod
    def write(db: Database, record: dict) -> None:
        """Record an answer: ``record`` holds profile, key, fingerprint and the answer."""
        db.execute(_WRITE, (record["profile"], record["key"], record["fingerprint"],
                            json.dumps(record["answer"]), record["at"]))

    def record(self, record: dict) -> None:
        self.write(self.db, record)
