"""Shadow mode, experiments and online quality: a profile may let its default model
answer while the router decides beside it, or split its traffic between arms; the grades
that feedback sends back become accuracy per arm, model, policy and profile, each with a
95% interval.

An arm is a model name as a caller would ask for it (``router``, ``router-0.35``,
``router-budget-0.30``, or a model by name such as ``pro``), with a share of the
traffic. A request that asks for ``router`` is assigned an arm by a stable hash of the
experiment's name and a key: the value of the configured header (the end user's id, so
one user always sees one arm), else the request id. Requests that name a model are not
in the experiment.

```yaml
experiment:
  name: router-vs-pro
  key_header: X-User-Id          # optional
  arms: [{name: router, model: router, share: 0.5}, {name: pro, model: pro, share: 0.5}]
```

What each request was served as (arm, policy, model, cost) is kept in the state
database beside its request memory (table ``served``), so the figures add up over
processes and survive restarts. Accuracy counts the grade of the model that answered.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass

Z95 = 1.959964
SCHEMA = ("CREATE TABLE IF NOT EXISTS served (request_id TEXT PRIMARY KEY, profile TEXT NOT NULL, "
          "experiment TEXT, arm TEXT, policy TEXT, model TEXT, cost_usd DOUBLE PRECISION NOT NULL, "
          "escalated INTEGER NOT NULL, served_at BIGINT NOT NULL)",
          # shadow mode: what the router would have chosen beside what was served, and both costs
          "CREATE TABLE IF NOT EXISTS shadow (request_id TEXT PRIMARY KEY, profile TEXT NOT NULL, model TEXT, "
          "policy TEXT, cost_usd DOUBLE PRECISION NOT NULL, served_model TEXT, served_cost_usd DOUBLE PRECISION "
          "NOT NULL)")


class ExperimentError(ValueError):
    """An experiment that cannot run: no arms, shares that do not add up to 1, a name twice."""


@dataclass(frozen=True)
class Arm:
    name: str
    model: str  # the model name a request of this arm is served as
    share: float


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]
    key_header: str | None = None

    def assign(self, key: str) -> Arm:
        """The arm of ``key``: the same key always gets the same arm; over many keys each
        arm gets its share."""
        digest = hashlib.sha256(f"{self.name}\0{key}".encode("utf-8", "surrogatepass")).digest()
        u = int.from_bytes(digest[:8], "big") / 2 ** 64
        edge = 0.0
        for arm in self.arms:
            edge += arm.share
            if u < edge:
                return arm
        return self.arms[-1]  # rounding of the shares' sum


def experiment_from_dict(raw, where: str) -> Experiment:
    """``where``: what the errors name (the profile)."""
    if not isinstance(raw, dict) or set(raw) - {"name", "key_header", "arms"}:
        raise ExperimentError(f"{where}: experiment must be a mapping of name, key_header and arms")
    name, header, arms = raw.get("name"), raw.get("key_header"), raw.get("arms")
    if not isinstance(name, str) or not name.strip():
        raise ExperimentError(f"{where}: experiment needs a 'name'")
    if header is not None and (not isinstance(header, str) or not header.strip()):
        raise ExperimentError(f"{where}: experiment key_header must be a header name")
    if not isinstance(arms, list) or len(arms) < 2:
        raise ExperimentError(f"{where}: experiment {name!r} needs at least two arms")
    parsed = []
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict) or set(arm) != {"name", "model", "share"}:
            raise ExperimentError(f"{where}: experiment {name!r} arm {i} must have exactly name, model and share")
        share = arm["share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ExperimentError(f"{where}: experiment {name!r} arm {arm['name']!r}: share must be in (0, 1]")
        if not isinstance(arm["model"], str) or not isinstance(arm["name"], str):
            raise ExperimentError(f"{where}: experiment {name!r} arm {i}: name and model are strings")
        parsed.append(Arm(arm["name"], arm["model"], float(share)))
    if len({a.name for a in parsed}) < len(parsed):
        raise ExperimentError(f"{where}: experiment {name!r} names an arm twice")
    if not math.isclose(sum(a.share for a in parsed), 1.0, abs_tol=1e-9):
        raise ExperimentError(f"{where}: experiment {name!r}: the arms' shares add up to "
                              f"{sum(a.share for a in parsed):g}, not 1")
    return Experiment(name, tuple(parsed), header.lower() if header else None)


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
def record_served(db, request_id: str, profile: str, experiment: str | None, arm: str | None, policy: str,
                  model: str | None, cost_usd: float, escalated: bool) -> None:
    db.execute("INSERT INTO served (request_id, profile, experiment, arm, policy, model, cost_usd, escalated, "
               "served_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
               (request_id, profile, experiment, arm, policy, model, float(cost_usd), int(escalated), time.time_ns()))


def record_shadow(db, request_id: str, profile: str, model: str, policy: str, cost_usd: float,
                  served_model: str | None, served_cost_usd: float) -> None:
    db.execute("INSERT INTO shadow (request_id, profile, model, policy, cost_usd, served_model, served_cost_usd) "
               "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
               (request_id, profile, model, policy, float(cost_usd), served_model, float(served_cost_usd)))


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


def report(db, profile: str | None = None) -> str:
    """``router-pipeline experiment report``: per experiment, its arms and their differences."""
    lines = []
    for name, p in quality(db).items():
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
