"""The state database's identity, so that a budget is never silently started again at $0.

A new state database gets an id (table ``state_identity``); a server that keeps budgets
writes it to ``state-identity.json`` in its feedback folder. When such a server starts
on a database without that id (an emptied or deleted SQLite file, a PostgreSQL database
recreated), it refuses, naming the database, unless the operator accepts the new one
explicitly (``serve --accept-new-database``). While it runs, a SQLite file deleted or
replaced under it (another inode), or a PostgreSQL database whose id changed, stops
budgeted requests (503) until an operator restores it and restarts the server.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from pathlib import Path

from router_pipeline.serve.database import Database, DatabaseError

IDENTITY_FILE = "state-identity.json"
log = logging.getLogger(__name__)
# One row (key 'state'): processes starting together on a new database agree on one id.
_SCHEMA = ("CREATE TABLE IF NOT EXISTS state_identity (name TEXT PRIMARY KEY, id TEXT NOT NULL, "
           "created_at TEXT NOT NULL)")


class StateIdentityError(DatabaseError):
    """The state database is not the one this server's budgets were kept in."""

    def __init__(self, message: str):
        super().__init__(message, transient=False)


class StateIdentity:
    def __init__(self, db: Database, folder: str | Path, check_every_s: float):
        """``check_every_s``: how often a PostgreSQL database's id is read again (a SQLite
        file is checked by a stat on every call)."""
        self.db, self.marker, self.check_every_s = db, Path(folder) / IDENTITY_FILE, check_every_s
        self.id: str | None = None
        self._file = None
        self._checked = 0.0

    def _stat(self):
        try:
            st = os.stat(self.db.target)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _read(self) -> str | None:
        rows = self.db.execute("SELECT id FROM state_identity WHERE name = 'state'")
        return rows[0][0] if rows else None

    def _known(self) -> dict | None:
        if not self.marker.exists():
            return None
        try:
            known = json.loads(self.marker.read_text(encoding="utf-8"))
            if not isinstance(known, dict) or not isinstance(known.get("id"), str):
                raise ValueError("no 'id'")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise StateIdentityError(f"{self.marker} cannot be read ({exc}): it says which state database holds "
                                     "this server's budgets; restore it, or delete it to trust the database as "
                                     "it is") from None
        return known

    def establish(self, accept_new: bool) -> str:
        """At start: the database's id, created for a new database; StateIdentityError when
        this folder's record names another one and ``accept_new`` is not given."""
        self.db.execute(_SCHEMA)
        known, current = self._known(), self._read()
        if known is not None and known["id"] != current:
            if not accept_new:
                state = "is new or empty" if current is None else "is another database"
                raise StateIdentityError(
                    f"the state database {self.db.name} {state}, but {self.marker} says this server's budgets were "
                    f"kept in database {known['id']} ({known.get('database')}, since {known.get('created_at')}): "
                    "starting would count every budget again from $0. Restore that database, or start with "
                    "--accept-new-database to begin the budgets anew")
            log.warning("state database %s accepted as new by the operator: budgets start again from $0",
                        self.db.name)
        if current is None:
            self.db.execute("INSERT INTO state_identity (name, id, created_at) VALUES ('state', ?, ?) "
                            "ON CONFLICT (name) DO NOTHING",
                            (uuid.uuid4().hex, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")))
            current = self._read()  # another process may have created it first
        if known is None or known["id"] != current:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.marker.with_name(f".{self.marker.name}.tmp")
            tmp.write_text(json.dumps({"id": current, "database": self.db.name,
                                       "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}))
            tmp.replace(self.marker)
        self.id, self._file, self._checked = current, None if self.db.postgres else self._stat(), time.monotonic()
        return current

    def check(self) -> None:
        """StateIdentityError when the database is no longer the one established."""
        if self.id is None:
            return
        if not self.db.postgres:
            if self._stat() != self._file:
                raise StateIdentityError(f"the state database file {self.db.target} was deleted or replaced while "
                                         "the server ran: budgets would start again from $0; restore it and "
                                         "restart the server")
            return
        if time.monotonic() - self._checked < self.check_every_s:
            return
        try:
            found = self._read()
        except DatabaseError as exc:
            if exc.transient:
                raise
            found = None  # its table is gone
        if found != self.id:
            raise StateIdentityError(f"the state database {self.db.name} was replaced while the server ran (its id "
                                     f"is {found}, not {self.id}): restore it and restart the server")
        self._checked = time.monotonic()
