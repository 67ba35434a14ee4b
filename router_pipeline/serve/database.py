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
import time
from pathlib import Path
from urllib.parse import urlsplit

from router_pipeline.artifacts import STATE_FILE
from router_pipeline.serve.config import DEFAULTS

POSTGRES_SCHEMES = ("postgresql", "postgres")


class DatabaseError(RuntimeError):
    """The state database cannot be opened or used; the message never holds a password.
    ``transient``: it may answer again by itself (unreachable, locked, busy, timed out), as
    opposed to a database that answers wrongly (a table gone) and needs an operator."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


def _transient(exc: Exception) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return any(w in str(exc).lower() for w in ("locked", "busy", "unable to open", "disk i/o"))
    # psycopg: a connection lost or refused, a statement timed out or cancelled (not a wrong query).
    return bool({c.__name__ for c in type(exc).__mro__} & {"OperationalError", "InterfaceError"})


# What a connection failure says, by the driver's words: which of password, user, database or
# host is wrong (the driver's own message may quote the connection string: never shown), and
# whether it may pass by itself (transient) or needs an operator (a wrong password does not).
_CONNECT_FAILURES = (
    ("password authentication failed", "the password was refused for this user", False),
    ("no password supplied", "the server asks for a password and none was given", False),
    ("role", "the user does not exist on the server", False),
    ("database", "the database does not exist on the server", False),
    ("could not translate host name", "the host name does not resolve", True),
    ("connection refused", "nothing accepts connections at this host and port", True),
    ("timeout expired", "the host did not answer in time", True),
    ("no route to host", "the host cannot be reached", True),
)


def _connect_failure(exc: Exception) -> tuple[str, bool]:
    """(why the connection failed, in words; whether it may pass by itself)."""
    text = str(exc).lower()
    for words, why, transient in _CONNECT_FAILURES:
        if words in text and (words not in ("role", "database") or "does not exist" in text):
            return why, transient
    return type(exc).__name__, True


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
        self._lock = threading.RLock()  # one connection per process: its statements one at a time
        self._conn = None
        self._held_since: float | None = None  # when the statement (or transaction) holding it began

    @contextlib.contextmanager
    def _held(self):
        """The connection's lock, waited for at most ``timeout_s``: a statement that hangs (a
        frozen server) makes the other callers fail fast, not hang behind it."""
        if not self._lock.acquire(timeout=self.timeout_s):
            raise DatabaseError(f"the state database {self.name} is busy: a statement has not returned "
                                f"within {self.timeout_s:g} s")
        outermost = self._held_since is None  # a transaction's statements take it again
        if outermost:
            self._held_since = time.monotonic()
        try:
            yield
        finally:
            if outermost:
                self._held_since = None
            self._lock.release()

    def held_s(self) -> float:
        """How long the statement or transaction now holding the connection has run (0.0 when
        none does): a held write lock or a frozen server shows here before its timeout."""
        since = self._held_since
        return 0.0 if since is None else time.monotonic() - since

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
            why, transient = _connect_failure(exc)
            raise DatabaseError(f"cannot open the state database {self.name}: {why}", transient) from None
        return self._conn

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run one statement; its rows (an empty list for statements without rows)."""
        with self._held():
            conn = self._connect()
            try:
                cursor = conn.execute(sql.replace("?", "%s") if self.postgres else sql, params)
                return cursor.fetchall() if cursor.description else []
            except (sqlite3.Error, *self._driver_errors()) as exc:
                if self.postgres and conn.closed:
                    self._conn = None  # the server went away: reconnect on the next statement
                raise DatabaseError(f"the state database {self.name} failed: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:200]}", _transient(exc)) from None

    @contextlib.contextmanager
    def transaction(self):
        """One writer at a time across processes from the first read to the commit."""
        with self._held():
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
