"""Configuration changed while the server runs: the admin API's changes to a profile (its
mapper, knob, models, pins, experiment), for good or for a while, kept in the state
database with the name of the admin key that made them, and applied over the profiles
file each time the profiles are built: at start (a restart keeps them), on a change, on
``SIGHUP`` (the file read again), when a change expires, and when another replica
sharing the database made one.

A change sets some of a profile's ``LIVE_FIELDS`` (``null``: back to the file's value):

    POST /v1/admin/profiles/support-bot
    {"set": {"knob": "router-budget-0.20", "pins": {"user-42": "pro"}}, "ttl_s": 3600}

It is merged into the profile's entry of the file and everything is built again the way
the file is (``profiles_from_spec``): a bad change is refused with the error the file
would give and changes nothing. The new profiles replace the old in one assignment:
a request holds the profile it was authenticated with to its end, so requests in flight
finish on the configuration they began with and none sees half of each.

Every attempt (applied, refused, revoked) and every reload is one row of ``config_audit``.
"""

from __future__ import annotations

import copy
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from router_pipeline import settings
from router_pipeline.serve.mapper import MapperConfigError, load_spec
from router_pipeline.serve.profiles import LIVE_FIELDS, Profiles, ProfileError, key_digest

log = logging.getLogger(__name__)
ADMIN_KEY_VAR = "ROUTER_ADMIN_KEY"  # "name=key,name=key" (or one bare key, named "admin")
MAX_TTL_S = 30 * 86_400
SCHEMA = ("CREATE TABLE IF NOT EXISTS config_changes (id BIGINT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, "
          "admin TEXT NOT NULL, profile TEXT NOT NULL, change TEXT NOT NULL, expires_at DOUBLE PRECISION, "
          "revoked_at DOUBLE PRECISION)",
          "CREATE TABLE IF NOT EXISTS config_audit (at DOUBLE PRECISION NOT NULL, admin TEXT NOT NULL, "
          "action TEXT NOT NULL, profile TEXT, detail TEXT NOT NULL, outcome TEXT NOT NULL)")


def admin_keys() -> dict[bytes, str]:
    """The admin keys' digests -> their names, read from the environment each time (a
    rotated key needs no restart). Never logged."""
    value = settings.secret(ADMIN_KEY_VAR) or ""
    keys = {}
    for i, part in enumerate(p.strip() for p in value.split(",") if p.strip()):
        name, sep, key = part.partition("=")
        name, key = (name.strip(), key.strip()) if sep else (f"admin{i + 1 if i else ''}", name)
        keys[key_digest(key)] = name
    return keys


def admin_name(key: str | None) -> str | None:
    """The name of the admin key ``key`` is, None when it is none (compared in constant time)."""
    if not key:
        return None
    digest, found = key_digest(key), None
    for d, name in admin_keys().items():
        if hmac.compare_digest(digest, d):
            found = name
    return found


@dataclass(frozen=True)
class Change:
    id: int
    at: float
    admin: str
    profile: str
    set: dict
    expires_at: float | None = None

    def view(self) -> dict:
        return {"id": self.id, "at": self.at, "admin": self.admin, "profile": self.profile, "set": self.set,
                "expires_at": self.expires_at}


def check_change(profile: str, spec: dict, fields: dict, ttl_s) -> None:
    """ProfileError for a change that names no profile of the file or a field the admin
    API may not change (what the values may be is the build's check)."""
    if profile not in (spec.get("profiles") or {}):
        raise ProfileError(f"no profile {profile!r} in the profiles file (profiles: "
                           f"{', '.join(map(str, spec.get('profiles') or {}))})")
    if not isinstance(fields, dict) or not fields:
        raise ProfileError("a change needs 'set': a mapping of the fields to change")
    if unknown := sorted(set(fields) - set(LIVE_FIELDS)):
        raise ProfileError(f"the admin API cannot change {unknown} (keys stay in the file); it changes "
                           f"{', '.join(LIVE_FIELDS)}")
    if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float))
                              or not 0 < ttl_s <= MAX_TTL_S):
        raise ProfileError(f"ttl_s must be seconds in (0, {MAX_TTL_S}], got {ttl_s!r}")


def merged(spec: dict, changes: list[Change]) -> dict:
    """The file's contents with ``changes`` applied in order (a ``None`` value: the file's)."""
    out = copy.deepcopy(spec)
    file_profiles = spec.get("profiles") or {}
    for c in changes:
        entry = out["profiles"][c.profile]
        for name, value in c.set.items():
            if value is None:
                if name in file_profiles[c.profile]:
                    entry[name] = copy.deepcopy(file_profiles[c.profile][name])
                else:
                    entry.pop(name, None)
            else:
                entry[name] = copy.deepcopy(value)
    return out


# -- the state database ---------------------------------------------------------------
def ensure(db) -> None:
    for statement in SCHEMA:
        db.execute(statement)


def active(db, now: float) -> list[Change]:
    """The changes in force at ``now``, oldest first."""
    rows = db.execute("SELECT id, at, admin, profile, change, expires_at FROM config_changes WHERE revoked_at IS "
                      "NULL AND (expires_at IS NULL OR expires_at > ?) ORDER BY id", (now,))
    return [Change(int(i), at, admin, profile, json.loads(change), expires) for i, at, admin, profile, change, expires
            in rows]


def record(db, admin: str, profile: str, fields: dict, expires_at: float | None, now: float) -> Change:
    with db.transaction():
        (last,), = db.execute("SELECT COALESCE(MAX(id), 0) FROM config_changes")
        change = Change(int(last) + 1, now, admin, profile, fields, expires_at)
        db.execute("INSERT INTO config_changes (id, at, admin, profile, change, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                   (change.id, now, admin, profile, json.dumps(fields, sort_keys=True), expires_at))
    return change


def revoke(db, change_id: int, now: float) -> bool:
    """Whether a change in force was revoked."""
    with db.transaction():
        found = db.execute("SELECT id FROM config_changes WHERE id = ? AND revoked_at IS NULL AND (expires_at IS "
                           "NULL OR expires_at > ?)", (change_id, now))
        if found:
            db.execute("UPDATE config_changes SET revoked_at = ? WHERE id = ?", (now, change_id))
    return bool(found)


def audit(db, admin: str, action: str, profile: str | None, detail, outcome: str) -> None:
    db.execute("INSERT INTO config_audit (at, admin, action, profile, detail, outcome) VALUES (?, ?, ?, ?, ?, ?)",
               (time.time(), admin, action, profile, json.dumps(detail, sort_keys=True, default=str), outcome))


def history(db, limit: int = 100) -> list[dict]:
    rows = db.execute("SELECT at, admin, action, profile, detail, outcome FROM config_audit ORDER BY at DESC "
                      "LIMIT ?", (limit,))
    return [{"at": at, "admin": admin, "action": action, "profile": profile, "detail": json.loads(detail),
             "outcome": outcome} for at, admin, action, profile, detail, outcome in rows]


# -- building ---------------------------------------------------------------------------
@dataclass
class LiveConfig:
    """The profiles file and the changes made over it. ``build(spec) -> Profiles`` builds
    and checks profiles from the file's contents (the gateway's, which knows the router
    and the models)."""

    path: Path
    db: object  # serve.database.Database
    build: Callable[[dict], Profiles]
    spec: dict

    def __post_init__(self):
        ensure(self.db)

    def current(self, now: float | None = None) -> Profiles:
        """The file with the changes in force."""
        return self._built(self.spec, active(self.db, now or time.time()), strict=False)

    def change(self, admin: str, profile: str, fields: dict, ttl_s=None) -> Profiles:
        """Check, store and build one change (its id is the new profiles' version);
        ProfileError (audited) when it is refused."""
        now = time.time()
        try:
            check_change(profile, self.spec, fields, ttl_s)
            candidate = Change(0, now, admin, profile, fields, now + ttl_s if ttl_s else None)
            self._built(self.spec, [*active(self.db, now), candidate], strict=True)
        except ProfileError as exc:
            audit(self.db, admin, "change", profile, {"set": fields, "ttl_s": ttl_s, "error": str(exc)}, "refused")
            raise
        change = record(self.db, admin, profile, fields, candidate.expires_at, now)
        audit(self.db, admin, "change", profile, {"id": change.id, "set": fields, "ttl_s": ttl_s}, "applied")
        return self.current(now)

    def revoke(self, admin: str, change_id: int) -> Profiles | None:
        """The profiles without change ``change_id``; None when no such change is in force."""
        found = revoke(self.db, change_id, time.time())
        audit(self.db, admin, "revoke", None, {"id": change_id}, "applied" if found else "not_found")
        return self.current() if found else None

    def reload(self, admin: str = "SIGHUP") -> Profiles:
        """The profiles file read again, with the changes in force; ProfileError (audited, the
        current configuration kept) when the file is refused."""
        try:
            try:
                spec = load_spec(self.path)
            except MapperConfigError as exc:
                raise ProfileError(str(exc)) from None
            built = self._built(spec, active(self.db, time.time()), strict=False)
        except ProfileError as exc:
            audit(self.db, admin, "reload", None, {"file": str(self.path), "error": str(exc)}, "refused")
            raise
        self.spec = spec
        audit(self.db, admin, "reload", None, {"file": str(self.path)}, "applied")
        return built

    def _built(self, spec: dict, changes: list[Change], strict: bool) -> Profiles:
        """``strict``: a change the file does not accept is an error, else it is skipped."""
        try:
            for c in changes:
                check_change(c.profile, spec, c.set, None)
            profiles, kept = self.build(merged(spec, changes)), changes
        except ProfileError:
            if strict:
                raise
            kept = self._accepted(spec, changes)
            profiles = self.build(merged(spec, kept))
        profiles.version = max((c.id for c in kept), default=0)
        profiles.expires_at = min((c.expires_at for c in kept if c.expires_at), default=None)
        profiles.changes = kept
        for p in profiles.profiles.values():
            p.version = profiles.version
        return profiles

    def _accepted(self, spec: dict, changes: list[Change]) -> list[Change]:
        """The changes the file accepts, applied one at a time (a stored change the file
        no longer accepts is skipped, and logged: the server still starts)."""
        kept: list[Change] = []
        for c in changes:
            try:
                check_change(c.profile, spec, c.set, None)
                self.build(merged(spec, [*kept, c]))
                kept.append(c)
            except ProfileError as exc:
                log.error("live configuration: change %d (profile %s, by %s) is skipped: the profiles file no "
                          "longer accepts it: %s", c.id, c.profile, c.admin, exc)
        return kept
