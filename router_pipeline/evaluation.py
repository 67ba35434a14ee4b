"""Scoring a router on the test split by replaying answers that were already graded.

No model is called here: each test question has a medium and a large answer with
its blind grade and its real cost, so any routing (the router's, a baseline's, a
threshold's) can be scored exactly.

Quality is SimpleQA accuracy (share Correct). The cost-quality curve routes a
query to the large model when its score (the router's P(Complex_Query), or a
baseline's) is at least a threshold; sweeping the threshold gives points
(share of large calls, accuracy). With acc_m / acc_l the accuracy of always-medium
/ always-large, a point's performance gap recovered is
PGR = (acc - acc_m) / (acc_l - acc_m); the curve is piecewise linear between
thresholds (tied scores move together), and
- APGR is the area under PGR over large-call share 0..1 (0.5 for a random router,
  up to 1 for a perfect one);
- CPT(x) is the smallest large-call share whose PGR reaches x.
Both are undefined (NaN) when always-large is not more accurate than always-medium.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from router_pipeline.policies import AMBIGUOUS, COMPLEX, CORRECT, IDK, INCORRECT, POLICIES, STANDARD

AMBIGUOUS_CHOICES = ("medium", "large", "abstain")


def outcome_table(questions: pd.DataFrame, answers: pd.DataFrame, judgments: pd.DataFrame) -> pd.DataFrame:
    """One row per question with both tiers graded: qid, query, {tier}_label, {tier}_cost.
    Questions missing a grade are left out (they are reported by the caller)."""
    qids = set(questions["qid"])
    grades = judgments[judgments["qid"].isin(qids)].pivot_table(index="qid", columns="tier", values="label", aggfunc="first")
    costs = answers[answers["qid"].isin(qids)].pivot_table(index="qid", columns="tier", values="cost_usd", aggfunc="first")
    table = questions[["qid", "query"]].set_index("qid")
    for tier in ("medium", "large"):
        table[f"{tier}_label"] = grades[tier] if tier in grades else None
        table[f"{tier}_cost"] = costs[tier] if tier in costs else np.nan
    table = table.dropna(subset=["medium_label", "large_label"])
    return table.reset_index()


def simpleqa_metrics(labels: pd.Series) -> dict:
    """SimpleQA's headline numbers: shares correct / incorrect / not attempted, correct
    given attempted, and F1 (harmonic mean of correct and correct-given-attempted)."""
    n = len(labels)
    correct = float((labels == CORRECT).sum()) / n if n else math.nan
    incorrect = float((labels == INCORRECT).sum()) / n if n else math.nan
    not_attempted = float((labels == IDK).sum()) / n if n else math.nan
    attempted = correct + incorrect
    cga = correct / attempted if attempted else 0.0
    f1 = 2 * correct * cga / (correct + cga) if (correct + cga) else 0.0
    return {"correct": correct, "incorrect": incorrect, "not_attempted": not_attempted,
            "correct_given_attempted": cga, "f1": f1}


def routed(table: pd.DataFrame, tiers: pd.Series | np.ndarray) -> pd.DataFrame:
    """The answer each question gets under a routing: tier per row is medium | large | abstain
    (abstaining answers "I don't know" for free: graded IDK)."""
    tiers = np.asarray(tiers)
    bad = set(tiers) - set(AMBIGUOUS_CHOICES)
    if bad:
        raise ValueError(f"unknown tiers {sorted(bad)}; expected {AMBIGUOUS_CHOICES}")
    label = np.where(tiers == "large", table["large_label"], np.where(tiers == "medium", table["medium_label"], IDK))
    cost = np.where(tiers == "large", table["large_cost"], np.where(tiers == "medium", table["medium_cost"], 0.0))
    return pd.DataFrame({"qid": table["qid"].values, "tier": tiers, "label": label, "cost_usd": cost.astype(float)})


def summarise(table: pd.DataFrame, tiers, name: str) -> dict:
    """Metrics of one routing, relative to always-large."""
    r = routed(table, tiers)
    always_large = table["large_cost"].sum()
    large_acc = float((table["large_label"] == CORRECT).mean()) if len(table) else math.nan
    m = simpleqa_metrics(r["label"])
    cost = float(r["cost_usd"].sum())
    return {"router": name, **m, "cost_usd": cost,
            "savings_vs_large": 1 - cost / always_large if always_large else math.nan,
            "quality_retained": m["correct"] / large_acc if large_acc else math.nan,
            "large_share": float((r["tier"] == "large").mean()) if len(r) else math.nan}


def policy_tiers(policies, ambiguous: str = "medium") -> np.ndarray:
    if ambiguous not in AMBIGUOUS_CHOICES:
        raise ValueError(f"ambiguous must be one of {AMBIGUOUS_CHOICES}, got {ambiguous!r}")
    tier_of = {STANDARD: "medium", COMPLEX: "large", AMBIGUOUS: ambiguous}
    return np.array([tier_of[p] for p in policies])


# -- the cost-quality curve ---------------------------------------------------
@dataclass
class Curve:
    share: np.ndarray  # large-call share, 0 .. 1, increasing
    accuracy: np.ndarray
    threshold: np.ndarray  # the threshold of each point (inf for the all-medium point)
    acc_medium: float
    acc_large: float

    @property
    def gap(self) -> float:
        return self.acc_large - self.acc_medium

    @property
    def pgr(self) -> np.ndarray:
        return (self.accuracy - self.acc_medium) / self.gap if self.gap > 0 else np.full_like(self.accuracy, np.nan)

    @property
    def apgr(self) -> float:
        if self.gap <= 0:
            return math.nan
        pgr = self.pgr
        return float(np.sum((self.share[1:] - self.share[:-1]) * (pgr[1:] + pgr[:-1]) / 2))

    def cpt(self, target: float) -> float:
        """Smallest large-call share (linear between points) whose PGR reaches target."""
        if self.gap <= 0:
            return math.nan
        pgr = self.pgr
        for i in range(len(pgr)):
            if pgr[i] >= target - 1e-12:
                if i == 0:
                    return float(self.share[0])
                x0, x1, y0, y1 = self.share[i - 1], self.share[i], pgr[i - 1], pgr[i]
                return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))
        return math.nan


def curve(table: pd.DataFrame, scores) -> Curve:
    """Route to large when score >= t, for every distinct score t (and t = inf)."""
    scores = np.asarray(scores, dtype=float)
    if len(scores) != len(table):
        raise ValueError(f"{len(scores)} scores for {len(table)} questions")
    if len(table) == 0:
        raise ValueError("no graded test questions to evaluate on")
    med = (table["medium_label"] == CORRECT).to_numpy(float)
    large = (table["large_label"] == CORRECT).to_numpy(float)
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    share, acc = [], []
    for t in thresholds:
        up = scores >= t
        share.append(up.mean())
        acc.append(np.where(up, large, med).mean())
    return Curve(np.array(share), np.array(acc), thresholds, float(med.mean()), float(large.mean()))


def random_curves(table: pd.DataFrame, seeds: int = 20, seed: int = 0) -> list[Curve]:
    rng = np.random.default_rng(seed)
    return [curve(table, rng.random(len(table))) for _ in range(seeds)]


def curve_stats(c: Curve | list[Curve]) -> dict:
    curves = c if isinstance(c, list) else [c]
    return {"apgr": _mean([x.apgr for x in curves]), "cpt50": _mean([x.cpt(0.5) for x in curves]),
            "cpt80": _mean([x.cpt(0.8) for x in curves])}


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def oracle_scores(table: pd.DataFrame) -> np.ndarray:
    """1 where only escalating helps (the oracle's Complex_Query cells), else 0."""
    from router_pipeline.policies import oracle_cell

    return np.array([1.0 if oracle_cell(m, l).policy == COMPLEX else 0.0
                     for m, l in zip(table["medium_label"], table["large_label"])])


def oracle_policies(table: pd.DataFrame) -> list[str]:
    from router_pipeline.policies import oracle_cell

    return [oracle_cell(m, l).policy for m, l in zip(table["medium_label"], table["large_label"])]


def confusion(oracle: list[str], predicted: list[str]) -> pd.DataFrame:
    """Oracle policy (rows) x router policy (columns), all three on both axes."""
    frame = pd.crosstab(pd.Categorical(oracle, POLICIES), pd.Categorical(predicted, POLICIES), dropna=False)
    frame.index.name, frame.columns.name = "oracle \\ router", None
    return frame


# -- threshold calibration ----------------------------------------------------
def calibrate(table: pd.DataFrame, scores, *, target_share: float | None = None,
              target_pgr: float | None = None) -> dict:
    """The threshold on P(needs large) that reaches a target share of large calls, or the
    cheapest one reaching a target PGR, measured on (train) data."""
    if (target_share is None) == (target_pgr is None):
        raise ValueError("give exactly one of target_share and target_pgr")
    c = curve(table, scores)
    pgr = c.pgr
    if target_share is not None:
        if not 0 <= target_share <= 1:
            raise ValueError(f"target_share must be within [0, 1], got {target_share}")
        i = int(np.argmin(np.abs(c.share - target_share)))
        method, target = "large_share", target_share
    else:
        reached = np.where(pgr >= target_pgr - 1e-12)[0]
        if c.gap <= 0 or not len(reached):
            i = len(c.share) - 1  # cannot tell: escalate everything rather than guess
        else:
            i = int(reached[0])
        method, target = "pgr", target_pgr
    t = float(c.threshold[i])
    return {"method": method, "target": target, "threshold": t if math.isfinite(t) else None,
            "achieved_share": float(c.share[i]), "achieved_accuracy": float(c.accuracy[i]),
            "achieved_pgr": float(pgr[i]) if c.gap > 0 else None, "n": int(len(table))}


def route_with_threshold(scores, threshold: float | None) -> np.ndarray:
    """Tier per query under a calibrated threshold (None: nothing escalates)."""
    scores = np.asarray(scores, dtype=float)
    if threshold is None:
        return np.full(len(scores), "medium")
    return np.where(scores >= threshold, "large", "medium")


# -- the whole evaluation -----------------------------------------------------
@dataclass
class Report:
    per_query: pd.DataFrame  # one row per test question: oracle, router decision, routed outcome
    summary: pd.DataFrame  # one row per router / baseline
    confusion: pd.DataFrame
    curves: dict  # name -> Curve (random: the mean curve on a grid)
    calibration: dict
    random_apgr: float


def evaluate(test: pd.DataFrame, test_decisions: pd.DataFrame, validation: pd.DataFrame,
             validation_decisions: pd.DataFrame, baseline_labels: pd.DataFrame | None = None, *,
             ambiguous: str = "medium", random_seeds: int = 20, target_share: float | None = None,
             target_pgr: float | None = 0.9, knn_k: int = 5, seed: int = 0) -> Report:
    """``test``/``validation``: outcome tables (the validation slice is held out from the
    router's training rows; the threshold is calibrated there, never on training or test
    rows); ``*_decisions``: decisions_frame rows aligned on qid; ``baseline_labels``:
    (query, policy) the embedding baselines learn from (the router's training rows)."""
    dec = test_decisions.set_index("qid").loc[test["qid"]].reset_index()
    oracle = oracle_policies(test)
    tiers = policy_tiers(dec["policy"], ambiguous)
    rows, curves = [], {}

    def add(name, tiers_, scores=None, policies=None):
        row = summarise(test, tiers_, name)
        if scores is not None:
            curves[name] = curve(test, scores)
            row.update(curve_stats(curves[name]))
        if policies is not None:
            row["policy_accuracy"] = float(np.mean([a == b for a, b in zip(oracle, policies)]))
        rows.append(row)

    add("router", tiers, dec["p_large"], list(dec["policy"]))
    if validation.empty:
        calibration = {"method": "none", "threshold": 0.5, "n": 0,
                       "note": "no graded validation row: threshold left at 0.5, not calibrated"}
    else:
        val_dec = validation_decisions.set_index("qid").loc[validation["qid"]].reset_index()
        calibration = calibrate(validation, val_dec["p_large"], target_share=target_share,
                                target_pgr=None if target_share is not None else target_pgr)
    add("router @ calibrated threshold", route_with_threshold(dec["p_large"], calibration["threshold"]))
    add("always-medium", np.full(len(test), "medium"))
    add("always-large", np.full(len(test), "large"))
    add("oracle", policy_tiers(oracle, ambiguous), oracle_scores(test), oracle)
    randoms = random_curves(test, random_seeds, seed)
    rng = np.random.default_rng(seed)
    draws = [summarise(test, rng.choice(["medium", "large"], len(test)), "") for _ in range(random_seeds)]
    rows.append({**{k: float(np.mean([d[k] for d in draws])) for k in draws[0] if k != "router"},
                 "router": f"random (mean of {random_seeds})", **curve_stats(randoms)})
    curves["random (mean)"] = _mean_curve(randoms)
    if baseline_labels is not None and len(baseline_labels):
        from router_pipeline.baselines import BASELINES, embed, fit_predict

        train_x, test_x = embed(list(baseline_labels["query"])), embed(list(test["query"]))
        for kind in BASELINES:
            policies, p_large = fit_predict(kind, train_x, list(baseline_labels["policy"]), test_x, knn_k, seed)
            add(f"{kind} (MiniLM)", policy_tiers(policies, ambiguous), p_large, policies)
    routed_ = routed(test, tiers)
    per_query = test.assign(oracle_policy=oracle).merge(dec, on=["qid"], suffixes=("", "_router"))
    per_query = per_query.assign(tier=routed_["tier"].values, label=routed_["label"].values,
                                 routed_cost_usd=routed_["cost_usd"].values)
    summary = pd.DataFrame(rows)
    random_apgr = float(summary.loc[summary["router"].str.startswith("random"), "apgr"].iloc[0])
    return Report(per_query, summary, confusion(oracle, list(dec["policy"])), curves, calibration, random_apgr)


def _mean_curve(curves: list[Curve], points: int = 21) -> Curve:
    grid = np.linspace(0, 1, points)
    acc = np.mean([np.interp(grid, c.share, c.accuracy) for c in curves], axis=0)
    c0 = curves[0]
    return Curve(grid, acc, np.full(points, np.nan), c0.acc_medium, c0.acc_large)
