"""Pool routers on the test rows: each candidate's cost-accuracy frontier as its knob
sweeps, AIQ, accuracy at the cheapest model's cost, cost at the best single model's
accuracy (and 95% of it), beside every single model, the random mix and the oracle, with
paired-bootstrap intervals; the choice among candidates by validation evidence only (the
AIQ of their knob sweeps on the validation slice); the release rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from router_pipeline.evaluation import frontier as fr
from router_pipeline.routers.pool import decide, lambdas

MIN_ROWS_TO_BLOCK = 30  # fewer test rows: a failed rule warns (its interval is too wide to judge)
ONE_MODEL_SHARE = 0.95
POOL_RULES = {
    "not_below_single_models": "The chosen router's test frontier is not below the single models' (their random "
                               "mix): the upper end of its AIQ's paired interval against the mix is not below 0.",
    "no_model_collapse": f"The chosen router does not send more than {ONE_MODEL_SHARE:.0%} of test queries to one "
                         "model while the oracle at the same lambda spreads them.",
}


@dataclass
class PoolReport:
    chosen: str
    why: str
    table: pd.DataFrame  # a row per router: AIQ, accuracy at the cheapest cost, cost at the best's accuracy...
    intervals: pd.DataFrame  # chosen minus each other router (AIQ), paired bootstrap
    curves: dict  # name -> frontier.Curve on the test rows
    shares: dict  # the chosen router's test share per model at its lambda
    oracle_shares: dict
    verdicts: list  # (rule, passed, blocking, note)


def choose(validation_aiq: dict[str, float], order: list[str]) -> tuple[str, str]:
    """The candidate with the best validation AIQ; a tie (or no evidence) is not a reason to
    pick any other than the first in ``order`` (the configured preference)."""
    scored = {n: v for n, v in validation_aiq.items() if np.isfinite(v)}
    if not scored:
        return order[0], f"no validation AIQ could be computed: the first candidate, {order[0]}"
    best = max(order, key=lambda n: (scored.get(n, -np.inf), -order.index(n)))
    return best, f"best validation AIQ {scored[best]:.3f} (" + ", ".join(
        f"{n} {scored[n]:.3f}" for n in order if n in scored) + ")"


def sweep_aiq(p: np.ndarray, correct: np.ndarray, cost: np.ndarray, costs: np.ndarray) -> float:
    """AIQ of a router's knob sweep on some rows (the validation slice, for the choice)."""
    values = lambdas(costs)
    return fr.aiq(fr.curve(np.stack([decide(p, costs, v) for v in values], axis=1), correct, cost), cost)


def evaluate(p: dict[str, np.ndarray], costs: dict[str, np.ndarray], lam: dict[str, float], correct: np.ndarray,
             cost: np.ndarray, models: list[str], chosen: str, why: str, *, resamples: int = 1000,
             seed: int = 0) -> PoolReport:
    """Every candidate (``p[name]``: its P(correct) on the test rows; ``costs[name]``, its
    expected costs; ``lam[name]``, its release lambda) against the single models, the
    random mix and the oracle on the test rows (``correct``, ``cost``: rows x models)."""
    values = lambdas(cost.mean(axis=0))
    curves = {name: fr.curve(np.stack([decide(p[name], costs[name], v) for v in values], axis=1), correct, cost)
              for name in p}
    curves["random mix"] = fr.random_mix(correct, cost)
    curves["oracle"] = fr.oracle(correct, cost, values)
    curves.update(zip(models, fr.singles(correct, cost)))
    rng = fr.cost_range(cost)
    acc, mean_cost = correct.mean(axis=0), cost.mean(axis=0)
    best = int(np.argmax(acc))
    rows = []
    for name, c in curves.items():
        f = c.frontier()
        rows.append({"router": name, "aiq": fr.aiq(c, cost), "accuracy_at_cheapest_cost": f.accuracy_at(rng.lo),
                     "accuracy_at_half_best_cost": f.accuracy_at(mean_cost[best] / 2),
                     "usd_per_1000_at_best_accuracy": f.cost_at(acc[best]) * 1000,
                     "usd_per_1000_at_95pct_best": f.cost_at(0.95 * acc[best]) * 1000})
    weights = fr.resample_weights(len(correct), resamples, seed)
    intervals = [{"router": chosen, "minus": other, **fr.interval(
        lambda w, o=other: fr.aiq(curves[chosen], cost, w) - fr.aiq(curves[o], cost, w), weights)}
        for other in curves if other != chosen and other != "oracle"]
    pick = decide(p[chosen], costs[chosen], lam[chosen])
    oracle_pick = np.argmax(correct - lam[chosen] * cost if np.isfinite(lam[chosen]) else -cost, axis=1)
    share = lambda picks: {m: float(np.mean(picks == i)) for i, m in enumerate(models)}  # noqa: E731
    report = PoolReport(chosen, why, pd.DataFrame(rows), pd.DataFrame(intervals), curves, share(pick),
                        share(oracle_pick), [])
    report.verdicts = gate(report, len(correct))
    return report


def gate(report: PoolReport, rows: int) -> list[tuple[str, bool, bool, str]]:
    """(rule, passed, blocking, note) per rule of POOL_RULES; with fewer than
    MIN_ROWS_TO_BLOCK test rows a failure only warns."""
    few = rows < MIN_ROWS_TO_BLOCK
    note = f"only {rows} test rows (< {MIN_ROWS_TO_BLOCK}): a warning, not a verdict" if few else ""
    mix = report.intervals.set_index("minus").loc["random mix"]
    below = bool(np.isfinite(mix["hi"]) and mix["hi"] < 0)
    collapsed = max(report.shares.values()) > ONE_MODEL_SHARE and max(report.oracle_shares.values()) <= ONE_MODEL_SHARE
    return [("not_below_single_models", not below, not few, note if below else ""),
            ("no_model_collapse", not collapsed, not few, note if collapsed else "")]
