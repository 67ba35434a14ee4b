"""Where the routing server keeps state that must outlive a process: SQLite by default
(one file, WAL: survives restarts, shared by the worker processes of one host), or
PostgreSQL when a ``postgresql://`` URL is given (shared by replicas on several hosts).

``Database`` is one connection used under a lock, with the few things the two dialects
spell differently: placeholders, and taking the write lock at the start of a
transaction (SQLite's ``BEGIN IMMEDIATE``; PostgreSQL's ``SELECT ... FOR UPDATE`` in the
caller's query). SQL is written with ``?`` placeholders and portable upserts
(``INSERT ... ON CONFLICT``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from urllib.parse import urlsplit

from router_pipeline.artifacts import STATE_FILE
from router_pipeline.serve.config import DEFAULTS

POSTGRES_SCHEMES = ("postgresql", "postgres")


class DatabaseError(RuntimeError):
    """The state database cannot be opened or used; the message never holds a password."""


def describe(url: str) -> str:
    """A database URL without its password (what errors and logs may show)."""
    parts = urlsplit(url)
    host = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    return f"{parts.scheme}://{parts.username + '@' if parts.username else ''}{host}{parts.path}"


def state_database(folder: str | Path, url: str | None = None,
                   timeout_s: float = DEFAULTS.database_timeout_s) -> "Database":
    """The serving state database: ``url`` (PostgreSQL) when given, else SQLite in ``folder``."""
    if url:
        return Database(url, timeout_s)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Database(Path(folder) / STATE_FILE, timeout_s)


class Database:
    def __init__(self, target: str | Path, timeout_s: float = DEFAULTS.database_timeout_s):
        """``target``: a SQLite file path, or a postgresql:// URL; ``timeout_s``: how long a
        connection or a statement may wait (a lock, a server that does not answer)."""
        self.target, self.timeout_s = str(target), timeout_s
        self.postgres = urlsplit(self.target).scheme in POSTGRES_SCHEMES
        self._lock = threading.RLock()
        self._conn = None

    @property
    def name(self) -> str:
        return describe(self.target) if self.postgres else self.target

    def _connect(self):
        if self._conn is not None:
            return self._conn
        try:
            if self.postgres:
                import psycopg

                self._conn = psycopg.connect(self.target, autocommit=True, connect_timeout=max(1, round(self.timeout_s)),
                                             options=f"-c statement_timeout={int(self.timeout_s * 1000)}")
            else:
                self._conn = sqlite3.connect(self.target, timeout=self.timeout_s, isolation_level=None,
                                             check_same_thread=False)
                self._conn.execute("PRAGMA journal_mode=WAL")
        except Exception as exc:  # psycopg's message can quote the URL: never shown
            raise DatabaseError(f"cannot open the state database {self.name} ({type(exc).__name__})") from None
        return self._conn

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run one statement; its rows (an empty list for statements without rows)."""
        with self._lock:
            conn = self._connect()
            try:
                cursor = conn.execute(sql.replace("?", "%s") if self.postgres else sql, params)
                return cursor.fetchall() if cursor.description else []
            except (sqlite3.Error, *self._driver_errors()) as exc:
                if self.postgres and conn.closed:
                    self._conn = None  # the server went away: reconnect on the next statement
                raise DatabaseError(f"the state database {self.name} failed: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:200]}") from None

    @contextlib.contextmanager
    def transaction(self):
        """One writer at a time across processes from the first read to the commit."""
        with self._lock:
            self.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self.execute("ROLLBACK")
                raise
            self.execute("COMMIT")

    def _driver_errors(self) -> tuple:
        if not self.postgres:
            return ()
        import psycopg

        return (psycopg.Error,)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
