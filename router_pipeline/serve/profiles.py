"""Caller profiles: an API key -> who is calling, and how their requests are routed.

A YAML file lists the profiles; each names where its keys are (an environment
variable, or a file with one key per line: never the file of profiles itself) and
its routing: a policy mapper spec (rules, budget, escalation), the model targets it
may use, the order to fall back in when a model is cooling down, and whether the
text of its queries may be stored with feedback.

    profiles:
      support-bot:
        keys_env: ROUTER_KEYS_SUPPORT          # comma-separated keys
        mapper: {preset: cost_first}           # default: the calibrated threshold the evaluation scored
        allowed: [medium, large]               # targets this profile may be served by
        fallbacks: [medium, large]             # when the chosen model fails or cools down, in this order
        store_queries: true                    # feedback rows keep the query text (training data)
        router_failure: default_model          # the router failed or timed out: the mapper's fallback
                                               # answers (default), or refuse (503 router_unavailable)
        cascade: {plan: [[flash-lite, flash], pro]}  # a pool router's: ask the first step, accept when two
                                               # agree, else the next (default: the release's cascade;
                                               # off: none)
        knob: router-budget-0.30               # what 'router' stands for: any model name a caller may ask
                                               # for (router-0.35, router-quality-0.95, a model by name)
        pins: {user-42: pro}                   # the request's OpenAI 'user' -> the model name it is served as
      analytics:
        keys_file: keys/analytics.txt
        mapper: {preset: quality_first, budget: {ledger: analytics, period: day},
                 rules: [...]}

Keys are compared by SHA-256 digest in constant time; they are never logged, and
only a profile's name appears in stats and logs. The file is read strictly: a key is at
least MIN_KEY_CHARS characters, ``store_queries`` is a YAML boolean (``"no"`` in quotes
is a string, refused), ``allowed`` and ``fallbacks`` name the mapper's model aliases,
and ``keys_file`` is never the profiles file itself (whose lines would become keys).

The admin API (serve/live.py) changes ``LIVE_FIELDS`` of a profile while the server runs;
a change is merged into the profile's entry of the file and the whole is built again by
``profiles_from_spec``: the same checks, the same errors.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from router_pipeline import settings
from router_pipeline.serve.mapper import MapperConfigError, PolicyMapper, evaluated_spec, load_spec, pool_spec
from router_pipeline.policies import TIERS
from router_pipeline.serve.experiments import Experiment, ExperimentError, experiment_from_dict

OPEN = "default"  # the profile of a server started without a profiles file
MIN_KEY_CHARS = 16  # a shorter API key is guessable
# What the admin API may change while the server runs (keys never: they stay in the file).
LIVE_FIELDS = ("mapper", "knob", "pins", "cascade", "allowed", "fallbacks", "shadow", "experiment",
               "router_failure", "store_queries")
FIELDS = ("keys_env", "keys_file", *LIVE_FIELDS)
log = logging.getLogger(__name__)


class ProfileError(ValueError):
    pass


@dataclass
class Profile:
    name: str
    mapper: PolicyMapper
    allowed: tuple[str, ...] = (*TIERS, "local")
    fallbacks: tuple[str, ...] = TIERS
    store_queries: bool = False
    router_failure: str = "default_model"  # or "refuse": a 503 when the router gives no decision
    experiment: Experiment | None = None  # its traffic split between arms (serve/experiments.py)
    shadow: bool = False  # its default model answers; the router decides beside it, off the request path
    knob: str | None = None  # the model name a request for 'router' is served as (None: the mapper's own)
    pins: dict[str, str] = field(default_factory=dict)  # the request's OpenAI 'user' -> the model name it gets
    # A pool profile's cascade (routers/cascade.py: fixed, or a released learned one): the router's choices escalate
    cascade: object = None
    key_digests: frozenset[bytes] = field(default=frozenset(), repr=False)
    # router-<threshold> mappers made from this profile's mapper, least recently used first: they go with it
    # when the profile is changed, so no request meets a mapper of the configuration it replaced.
    threshold_mappers: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    version: int = 0  # the configuration it belongs to (Profiles.version)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass
class Profiles:
    profiles: dict[str, Profile]
    open: bool = False  # no profiles file: every caller is the default profile
    spec: dict | None = field(default=None, repr=False)  # the file's contents, as read (what changes merge into)
    path: Path | None = None
    version: int = 0  # the live change last applied (serve/live.py); 0: the file alone
    expires_at: float | None = None  # when the first of the applied changes expires (then built again without it)
    changes: list = field(default_factory=list, repr=False)  # the live changes applied (serve/live.py Change)

    def authenticate(self, key: str | None) -> Profile | None:
        """The profile a key belongs to; None for a missing or unknown key."""
        if self.open:
            return self.profiles[OPEN]
        if not key:
            return None
        digest = key_digest(key)
        for profile in self.profiles.values():
            # Every digest is compared (no early exit on the first byte that differs).
            if any(hmac.compare_digest(digest, d) for d in profile.key_digests):
                return profile
        return None


def _keys(name: str, raw: dict, profiles_file: Path) -> frozenset[bytes]:
    keys: list[tuple[str, str]] = []  # (where it came from, key): errors name the place, never the key
    if "keys_env" in raw:
        value = settings.secret(str(raw["keys_env"]))
        if not value:
            raise ProfileError(f"profile {name!r}: environment variable {raw['keys_env']} holds no key")
        keys += [(f"key {i} of {raw['keys_env']}", k.strip()) for i, k in enumerate(value.split(","), 1) if k.strip()]
    if "keys_file" in raw:
        path = Path(raw["keys_file"])
        path = path if path.is_absolute() else profiles_file.parent / path
        try:
            if path.is_file() and path.samefile(profiles_file):
                raise ProfileError(f"profile {name!r}: keys_file is the profiles file {profiles_file} itself: its "
                                   "lines would become keys; give a file with one key per line")
            keys += [(f"{path} line {i}", line.strip()) for i, line in
                     enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                     if line.strip() and not line.startswith("#")]
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"profile {name!r}: cannot read keys_file {path}: {exc}") from None
    if not keys:
        raise ProfileError(f"profile {name!r} has no key: give keys_env (an environment variable) or keys_file")
    for where, key in keys:
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise ProfileError(f"profile {name!r}: the {where} is not a usable key (at least {MIN_KEY_CHARS} "
                               "characters, no spaces)")
    return frozenset(key_digest(k) for _, k in keys)


def _targets(name: str, raw: dict, key: str, default: tuple[str, ...], mapper: PolicyMapper) -> tuple[str, ...]:
    value = raw.get(key, [t for t in default if t in mapper.models])
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ProfileError(f"profile {name!r}: {key} must be a list of model aliases, got {value!r}")
    if unknown := [t for t in value if t not in mapper.models]:
        raise ProfileError(f"profile {name!r}: {key} names {unknown}, not model aliases of its mapper "
                           f"{sorted(mapper.models)}")
    return tuple(value)


def _flag(name: str, raw: dict, key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):  # YAML's "no" in quotes is a string, and a string is true
        raise ProfileError(f"profile {name!r}: {key} must be true or false (unquoted), got {value!r}")
    return value


ROUTER_FAILURE = ("default_model", "refuse")


def _defaults(calibration: dict, pool: list[str] | None) -> tuple[dict, tuple, tuple]:
    """(mapper spec, allowed, fallbacks) of a profile that names none."""
    if pool:
        return pool_spec(pool), (*pool, "local"), ()
    return (evaluated_spec(calibration) if calibration else {"preset": "balanced"}), Profile.allowed, Profile.fallbacks


def load_profiles(path: str | Path | None, *, calibration: dict, default_models: dict[str, str],
                  pool: list[str] | None = None, private=None, cascade=None) -> Profiles:
    """Profiles from a YAML/JSON file; ``None``: one open profile (local use) routing at
    the calibrated threshold. ``calibration`` is the released router's. ``pool``: a pool
    router's models, cheapest first: a profile without a mapper serves its choice, may use
    every model of the pool, and falls back down the pool (the gateway's order).
    ``private(alias, model id)``: whether a model keeps queries private (privacy rules' default).
    ``cascade``: the pool router's released cascade (a profile's default)."""
    default_spec, allowed, fallbacks = _defaults(calibration, pool)
    if path is None:
        if not calibration:
            _uncalibrated([OPEN])
        mapper = PolicyMapper.from_dict(default_spec, default_models=default_models, private=private)
        return Profiles({OPEN: Profile(OPEN, mapper, allowed=_targets(OPEN, {}, "allowed", allowed, mapper),
                                       fallbacks=fallbacks, cascade=_cascade(OPEN, {}, pool, cascade))}, open=True)
    path = Path(path)
    try:
        spec = load_spec(path)
    except MapperConfigError as exc:
        raise ProfileError(str(exc)) from None
    return profiles_from_spec(spec, path, calibration=calibration, default_models=default_models, pool=pool,
                              private=private, cascade=cascade)


def profiles_from_spec(spec: dict, path: Path, *, calibration: dict, default_models: dict[str, str],
                       pool: list[str] | None = None, private=None, cascade=None) -> Profiles:
    """Profiles from the contents of the profiles file at ``path`` (relative paths and
    errors are the file's); ``load_profiles`` for the rest."""
    default_spec, allowed, fallbacks = _defaults(calibration, pool)
    raw_profiles = spec.get("profiles")
    if not isinstance(raw_profiles, dict) or not raw_profiles:
        raise ProfileError(f"{path}: expected a mapping 'profiles' of name -> profile")
    profiles = {}
    seen: dict[bytes, str] = {}
    for name, raw in raw_profiles.items():
        if not isinstance(raw, dict):
            raise ProfileError(f"{path}: profile {name!r} must be a mapping")
        unknown = set(raw) - set(FIELDS)
        if unknown:
            raise ProfileError(f"{path}: profile {name!r} has unknown keys {sorted(unknown)}")
        mapper_spec = raw.get("mapper") or default_spec
        if pool and isinstance(mapper_spec, dict) and "preset" not in mapper_spec:
            # Rules of its own (privacy, keywords, a budget) come before the pool router's choice.
            rules = mapper_spec.get("rules", [])
            if isinstance(rules, list) and not any(isinstance(r, dict) and r.get("kind") == "pool" for r in rules):
                rules = [*rules, *default_spec["rules"]]
            mapper_spec = {**default_spec, **mapper_spec, "rules": rules}
        try:
            mapper = PolicyMapper.from_dict(mapper_spec, base_dir=path.parent, default_models=default_models,
                                            private=private)
        except MapperConfigError as exc:
            raise ProfileError(f"{path}: profile {name!r}: {exc}") from None
        digests = _keys(str(name), raw, path)
        for d in digests:
            if d in seen:
                raise ProfileError(f"{path}: profiles {seen[d]!r} and {name!r} share a key")
            seen[d] = str(name)
        profiles[str(name)] = Profile(
            str(name), mapper, allowed=_targets(name, raw, "allowed", allowed, mapper),
            fallbacks=_targets(name, raw, "fallbacks", fallbacks, mapper),
            store_queries=_flag(name, raw, "store_queries"), key_digests=digests, shadow=_flag(name, raw, "shadow"),
            router_failure=_choice(name, raw, "router_failure", ROUTER_FAILURE),
            experiment=_experiment(name, raw, path), knob=_name(name, raw.get("knob"), "knob"),
            pins=_pins(name, raw.get("pins", {})), cascade=_cascade(name, raw, pool, cascade))
    if not calibration and (defaulted := [str(n) for n, raw in raw_profiles.items() if not raw.get("mapper")]):
        _uncalibrated(defaulted)
    return Profiles(profiles, spec=spec, path=path)


def _name(profile: str, value, what: str) -> str | None:
    """A model name as a caller gives one (whether it names a model is the gateway's check)."""
    if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > 200):
        raise ProfileError(f"profile {profile!r}: {what} must be a model name (e.g. router-budget-0.30, "
                           f"router-0.35 or a model of the profile), got {value!r}")
    return value


def _cascade(profile: str, raw: dict, pool: list[str] | None, released):
    """The profile's cascade: ``off``; ``released`` (the release's); a plan of its own;
    unsaid, the release's when the release serves it by default."""
    from router_pipeline.routers.cascade import PlanError, fixed_from_dict

    value = raw.get("cascade")
    if value in ("off", False):
        return None
    if value is None:
        return released if released is not None and released.by_default else None
    if value == "released":
        if released is None:
            raise ProfileError(f"profile {profile!r}: cascade: released, but the router was released without one")
        return released
    if pool is None:
        raise ProfileError(f"profile {profile!r}: a cascade escalates among a pool router's models; this router "
                           "has two tiers")
    try:
        return fixed_from_dict(value, pool, [0.0] * len(pool), f"profile {profile!r}: cascade")
    except PlanError as exc:
        raise ProfileError(str(exc)) from None


def _pins(profile: str, value) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(u, str) and u for u in value):
        raise ProfileError(f"profile {profile!r}: pins must be a mapping of user (the request's 'user') -> "
                           f"model name, got {value!r}")
    return {u: _name(profile, m, f"pins[{u!r}]") for u, m in value.items()}


def _experiment(name: str, raw: dict, path: Path) -> Experiment | None:
    if "experiment" not in raw:
        return None
    try:
        return experiment_from_dict(raw["experiment"], f"profile {name!r}")
    except ExperimentError as exc:
        raise ProfileError(f"{path}: {exc}") from None


def _choice(name: str, raw: dict, key: str, choices: tuple[str, ...]) -> str:
    value = raw.get(key, choices[0])
    if value not in choices:
        raise ProfileError(f"profile {name!r}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _uncalibrated(names: list[str]) -> None:
    # E.g. a head router folder copied without its evaluation: easy to miss, and it routes differently.
    log.warning("the router has no calibration (router_calibration.json): profile(s) %s use the balanced preset "
                "(private queries to the local model, low confidence to the large one), not the threshold the "
                "evaluation scored", ", ".join(names))
