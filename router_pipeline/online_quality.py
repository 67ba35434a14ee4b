"""Online quality: what the routing server served, per profile, model, policy and arm of
an experiment, with the accuracy its feedback grades give (95% Wilson intervals) and
the differences between arms (Newcombe intervals). Read from the server's state database
(tables ``served``, ``shadow``, ``feedback``) by the server (``/v1/stats``, ``/metrics``,
``router-pipeline experiment report``) and by the pipeline
(the ``experiment_report`` asset, defs/experiments.py): the shared vocabulary, since the
pipeline never imports serve/.

``quality`` takes any object whose ``execute(sql)`` gives rows (the
server's ``Database``, or a read-only connection). ``read_state`` opens the state database
for reading without creating it, and the rest turns ``quality``'s figures into rows per
arm, per pair of arms, and the pairs whose difference excludes 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from router_pipeline import settings
from router_pipeline.artifacts import STATE_FILE, Artifacts

Z95 = 1.959964
DATABASE_VAR = "ROUTER_DATABASE_URL"  # a PostgreSQL URL may hold a password: an environment variable, not a flag
TABLES = ("served", "shadow", "feedback")  # what quality reads (the server creates them when it starts)


# -- intervals -----------------------------------------------------------------------------
def wilson(correct: int, n: int) -> tuple[float | None, float | None, float | None]:
    """(accuracy, lo, hi): the Wilson score interval at 95%, sound at small n and near 0 or 1."""
    if n == 0:
        return None, None, None
    p = correct / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def difference(a: tuple[int, int], b: tuple[int, int]) -> tuple[float | None, float | None, float | None]:
    """(accuracy of a - accuracy of b, lo, hi) for two independent samples (arms see
    different requests): Newcombe's interval from the two Wilson intervals."""
    (pa, la, ua), (pb, lb, ub) = wilson(*a), wilson(*b)
    if pa is None or pb is None:
        return None, None, None
    d = pa - pb
    return d, d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)


# -- what was served, and how it was graded ---------------------------------------------------
def _shadow(db) -> dict[str, dict]:
    """Per profile in shadow mode: how often the router would have chosen the model that
    answered, what it would have spent against what was spent, and, on requests whose
    served and would-be models both have a grade (the same model, or feedback naming the
    other model with ``tier``), the accuracy it would have had minus the served one's, a
    paired difference with a 95% normal interval."""
    grades: dict[tuple[str, str], bool] = {}
    for request_id, tier, grade in db.execute("SELECT request_id, tier, grade FROM feedback WHERE grade IS NOT NULL "
                                              "ORDER BY timestamp"):
        grades.setdefault((request_id, tier), grade == "Correct")
    out: dict[str, dict] = {}
    for request_id, profile, model, cost, served, served_cost in db.execute(
            "SELECT request_id, profile, model, cost_usd, served_model, served_cost_usd FROM shadow"):
        p = out.setdefault(profile, {"requests": 0, "same_model": 0, "router_spend_usd": 0.0, "spend_usd": 0.0,
                                     "router_models": {}, "_diffs": []})
        p["requests"] += 1
        p["same_model"] += model == served
        p["router_spend_usd"] += cost
        p["spend_usd"] += served_cost
        p["router_models"][model] = p["router_models"].get(model, 0) + 1
        if (request_id, served) in grades and (request_id, model) in grades:
            p["_diffs"].append(grades[(request_id, model)] - grades[(request_id, served)])
    for p in out.values():
        diffs = p.pop("_diffs")
        p["router_spend_usd"], p["spend_usd"] = round(p["router_spend_usd"], 8), round(p["spend_usd"], 8)
        mean = sum(diffs) / len(diffs) if diffs else None
        half = (Z95 * math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs))
                if len(diffs) > 1 else None)
        p["graded_both"] = len(diffs)
        p["router_minus_served_accuracy"] = _round(mean)
        p["router_minus_served_accuracy_95"] = [_round(mean - half), _round(mean + half)] if half is not None else None
    return out


def _graded(db) -> dict[str, bool]:
    """request_id -> whether the model that answered it was graded Correct (IDK counts as
    not correct); the first grade of the model that served it."""
    out: dict[str, bool] = {}
    rows = db.execute("SELECT f.request_id, f.grade FROM feedback f JOIN served s ON f.request_id = s.request_id "
                      "WHERE f.grade IS NOT NULL AND f.tier = s.model ORDER BY f.timestamp")
    for request_id, grade in rows:
        out.setdefault(request_id, grade == "Correct")
    return out


def _figures(requests: int, spend: float, escalations: int, correct: int, graded: int) -> dict:
    accuracy, lo, hi = wilson(correct, graded)
    return {"requests": requests, "spend_usd": round(spend, 8),
            "usd_per_1000": round(1000 * spend / requests, 6) if requests else None,
            "escalations": escalations, "graded": graded, "accuracy": _round(accuracy),
            "accuracy_95": [_round(lo), _round(hi)] if graded else None}


def _round(x):
    return None if x is None else round(x, 4)


def quality(db) -> dict[str, dict]:
    """Per profile: accuracy from feedback by model, by policy and by arm of each experiment
    (with requests, spend and escalations), and the difference of every pair of arms."""
    graded = _graded(db)
    tally: dict[tuple, list] = {}  # (profile, facet, key) -> [requests, spend, escalations, correct, graded]
    for request_id, profile, experiment, arm, policy, model, cost, escalated in db.execute(
            "SELECT request_id, profile, experiment, arm, policy, model, cost_usd, escalated FROM served"):
        facets = [("models", model or "none"), ("policies", policy)]
        if experiment is not None:
            facets.append(("arms", json.dumps([experiment, arm])))
        for facet, key in facets:
            t = tally.setdefault((profile, facet, key), [0, 0.0, 0, 0, 0])
            t[0], t[1], t[2] = t[0] + 1, t[1] + cost, t[2] + escalated
            if request_id in graded:
                t[3], t[4] = t[3] + graded[request_id], t[4] + 1
    out: dict[str, dict] = {}
    for (profile, facet, key), t in sorted(tally.items()):
        p = out.setdefault(profile, {"models": {}, "policies": {}, "experiments": {}})
        if facet != "arms":
            p[facet][key] = _figures(*t)
            continue
        experiment, arm = json.loads(key)
        arms = p["experiments"].setdefault(experiment, {"arms": {}, "differences": {}})["arms"]
        arms[arm] = {**_figures(*t), "_counts": (t[3], t[4])}
    for profile, s in _shadow(db).items():
        out.setdefault(profile, {"models": {}, "policies": {}, "experiments": {}})["shadow"] = s
    for p in out.values():
        for e in p["experiments"].values():
            names = list(e["arms"])
            counts = {a: e["arms"][a].pop("_counts") for a in names}
            for i, a in enumerate(names):  # every pair, in the arms' alphabetical order
                for b in names[i + 1:]:
                    d, lo, hi = difference(counts[a], counts[b])
                    e["differences"][f"{a} - {b}"] = {"accuracy": _round(d), "accuracy_95": [
                        _round(lo), _round(hi)] if d is not None else None}
    return out


def render(figures: dict[str, dict], profile: str | None = None) -> str:
    """What ``router-pipeline experiment report`` prints from ``quality``'s figures: per
    experiment, its arms and their differences (only ``profile``'s when given)."""
    lines = []
    for name, p in figures.items():
        if profile is not None and name != profile:
            continue
        for experiment, e in p["experiments"].items():
            lines.append(f"profile {name}, experiment {experiment}:")
            for arm, f in e["arms"].items():
                acc = ("no grades yet" if f["accuracy"] is None else
                       f"accuracy {f['accuracy']:.3f} [{f['accuracy_95'][0]:.3f}, {f['accuracy_95'][1]:.3f}] "
                       f"over {f['graded']} graded")
                lines.append(f"  arm {arm}: {f['requests']} requests, ${f['usd_per_1000']:.3f} per 1000, "
                             f"{f['escalations']} escalations, {acc}")
            for pair, d in e["differences"].items():
                lines.append(f"  {pair} accuracy " + ("n/a (an arm has no grades)" if d["accuracy"] is None else
                                                      f"{d['accuracy']:+.3f} [{d['accuracy_95'][0]:+.3f}, "
                                                      f"{d['accuracy_95'][1]:+.3f}]"))
    return "\n".join(lines) or "no experiment has served a request"


# -- where the state database is, and reading it without writing -------------------------------
def state_location(folder: str | Path | None = None, url: str | None = None,
                   root: str | Path | None = None) -> tuple[Path, str | None]:
    """(feedback folder, PostgreSQL URL or None): the serving state database named by
    ``folder`` (default: the feedback folder under the artifacts ``root``, itself by default
    the settings') and ``url`` (default: $ROUTER_DATABASE_URL, ``DATABASE_VAR``). The
    defaults of the routing server, ``router-pipeline`` (serve/cli.py) and the
    ``experiment_report`` asset."""
    if not folder:
        folder = (Artifacts(Path(root)) if root else Artifacts.from_settings()).feedback
    return Path(folder), url or settings.secret(DATABASE_VAR)


class StateUnreadable(RuntimeError):
    """A state database that exists (or is configured) but cannot be read; the message never
    holds the URL (it may hold a password)."""


@dataclass(frozen=True)
class Reading:
    where: str  # the SQLite file, or "PostgreSQL" (never the URL)
    figures: dict[str, dict] | None  # quality's; None when there is nothing to read
    missing: str | None = None  # why there is nothing to read


def _connect(folder: Path, url: str | None, timeout_s: float):
    """(connection or None, where, missing); nothing is created."""
    if url:
        try:
            import psycopg

            conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(timeout_s)),
                                   options="-c default_transaction_read_only=on")
        except Exception as exc:  # the driver's message can quote the URL: never shown
            raise StateUnreadable(f"cannot open the PostgreSQL state database: {type(exc).__name__} (check the "
                                  f"URL's host, port, user and password)") from None
        return conn, "PostgreSQL", None
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None, str(path), f"there is no state database at {path} (no routing server has run with this folder)"
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=timeout_s,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        raise StateUnreadable(f"cannot open the state database {path}: {exc}") from None
    return conn, str(path), None


def read_state(folder: str | Path, url: str | None = None, timeout_s: float = 10.0) -> Reading:
    """``quality`` of the state database (PostgreSQL at ``url``, else ``requests.sqlite`` in
    ``folder``), opened read-only; figures None, saying why, when there is no SQLite file or
    it lacks the tables (a server that never started with experiments)."""
    conn, where, missing = _connect(Path(folder), url, timeout_s)
    if conn is None:
        return Reading(where, None, missing)
    with contextlib.closing(conn):
        try:
            tables = ("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()" if url
                      else "SELECT name FROM sqlite_master WHERE type = 'table'")
            absent = [t for t in TABLES if t not in {r[0] for r in conn.execute(tables)}]
            if absent:
                return Reading(where, None, f"the state database {where} has no {', '.join(absent)} table (written "
                                            f"by a server without experiments, or by something else)")
            return Reading(where, quality(conn))
        except Exception as exc:  # a statement's error (never the URL)
            raise StateUnreadable(f"the state database {where} cannot be read: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None


# -- the figures as rows --------------------------------------------------------------------------
def _pairs(experiment: dict):
    """(a, b, difference) for every pair of arms, in quality's order."""
    names = list(experiment["arms"])
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            yield a, b, experiment["differences"][f"{a} - {b}"]


def _experiments(figures: dict[str, dict], profile: str | None = None):
    for name, p in figures.items():
        if profile is None or name == profile:
            for experiment, e in p["experiments"].items():
                yield name, experiment, e


def arm_rows(figures: dict[str, dict], profile: str | None = None) -> list[dict]:
    """One row per arm of every experiment: requests, spend, spend per 1,000, escalations,
    graded, accuracy and its 95% interval."""
    rows = []
    for name, experiment, e in _experiments(figures, profile):
        for arm, f in e["arms"].items():
            lo, hi = f["accuracy_95"] or (None, None)
            rows.append({"profile": name, "experiment": experiment, "arm": arm, "requests": f["requests"],
                         "spend_usd": f["spend_usd"], "usd_per_1000": f["usd_per_1000"],
                         "escalations": f["escalations"], "graded": f["graded"], "accuracy": f["accuracy"],
                         "accuracy_lo95": lo, "accuracy_hi95": hi})
    return rows


def difference_rows(figures: dict[str, dict], profile: str | None = None) -> list[dict]:
    """One row per pair of arms: accuracy of a minus b with its 95% Newcombe interval."""
    rows = []
    for name, experiment, e in _experiments(figures, profile):
        for a, b, d in _pairs(e):
            lo, hi = d["accuracy_95"] or (None, None)
            rows.append({"profile": name, "experiment": experiment, "a": a, "b": b,
                         "graded_a": e["arms"][a]["graded"], "graded_b": e["arms"][b]["graded"],
                         "accuracy_a_minus_b": d["accuracy"], "lo95": lo, "hi95": hi})
    return rows


@dataclass(frozen=True)
class Separation:
    """Arms whose accuracy differs beyond the interval, and the pairs left unjudged."""
    below: list[str]  # one sentence per pair whose difference's interval excludes 0
    unjudged: list[str]  # one sentence per pair with too few grades to judge


def _accuracy(arm: str, f: dict) -> str:
    return (f"arm {arm}'s accuracy {f['accuracy']:.3f} [{f['accuracy_95'][0]:.3f}, {f['accuracy_95'][1]:.3f}] "
            f"over {f['graded']} graded")


def separation(figures: dict[str, dict], min_graded: int = 30, profile: str | None = None) -> Separation:
    """Every pair of arms whose 95% Newcombe interval of the accuracy difference excludes 0
    (one arm below the other beyond the interval), naming both arms and the figures; pairs
    where an arm has fewer than ``min_graded`` grades are not judged."""
    below, unjudged = [], []
    for name, experiment, e in _experiments(figures, profile):
        where = f"profile {name}, experiment {experiment}"
        for a, b, d in _pairs(e):
            fa, fb = e["arms"][a], e["arms"][b]
            if min(fa["graded"], fb["graded"]) < max(1, min_graded):
                unjudged.append(f"{where}: {a} vs {b} not judged ({fa['graded']} and {fb['graded']} graded, "
                                f"fewer than {max(1, min_graded)})")
                continue
            lo, hi = d["accuracy_95"]
            if lo > 0 or hi < 0:
                (low, fl), (high, fh) = ((b, fb), (a, fa)) if lo > 0 else ((a, fa), (b, fb))
                below.append(f"{where}: {_accuracy(low, fl)} is below {_accuracy(high, fh)}; {a} - {b} "
                             f"{d['accuracy']:+.3f} [{lo:+.3f}, {hi:+.3f}] excludes 0")
    return Separation(below, unjudged)
