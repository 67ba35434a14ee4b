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
The figures themselves (``quality``, ``report``, the intervals) are computed in
``router_pipeline/online_quality.py``, shared with the pipeline's ``experiment_report``
asset (the pipeline never imports serve/).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

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
