"""Cascades on the pool's splits: fitted on the training rows, chosen and their knob set on
the validation rows, scored on the test rows against the query-only pool router by the
cost-accuracy frontier (a query's cost: the sum over every model it called), with
paired-bootstrap intervals. What the ``pool_cascade`` asset reports.

The candidates (training/cascade.py): a learned cascade per plan (the k most accurate
models, cheapest first) and ridge strength, and the query-only router itself (every
query jumps to one model at step 0), one of them chosen by the AIQ of its knob sweep on
the validation rows; two fixed cascades (accept on agreement): the next two most
accurate models together else the most accurate, and the best of ``fixed_plans`` by the
training rows' AIQ (a fixed cascade fits nothing, so its training rows are fair). As
in benchmarks/cascade_quality.py, "cascade" is the learned cascade's knob settings with
the fixed cascades as further settings (each a point of the frontier).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from router_pipeline.evaluation import frontier as fr
from router_pipeline.routers.cascade import (
    Answers,
    FixedCascade,
    comparator_for,
    logit,
    read_answers,
)
from router_pipeline.routers.pool import Knob, decide, lambdas, pick
from router_pipeline.training.cascade import (
    Trace,
    cascade_knob,
    fit_cascade,
    fixed_plans,
    learned_plans,
    next_two_plan,
    replay,
)

MIN_TRAINING_ROWS = 50  # fewer: the learned cascade's cross-fitted heads have too little to read
MIN_HELD_ROWS = 2  # validation and test rows each
CASCADE_RULE = "cascade_not_below_query_only"
CASCADE_RULE_DESCRIPTION = ("The cascade's test AIQ is not below the query-only pool router's beyond noise: the "
                            "upper end of the paired interval of cascade minus query-only AIQ is not below 0.")
QUERY_ONLY = "query-only router"
RELEASE_RULE = "served_cascade_not_below_query_only"
RELEASE_RULE_DESCRIPTION = ("The cascade served by default (the fixed plan best on the training rows, when the "
                            "released knob picks it over the query-only router on the validation rows) is not less "
                            "accurate than that router on the test rows beyond noise; when it is, it is not served "
                            "by default.")


def answer_columns(frame: pd.DataFrame, models: list[str]) -> list[str]:
    """The models whose ``<model>_answer`` column records at least one answer."""
    return [m for m in models if m + "_answer" in frame and frame[m + "_answer"].notna().any()]


def release_skip_reason(train, validation, test, models: list[str]) -> str | None:
    """Why no fixed cascade can be chosen and checked on these splits (``Outcomes``), or None."""
    frame = pd.concat([train.frame, validation.frame, test.frame], ignore_index=True)
    answered = answer_columns(frame, models)
    if len(answered) < 2:
        return (f"answers recorded for {answered or 'no model'}: a cascade compares the answers of at least two "
                "models (<model>_answer columns)")
    for name, split in (("training", train), ("validation", validation), ("test", test)):
        if len(split.frame) < MIN_HELD_ROWS:
            return f"{len(split.frame)} {name} rows: at least {MIN_HELD_ROWS} are needed"
    return None


def skip_reason(train, validation, test, models: list[str]) -> str | None:
    """Why no learned cascade can be fitted and scored on these splits, or None."""
    if reason := release_skip_reason(train, validation, test, models):
        return reason
    if len(train.frame) < MIN_TRAINING_ROWS:
        return f"{len(train.frame)} training rows: the learned cascade needs at least {MIN_TRAINING_ROWS}"
    return None


@dataclass
class Rows:
    """One split as the cascades read it."""

    correct: np.ndarray  # (rows, models) booleans
    cost: np.ndarray  # (rows, models) USD per call
    p: np.ndarray  # the query-only router's P(correct) per (row, model)
    answers: Answers


@dataclass
class CascadeReport:
    comparator: str
    chosen: dict  # the learned recipe (or the query-only router) and the fixed plans
    validation_aiq: dict  # learned recipe -> AIQ of its sweep on the validation rows
    table: pd.DataFrame  # a row per router on the test rows
    figures: dict  # the headline figures (plain floats and strings)
    intervals: pd.DataFrame  # cascade minus each other router (AIQ), paired bootstrap
    curves: dict  # name -> frontier.Curve on the test rows
    verdict: tuple = field(default=(True, ""))  # (passed, note) of CASCADE_RULE


def rows_of(outcomes, p: np.ndarray, models: list[str], comparator: str) -> Rows:
    raw = np.stack([outcomes.frame[m + "_answer"].to_numpy(object) if m + "_answer" in outcomes.frame
                    else np.full(len(outcomes.frame), None, dtype=object) for m in models], axis=1)
    return Rows(outcomes.correct, outcomes.cost, np.asarray(p, float), read_answers(raw, comparator))


def comparator_of(frames: list[pd.DataFrame], models: list[str]) -> str:
    raw = [f[m + "_answer"].to_numpy(object) for f in frames for m in models if m + "_answer" in f]
    return comparator_for(np.concatenate(raw) if raw else np.array([], dtype=object))


def agreement(rows: Rows, models: list[str]) -> pd.DataFrame:
    """Per pair of models with answers: the share of rows where they agree, and how often
    the agreed answer is right (each model graded alone: they gave the same answer)."""
    canon = rows.answers.canon
    readable = [i for i in range(len(models)) if (canon[:, i] != "").any()]
    out = []
    for n, a in enumerate(readable):
        for b in readable[n + 1:]:
            agree = (canon[:, a] == canon[:, b]) & (canon[:, a] != "")
            out.append({"models": f"{models[a]} + {models[b]}", "agree": float(agree.mean()),
                        "right_when_agreeing": float(rows.correct[agree, a].mean()) if agree.any() else float("nan")})
    return pd.DataFrame(out, columns=["models", "agree", "right_when_agreeing"])


def with_cheapest(right: np.ndarray, spent: np.ndarray, correct: np.ndarray, cost: np.ndarray) -> fr.Curve:
    """A cascade's points and the cheapest model alone (lambda infinity's point)."""
    cheapest = int(np.argmin(cost.mean(axis=0)))
    return fr.Curve(np.concatenate([right, correct[:, [cheapest]]], axis=1).astype(float),
                    np.concatenate([spent, cost[:, [cheapest]]], axis=1))


def _query_only(rows: Rows, costs: np.ndarray, sweep: np.ndarray) -> Trace:
    picks = np.stack([decide(rows.p, costs, lam) for lam in sweep], axis=1)
    index = np.arange(len(rows.p))[:, None]
    return Trace(rows.correct[index, picks], rows.cost[index, picks])


def _aiq(trace: Trace, rows: Rows) -> float:
    return fr.aiq(with_cheapest(trace.right, trace.cost, rows.correct, rows.cost), rows.cost)


def best_fixed(plans, train: Rows, costs: np.ndarray, comparator: str):
    """The plan whose fixed cascade has the best AIQ on the training rows (a fixed cascade
    fits nothing, so they are fair to choose on)."""
    return max(plans, key=lambda pl: _aiq(replay(FixedCascade(pl, costs, comparator), logit(train.p), train.answers,
                                                 train.correct, train.cost, np.zeros(1)), train))


def release_fixed(train: Rows, validation: Rows, test: Rows, models: list[str], costs: np.ndarray, knob: Knob,
                  lam: float, *, comparator: str, resamples: int = 1000, seed: int = 0) -> dict:
    """The cascade released with the router and the evidence for it. The plan: the best of
    ``fixed_plans`` (and the next-two plan) on the training rows. It is served by default
    when the released ``knob`` picks it on the validation rows over every point of the
    query-only router's sweep (``routers.pool.pick``: a budget, the most accurate within
    it; a quality, the cheapest reaching it; a lambda knob never picks it), never judged on
    the test rows, and withheld as a default when the test rows show it less accurate than
    the query-only router at ``lam`` beyond the paired interval (``RELEASE_RULE``)."""
    plan = best_fixed([next_two_plan(models, train.correct), *fixed_plans(models, train.correct)], train, costs,
                      comparator)
    policy = FixedCascade(plan, costs, comparator)

    def point(rows: Rows) -> tuple[Trace, Trace]:
        return (replay(policy, logit(rows.p), rows.answers, rows.correct, rows.cost, np.zeros(1)),
                _query_only(rows, costs, np.array([lam])))

    (cv, qv), (ct, qt) = point(validation), point(test)
    sweep = lambdas(costs)
    qs = _query_only(validation, costs, sweep)
    figures = [{"lambda": float(x), "accuracy": float(qs.right[:, i].mean()),
                "usd_per_1000": float(qs.cost[:, i].mean() * 1000)} for i, x in enumerate(sweep)]
    figures.append({"lambda": float("nan"), "accuracy": float(cv.right.mean()),
                    "usd_per_1000": float(cv.cost.mean() * 1000), "cascade": True})
    picked = bool(pick(figures, float(validation.correct.mean(axis=0).max()), knob).get("cascade"))
    weights = fr.resample_weights(len(test.correct), resamples, seed)
    d = ct.right[:, 0].astype(float) - qt.right[:, 0]
    diff = fr.interval(lambda w: float(d.mean() if w is None else w @ d / w.sum()), weights)
    worse = bool(np.isfinite(diff["hi"]) and diff["hi"] < 0)
    if not picked:
        why = (f"the knob ({knob.kind} {knob.value:g}) picks the query-only router over it on the validation rows: "
               "served when a profile asks for it (cascade: released)")
    elif worse:
        why = ("the knob picks it on the validation rows, but on the test rows it is less accurate than the query-only "
               "router beyond the interval: served only when a profile asks for it (cascade: released)")
    else:
        why = f"the knob ({knob.kind} {knob.value:g}) picks it over the query-only router on the validation rows"
    return {"plan": [[models[m] for m in step] for step in plan.steps], "describe": plan.describe(),
            "comparator": comparator, "default": picked and not worse, "worse_on_test": worse, "why": why,
            "lambda": float(lam),
            "validation": {"cascade_accuracy": float(cv.right.mean()), "cascade_usd_per_1000": float(cv.cost.mean() * 1000),
                           "query_only_accuracy": float(qv.right.mean()),
                           "query_only_usd_per_1000": float(qv.cost.mean() * 1000), "rows": len(cv.right)},
            "test": {"cascade_accuracy": float(ct.right.mean()), "cascade_usd_per_1000": float(ct.cost.mean() * 1000),
                     "query_only_accuracy": float(qt.right.mean()),
                     "query_only_usd_per_1000": float(qt.cost.mean() * 1000), "rows": len(ct.right),
                     "accuracy_difference": float(diff["diff"]), "accuracy_difference_lo": float(diff["lo"]),
                     "accuracy_difference_hi": float(diff["hi"])}}


def evaluate_cascade(train: Rows, validation: Rows, test: Rows, models: list[str], costs: np.ndarray, knob: Knob, *,
                     comparator: str = "letter", alphas=(10.0, 100.0, 1000.0), folds: int = 5,
                     resamples: int = 1000, seed: int = 0, log=print) -> CascadeReport:
    """Fit on ``train``, choose on ``validation``, score on ``test``; ``costs``: the
    query-only router's expected cost per model (its training rows')."""
    sweep = lambdas(costs)
    q = {name: logit(r.p) for name, r in (("train", train), ("validation", validation), ("test", test))}
    recipes = {QUERY_ONLY: (None, _aiq(_query_only(validation, costs, sweep), validation))}
    for plan in learned_plans(models, train.correct, costs):
        for alpha in alphas:
            policy, _ = fit_cascade(plan, q["train"], train.answers, train.correct, train.cost, sweep,
                                    comparator=comparator, folds=folds, seed=seed, alpha=alpha)
            aiq = _aiq(replay(policy, q["validation"], validation.answers, validation.correct, validation.cost,
                              sweep), validation)
            recipes[f"{plan.describe()}, alpha {alpha:g}"] = (policy, aiq)
            log(f"learned cascade {plan.describe()}, alpha {alpha:g}: validation AIQ {aiq:.4f}")
    recipe = max(recipes, key=lambda n: recipes[n][1])  # ties: the query-only router (first)
    policy = recipes[recipe][0]
    learned = _query_only(test, costs, sweep) if policy is None else \
        replay(policy, q["test"], test.answers, test.correct, test.cost, sweep)
    traces = {"learned cascade": learned}
    chosen = {"learned": recipe}
    for name, plans in (("fixed: next two agree, else best", [next_two_plan(models, train.correct)]),
                        ("fixed: best on training rows", fixed_plans(models, train.correct))):
        if not plans:  # two models: no plan asks two together before the most accurate
            continue
        best = best_fixed(plans, train, costs, comparator)
        traces[name] = replay(FixedCascade(best, costs, comparator), q["test"], test.answers, test.correct, test.cost,
                              sweep[:1])
        chosen[name] = best.describe()
    cascade = with_cheapest(np.concatenate([t.right for t in traces.values()], axis=1),
                            np.concatenate([t.cost for t in traces.values()], axis=1), test.correct, test.cost)
    curves = {"cascade": cascade,
              **{n: with_cheapest(t.right, t.cost, test.correct, test.cost) for n, t in traces.items()},
              QUERY_ONLY: fr.curve(np.stack([decide(test.p, costs, lam) for lam in sweep], axis=1), test.correct,
                                   test.cost),
              "random mix": fr.random_mix(test.correct, test.cost),
              "oracle": fr.oracle(test.correct, test.cost, sweep)}
    curves.update(zip(models, fr.singles(test.correct, test.cost)))

    if policy is None:
        lam, point = float("nan"), {"accuracy": float("nan"), "usd_per_1000": float("nan")}
    else:
        lam = cascade_knob(policy, q["validation"], validation.answers, validation.correct, validation.cost,
                           knob)["lambda"]
        at = replay(policy, q["test"], test.answers, test.correct, test.cost, np.array([lam]))
        point = {"accuracy": float(at.right.mean()), "usd_per_1000": float(at.cost.mean() * 1000)}

    acc, mean_cost = test.correct.mean(axis=0), test.cost.mean(axis=0)
    best = int(np.argmax(acc))
    best_acc, best_cost = float(acc[best]), float(mean_cost[best])
    rng = fr.cost_range(test.cost)
    table = []
    for name, c in curves.items():
        f = c.frontier()
        table.append({"router": name, "aiq": f.aiq(rng.lo, rng.hi), "accuracy_at_half_best_cost": f.accuracy_at(
            best_cost / 2), "accuracy_at_best_cost": f.accuracy_at(best_cost),
            "cost_at_best_accuracy_ratio": f.cost_at(best_acc) / best_cost})
    weights = fr.resample_weights(len(test.correct), resamples, seed)

    def wmean(w, v):
        return v.mean() if w is None else w @ v / w.sum()

    intervals = pd.DataFrame([{"router": "cascade", "minus": other, **fr.interval(
        lambda w, o=other: fr.aiq(cascade, test.cost, w) - fr.aiq(curves[o], test.cost, w), weights)}
        for other in curves if other not in ("cascade", "oracle")])
    at_cost = fr.interval(lambda w: cascade.frontier(w).accuracy_at(wmean(w, test.cost[:, best]))
                          - wmean(w, test.correct[:, best]), weights)
    vs = intervals.set_index("minus").loc[QUERY_ONLY]
    f = cascade.frontier()
    figures = {
        "cascade_aiq": fr.aiq(cascade, test.cost), "query_only_aiq": fr.aiq(curves[QUERY_ONLY], test.cost),
        "cascade_minus_query_only_aiq": float(vs["diff"]), "cascade_minus_query_only_aiq_lo": float(vs["lo"]),
        "cascade_minus_query_only_aiq_hi": float(vs["hi"]),
        "best_single_model": models[best], "best_single_accuracy": best_acc,
        "best_single_usd_per_1000": best_cost * 1000,
        "cascade_accuracy_at_best_single_cost": f.accuracy_at(best_cost),
        "cascade_minus_best_single_at_its_cost": float(at_cost["diff"]),
        "cascade_minus_best_single_at_its_cost_lo": float(at_cost["lo"]),
        "cascade_minus_best_single_at_its_cost_hi": float(at_cost["hi"]),
        "cascade_cost_at_best_single_accuracy_ratio": f.cost_at(best_acc) / best_cost,
        "cascade_accuracy_at_half_best_single_cost": f.accuracy_at(best_cost / 2),
        "learned_lambda": lam, "learned_test_accuracy_at_lambda": point["accuracy"],
        "learned_test_usd_per_1000_at_lambda": point["usd_per_1000"],
    }
    below = bool(np.isfinite(vs["hi"]) and vs["hi"] < 0)
    note = (f"cascade minus query-only AIQ {vs['diff']:+.4f} [{vs['lo']:+.4f}, {vs['hi']:+.4f}]: below it beyond "
            "the interval" if below else "")
    return CascadeReport(comparator, chosen, {n: v for n, (_, v) in recipes.items()}, pd.DataFrame(table), figures,
                         intervals, curves, (not below, note))
