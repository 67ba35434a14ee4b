"""What a paid request could not write to the state database, kept on local disk until it can.

A request is paid upstream before it is settled; if the state database fails in between,
the answer still goes back to the caller, and what settling could not write (the spend in
place of the reservation, the recorded answer of an ``Idempotency-Key``, or the release of a
key whose request failed unpaid) is appended here:
one JSON line per request, fsync'd before the answer is returned, in a file next to the
state database. ``replay`` writes the entries into the database once it answers again
(each entry once: its id is recorded in ``journal_applied`` in the same transaction), so
budgets count the journaled spend before any further request may spend.

The file is shared by the processes of one host (a lock around every append and replay).
A line cut by a crash mid-append belongs to a request whose answer was never returned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import uuid
from pathlib import Path

from router_pipeline.serve.database import Database

JOURNAL_FILE = "spend-journal.jsonl"  # beside the SQLite state database, in the feedback folder
log = logging.getLogger(__name__)
_SCHEMA = "CREATE TABLE IF NOT EXISTS journal_applied (id TEXT PRIMARY KEY)"


class JournalError(OSError):
    """The journal cannot be written or read (disk full, permissions)."""


class SpendJournal:
    def __init__(self, folder: str | Path):
        self.path = Path(folder) / JOURNAL_FILE
        self._lock = threading.Lock()  # this process's threads; flock is for the other processes

    @contextlib.contextmanager
    def _locked(self, mode: str):
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, mode, encoding="utf-8") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield f
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def append(self, entry: dict) -> str:
        """Write ``entry`` durably (fsync'd); its id."""
        entry = {"id": uuid.uuid4().hex, **entry}
        try:
            with self._locked("a") as f:
                f.write(json.dumps(entry, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise JournalError(f"the spend journal {self.path} cannot be written: {exc.strerror or exc}") from None
        return entry["id"]

    def pending(self) -> bool:
        """Entries wait to be replayed (a stat: cheap enough for every request)."""
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def entries(self) -> list[dict]:
        """The entries not replayed yet (a line cut by a crash is skipped)."""
        if not self.pending():
            return []
        with self._locked("r") as f:
            return _parse(f.read())

    def find_answer(self, profile: str, key: str) -> dict | None:
        """The recorded answer of ``(profile, Idempotency-Key)`` waiting here, if any."""
        for entry in reversed(self.entries()):
            answer = entry.get("answer")
            if answer and answer["profile"] == profile and answer["key"] == key:
                return answer
        return None

    def replay(self, db: Database, apply) -> int:
        """Write every entry into ``db`` with ``apply(db, entry)``, each once; the file is
        emptied when all are in. DatabaseError when the database still fails (the entries
        stay). The number of entries written now."""
        if not self.pending():
            return 0
        db.execute(_SCHEMA)
        done = 0
        with self._locked("r+") as f:
            for entry in _parse(f.read()):
                with db.transaction():
                    if db.execute("SELECT 1 FROM journal_applied WHERE id = ?", (entry["id"],)):
                        continue
                    apply(db, entry)
                    db.execute("INSERT INTO journal_applied (id) VALUES (?)", (entry["id"],))
                done += 1
            f.seek(0)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        if done:
            log.warning("spend journal: %d entries written into the state database %s", done, db.name)
        return done


def _parse(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            log.error("spend journal: a line cut by a crash is skipped (its answer was never returned)")
            continue
        if isinstance(entry, dict) and "id" in entry:
            out.append(entry)
    return out
