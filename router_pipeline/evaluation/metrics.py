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

from router_pipeline.policies import AMBIGUOUS, COMPLEX, CORRECT, IDK, INCORRECT, POLICIES, STANDARD, TIERS

AMBIGUOUS_CHOICES = (*TIERS, "abstain")  # what Ambiguous_Query may route to


def outcome_table(questions: pd.DataFrame, answers: pd.DataFrame, judgments: pd.DataFrame) -> pd.DataFrame:
    """One row per question with both tiers graded: qid, query, {tier}_label, {tier}_cost.
    Questions missing a grade are left out (they are reported by the caller)."""
    qids = set(questions["qid"])
    grades = judgments[judgments["qid"].isin(qids)].pivot_table(index="qid", columns="tier", values="label", aggfunc="first")
    costs = answers[answers["qid"].isin(qids)].pivot_table(index="qid", columns="tier", values="cost_usd", aggfunc="first")
    table = questions[["qid", "query"]].set_index("qid")
    for tier in TIERS:
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
def fit_threshold(table: pd.DataFrame, scores, *, target_share: float | None = None,
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


def apgr_weighted(scores, medium_correct, large_correct, weights=None) -> float:
    """Curve(...).apgr in O(n log n), with optional row weights (a bootstrap resample's
    multiplicities): rows sorted by score, tied scores moving together."""
    return float(apgr_resamples(scores, medium_correct, large_correct,
                                None if weights is None else np.asarray(weights, float)[None, :])[0])


def apgr_resamples(scores, medium_correct, large_correct, weights=None) -> np.ndarray:
    """APGR under each row of ``weights`` (resamples x n); NaN where the resample has no
    quality gap."""
    scores = np.asarray(scores, float)
    med, large = np.asarray(medium_correct, float), np.asarray(large_correct, float)
    w = np.ones((1, len(scores))) if weights is None else np.asarray(weights, float)
    order = np.argsort(-scores, kind="stable")
    ends = np.append(np.nonzero(np.diff(scores[order]))[0], len(scores) - 1)  # last row of each tie group
    total = w.sum(axis=1)
    gap = (w @ (large - med)) / total
    share = np.cumsum(w[:, order], axis=1)[:, ends] / total[:, None]
    gained = np.cumsum(w[:, order] * (large - med)[order], axis=1)[:, ends] / total[:, None]
    share = np.hstack([np.zeros((len(w), 1)), share])
    with np.errstate(invalid="ignore", divide="ignore"):  # no quality gap: NaN, as returned
        pgr = np.hstack([np.zeros((len(w), 1)), gained / gap[:, None]])
        area = np.sum((share[:, 1:] - share[:, :-1]) * (pgr[:, 1:] + pgr[:, :-1]) / 2, axis=1)
    return np.where(gap > 0, area, np.nan)


def crossfit_apgr(scores, medium_correct, large_correct, folds) -> float:
    """APGR of cross-fitted scores: each fold's own APGR (its rows scored by the model that
    never saw them), weighted by the fold's rows. Scores of different folds' models are
    never ranked together."""
    scores, folds = np.asarray(scores, float), np.asarray(folds)
    med, large = np.asarray(medium_correct, float), np.asarray(large_correct, float)
    return float(sum(len(i) / len(folds) * apgr_weighted(scores[i], med[i], large[i]) for i in _strata(folds)))


def _strata(folds: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(folds == f) for f in np.unique(folds)]


def paired_bootstrap(table: pd.DataFrame, scores_a, scores_b, *, resamples: int = 1000, seed: int = 0,
                     folds=None) -> dict:
    """APGR(a) - APGR(b) on the same rows, with a 95% percentile interval from paired
    resamples of the rows (both routers scored on each resample). With ``folds``
    (cross-fitted scores), APGR is crossfit_apgr and rows are resampled within their fold."""
    med = (table["medium_label"] == CORRECT).to_numpy(float)
    large = (table["large_label"] == CORRECT).to_numpy(float)
    a, b = np.asarray(scores_a, float), np.asarray(scores_b, float)
    n = len(table)
    folds = np.zeros(n, int) if folds is None else np.asarray(folds)
    rng = np.random.default_rng(seed)
    diff = np.zeros(resamples)
    for rows in _strata(folds):
        m = len(rows)
        w = np.stack([np.bincount(rng.integers(0, m, m), minlength=m) for _ in range(resamples)]).astype(float)
        diff += m / n * (apgr_resamples(a[rows], med[rows], large[rows], w)
                         - apgr_resamples(b[rows], med[rows], large[rows], w))
    diff = diff[~np.isnan(diff)]
    point = crossfit_apgr(a, med, large, folds) - crossfit_apgr(b, med, large, folds)
    if not len(diff):
        return {"diff": point, "lo": math.nan, "hi": math.nan, "resamples": 0}
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return {"diff": point, "lo": float(lo), "hi": float(hi), "resamples": int(len(diff))}


def plain(value) -> float | None:
    """A figure for JSON: rounded to 4 places, None for a missing or NaN one."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


def expected_calibration_error(p, is_positive, bins: int = 10) -> float:
    """ECE of a probability: |mean predicted - observed rate| per equal-width bin,
    weighted by the bin's share of rows."""
    p, y = np.asarray(p, float), np.asarray(is_positive, float)
    if not len(p):
        return math.nan
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[which == b].mean() - y[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def policy_mix(policies) -> dict[str, float]:
    policies = list(policies)
    return {p: (policies.count(p) / len(policies) if policies else math.nan) for p in POLICIES}


# A router that decides one policy for more than this share of queries, while the labels
# have at least two policies above MIN_LABEL_SHARE each, has collapsed.
COLLAPSE_SHARE = 0.95
MIN_LABEL_SHARE = 0.10


def collapsed(decided, labels) -> bool:
    mix, label_mix = policy_mix(decided), policy_mix(labels)
    varied = sum(v > MIN_LABEL_SHARE for v in label_mix.values()) >= 2
    return bool(varied and max(mix.values()) > COLLAPSE_SHARE)


# -- the whole evaluation -----------------------------------------------------
@dataclass
class Report:
    per_query: pd.DataFrame  # one row per test question: oracle, each candidate's decision, the chosen's outcome
    summary: pd.DataFrame  # one row per candidate / reference router
    confusion: pd.DataFrame  # the chosen candidate's
    curves: dict  # name -> Curve (random: the mean curve on a grid)
    calibrations: dict  # candidate -> calibration on the validation rows
    random_apgr: float
    chosen: str
    why: str
    intervals: pd.DataFrame  # candidate a, candidate b, APGR(a) - APGR(b), 95% interval

    @property
    def calibration(self) -> dict:
        return self.calibrations[self.chosen]


def aligned(decisions: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``decisions`` (decisions_frame rows with qid) in the order of ``table``'s rows."""
    return decisions.set_index("qid").loc[table["qid"]].reset_index()


def evaluate(test: pd.DataFrame, validation: pd.DataFrame, candidates: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
             *, chosen: str, why: str = "", ambiguous: str = "medium", random_seeds: int = 20,
             target_share: float | None = None, target_pgr: float | None = 0.9, seed: int = 0,
             resamples: int = 1000) -> Report:
    """Score every candidate router on the same test rows, with ``chosen`` (by
    release.choose, which never sees test rows) as the one released. ``test``/
    ``validation``: outcome tables (the validation slice is held out from every
    candidate's training rows); ``candidates``: name -> (test decisions, validation
    decisions), decisions_frame rows with qid. Thresholds are calibrated on the
    validation rows, never on training or test rows."""
    if not candidates:
        raise ValueError("no candidate router to evaluate")
    if chosen not in candidates:
        raise ValueError(f"the chosen router {chosen!r} is not among the candidates {list(candidates)}")
    oracle = oracle_policies(test)
    is_complex = np.array([p == COMPLEX for p in oracle])
    rows, curves, calibrations, val_apgr, scores = [], {}, {}, {}, {}
    per_query = test.assign(oracle_policy=oracle)
    for name, (test_dec, val_dec) in candidates.items():
        dec = aligned(test_dec, test)
        scores[name] = dec["p_complex"].to_numpy(float)
        curves[name] = curve(test, scores[name])
        row = {**summarise(test, policy_tiers(dec["policy"], ambiguous), name), **curve_stats(curves[name]),
               "policy_accuracy": float(np.mean([a == b for a, b in zip(oracle, dec["policy"])])),
               "ece_p_complex": expected_calibration_error(scores[name], is_complex),
               "parse_failures": int((~dec["parse_ok"].astype(bool)).sum()) if "parse_ok" in dec else 0,
               **{f"mix_{p}": v for p, v in policy_mix(dec["policy"]).items()}}
        if len(validation):
            vdec = aligned(val_dec, validation)
            val_apgr[name] = curve(validation, vdec["p_complex"]).apgr
            calibrations[name] = fit_threshold(validation, vdec["p_complex"], target_share=target_share,
                                           target_pgr=None if target_share is not None else target_pgr)
        else:
            val_apgr[name] = math.nan
            calibrations[name] = {"method": "none", "threshold": 0.5, "n": 0,
                                  "note": "no graded validation row: threshold left at 0.5, not calibrated"}
        served = summarise(test, route_with_threshold(scores[name], calibrations[name]["threshold"]), name)
        row.update(validation_apgr=val_apgr[name], served_correct=served["correct"],
                   served_large_share=served["large_share"], served_savings_vs_large=served["savings_vs_large"],
                   threshold=calibrations[name]["threshold"])
        rows.append(row)
        per_query = per_query.assign(**{f"{name}_policy": dec["policy"].values, f"{name}_p_complex": scores[name]})
    rows.append(summarise(test, np.full(len(test), "medium"), "always-medium"))
    rows.append(summarise(test, np.full(len(test), "large"), "always-large"))
    curves["oracle"] = curve(test, oracle_scores(test))
    rows.append({**summarise(test, policy_tiers(oracle, ambiguous), "oracle"), **curve_stats(curves["oracle"]),
                 "policy_accuracy": 1.0, **{f"mix_{p}": v for p, v in policy_mix(oracle).items()}})
    randoms = random_curves(test, random_seeds, seed)
    rng = np.random.default_rng(seed)
    draws = [summarise(test, rng.choice(list(TIERS), len(test)), "") for _ in range(random_seeds)]
    rows.append({**{k: float(np.mean([d[k] for d in draws])) for k in draws[0] if k != "router"},
                 "router": f"random (mean of {random_seeds})", **curve_stats(randoms)})
    curves["random (mean)"] = _mean_curve(randoms)
    summary = pd.DataFrame(rows)
    names = list(candidates)
    intervals = pd.DataFrame([{"a": a, "b": b, **paired_bootstrap(test, scores[a], scores[b], resamples=resamples,
                                                                   seed=seed)}
                              for i, a in enumerate(names) for b in names[i + 1:]],
                             columns=["a", "b", "diff", "lo", "hi", "resamples"])
    chosen_dec = aligned(candidates[chosen][0], test)
    routed_ = routed(test, policy_tiers(chosen_dec["policy"], ambiguous))
    per_query = per_query.assign(candidate=chosen, policy=chosen_dec["policy"].values, p_complex=scores[chosen],
                                 tier=routed_["tier"].values, label=routed_["label"].values,
                                 routed_cost_usd=routed_["cost_usd"].values)
    random_apgr = float(summary.loc[summary["router"].str.startswith("random"), "apgr"].iloc[0])
    return Report(per_query, summary, confusion(oracle, list(chosen_dec["policy"])), curves, calibrations,
                  random_apgr, chosen, why, intervals)


def interval_between(intervals: pd.DataFrame, a: str, b: str) -> dict | None:
    """APGR(a) - APGR(b) with its interval, whichever order the pair was computed in."""
    for _, r in intervals.iterrows():
        if (r["a"], r["b"]) == (a, b):
            return {"diff": r["diff"], "lo": r["lo"], "hi": r["hi"]}
        if (r["a"], r["b"]) == (b, a):
            return {"diff": -r["diff"], "lo": -r["hi"], "hi": -r["lo"]}
    return None


def _mean_curve(curves: list[Curve], points: int = 21) -> Curve:
    grid = np.linspace(0, 1, points)
    acc = np.mean([np.interp(grid, c.share, c.accuracy) for c in curves], axis=0)
    c0 = curves[0]
    return Curve(grid, acc, np.full(points, np.nan), c0.acc_medium, c0.acc_large)
