"""Cascades on the pool's splits: fitted on the training rows, chosen on the validation
rows, scored on the test rows against the query-only pool router by the cost-accuracy
frontier (a query's cost: the sum over every model it called), with paired-bootstrap
intervals. What the ``pool_cascade`` asset reports and releases.

The candidates (``candidates``): the query-only router itself (every query jumps to one
model at step 0); learned cascades (training/cascade.py), one per plan (the k most
accurate models, cheapest first; the next two together before the most accurate) and
ridge strength; two fixed cascades (accept on agreement): the next two most accurate
models together else the most accurate, and the best of ``fixed_plans`` by the training
rows' AIQ (a fixed cascade fits nothing, so its training rows are fair). **The cascade**
is one policy with one knob: at each value of lambda, the candidate (the router, every
learned recipe, the fixed cascades) with the best accuracy - lambda x cost on the
validation rows (``choose``). The released knob's lambda
names the candidate that is served (``release``); the test rows only judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from router_pipeline.evaluation import frontier as fr
from router_pipeline.routers.cascade import (
    Answers,
    FixedCascade,
    classes,
    comparator_for,
    logit,
    read_answers,
)
from router_pipeline.routers.pool import decide, lambdas
from router_pipeline.training.cascade import (
    Trace,
    fit_cascade,
    fixed_plans,
    learned_plans,
    next_two_plan,
    replay,
    select,
    selected,
)

MIN_TRAINING_ROWS = 50  # fewer: the learned cascade's cross-fitted heads have too little to read
MIN_HELD_ROWS = 2  # validation and test rows each
CASCADE_RULE = "cascade_not_below_query_only"
CASCADE_RULE_DESCRIPTION = ("The cascade's test AIQ is not below the query-only pool router's beyond noise: the "
                            "upper end of the paired interval of cascade minus query-only AIQ is not below 0.")
QUERY_ONLY = "query-only router"
LEARNED = "learned cascade"
FIXED_NEXT_TWO = "fixed: next two agree, else best"
FIXED_BEST = "fixed: best on training rows"
RELEASE_RULE = "served_cascade_not_below_query_only"
COMPARATOR_CHOICES = ("auto", "text", "judge")  # PoolCascadeConfig.comparator
RELEASE_RULE_DESCRIPTION = ("The cascade served by default (the candidate the validation rows choose at the released "
                            "knob's lambda) is not less accurate than the query-only router at that lambda on the test "
                            "rows beyond noise; when it is, it is not served by default.")


def answer_columns(frame: pd.DataFrame, models: list[str]) -> list[str]:
    """The models whose ``<model>_answer`` column records at least one answer."""
    return [m for m in models if m + "_answer" in frame and frame[m + "_answer"].notna().any()]


def release_skip_reason(train, validation, test, models: list[str]) -> str | None:
    """Why no cascade can be chosen and checked on these splits (``Outcomes``), or None."""
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
    chosen: dict  # the candidates (learned recipe, fixed plans) and how many knob values each won
    table: pd.DataFrame  # a row per router on the test rows
    figures: dict  # the headline figures (plain floats and strings)
    intervals: pd.DataFrame  # cascade minus each other router (AIQ), paired bootstrap
    curves: dict  # name -> frontier.Curve on the test rows
    verdict: tuple = field(default=(True, ""))  # (passed, note) of CASCADE_RULE


def raw_answers(outcomes, models: list[str]) -> np.ndarray:
    """(rows, models) what each model answered (None where not recorded)."""
    return np.stack([outcomes.frame[m + "_answer"].to_numpy(object) if m + "_answer" in outcomes.frame
                     else np.full(len(outcomes.frame), None, dtype=object) for m in models], axis=1)


def rows_of(outcomes, p: np.ndarray, models: list[str], comparator: str, judge=None) -> Rows:
    """A split as the cascades read it; with ``judge`` (a ``SameAnswerJudge``) free-text
    answers agree as the judge says (``judged_answers``), else as ``comparator`` says."""
    raw = raw_answers(outcomes, models)
    answers = (judged_answers(outcomes.frame["query"].tolist(), raw, judge) if judge is not None and
               comparator == "text" else read_answers(raw, comparator))
    return Rows(outcomes.correct, outcomes.cost, np.asarray(p, float), answers)


def comparator_of(frames: list[pd.DataFrame], models: list[str]) -> str:
    raw = [f[m + "_answer"].to_numpy(object) for f in frames for m in models if m + "_answer" in f]
    return comparator_for(np.concatenate(raw) if raw else np.array([], dtype=object))


def check_comparator(configured: str) -> None:
    """ValueError, saying what each is, for a name outside ``COMPARATOR_CHOICES``."""
    if configured not in COMPARATOR_CHOICES:
        raise ValueError(f"unknown comparator {configured!r}; expected one of {', '.join(COMPARATOR_CHOICES)} (auto "
                         "or text: choice letters when every answer is one, else normalised text; judge: the LLM "
                         "judge compares free-text answers, paid)")


def choose_comparator(configured: str, frames: list[pd.DataFrame], models: list[str]) -> tuple[str, bool, str]:
    """(comparator the answers are read with, whether the judge compares free text, why)
    for ``PoolCascadeConfig.comparator``: where every recorded answer is one choice letter
    the letters are compared exactly, whatever is configured (no judge is needed, and
    normalised text would drop the choice "A" as an article); otherwise free text, by
    normalised match ("auto", "text") or by the judge ("judge"). ValueError for a name
    outside ``COMPARATOR_CHOICES``."""
    check_comparator(configured)
    if comparator_of(frames, models) == "letter":
        why = "every recorded answer is a choice letter: compared exactly"
        return "letter", False, why + (", no judge needed (cost 0)" if configured == "judge" else "")
    if configured == "judge":
        return "text", True, ("free text: answers normalised-equal agree without a call, any other pair as the judge "
                              "says (a failed or unreadable verdict: they disagree)")
    return "text", False, "free text: answers agree when normalised-equal (text.normalise)"


class _Undecided(Exception):
    """A pair the judge has not decided yet (its key in ``args[0]``)."""


def judged_answers(questions: list[str], raw: np.ndarray, judge) -> Answers:
    """``Answers`` whose ``canon`` are agreement classes (routers/cascade.py ``classes``)
    with the judge deciding free-text pairs that do not match once normalised. The pairs
    are asked in rounds, all rows' at once (one run of calls, concurrent and cached): each
    round asks every row's first undecided pair, so no pair is asked that ``classes`` does
    not need (at most one round per pair of models)."""
    raw = np.asarray(raw, dtype=object)
    canon = np.empty(raw.shape, dtype=object)
    todo = list(range(len(raw)))
    while todo:
        wanted, later = {}, []
        for r in todo:
            def same(a, b, q=questions[r]):
                key = judge.pair(q, a, b)
                if key not in judge.verdicts:
                    raise _Undecided(key)
                return bool(judge.verdicts[key])

            try:
                canon[r] = classes(raw[r], same)
            except _Undecided as undecided:
                wanted[undecided.args[0]] = None
                later.append(r)
        judge.ask(list(wanted))
        todo = later
    return Answers(canon, read_answers(raw, "text").length)


def agreement(rows: Rows, models: list[str], normalised: Answers | None = None) -> pd.DataFrame:
    """Per pair of models with answers: the share of rows where they agree, and how often
    the agreed answer is right (each model graded alone: they gave the same answer).
    ``normalised``: the same rows' answers by normalised text, where a judge compared
    them: the share that agree by normalised text alone beside (what the judge added)."""
    canon = rows.answers.canon
    readable = [i for i in range(len(models)) if (canon[:, i] != "").any()]
    out = []
    for n, a in enumerate(readable):
        for b in readable[n + 1:]:
            agree = (canon[:, a] == canon[:, b]) & (canon[:, a] != "")
            out.append({"models": f"{models[a]} + {models[b]}", "agree": float(agree.mean()),
                        "right_when_agreeing": float(rows.correct[agree, a].mean()) if agree.any() else float("nan")})
            if normalised is not None:
                text = normalised.canon
                out[-1]["agree_by_normalised_text"] = float(((text[:, a] == text[:, b]) & (text[:, a] != "")).mean())
    columns = ["models", "agree", "right_when_agreeing"] + (["agree_by_normalised_text"] if normalised is not None else [])
    return pd.DataFrame(out, columns=columns)


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


def candidates(train: Rows, validation: Rows, models: list[str], costs: np.ndarray, *, comparator: str,
               learned: bool = True, alphas=(10.0, 100.0, 1000.0), folds: int = 5, seed: int = 0,
               log=print) -> tuple[dict, dict]:
    """name -> policy (None: the query-only router), and each learned recipe's validation
    AIQ. The learned recipes (plan, ridge strength) are candidates each, the one of best
    validation AIQ named ``LEARNED``, the others ``learned: <recipe>``. ``learned``:
    whether learned cascades are fitted (too few training rows: not)."""
    sweep = lambdas(costs)
    recipes = {}
    for plan in learned_plans(models, train.correct, costs) if learned else []:
        for alpha in alphas:
            policy, _ = fit_cascade(plan, logit(train.p), train.answers, train.correct, train.cost, sweep,
                                    comparator=comparator, folds=folds, seed=seed, alpha=alpha)
            aiq = _aiq(trace_of(policy, validation, costs), validation)
            recipes[f"{plan.describe()}, alpha {alpha:g}"] = (policy, aiq)
            log(f"learned cascade {plan.describe()}, alpha {alpha:g}: validation AIQ {aiq:.4f}")
    best = max(recipes, key=lambda n: recipes[n][1], default=None)
    policies: dict = {QUERY_ONLY: None}
    policies.update({LEARNED if n == best else f"learned: {n}": policy for n, (policy, _) in recipes.items()})
    policies[FIXED_NEXT_TWO] = FixedCascade(next_two_plan(models, train.correct), costs, comparator)
    if plans := fixed_plans(models, train.correct):  # two models: no plan asks two before the most accurate
        policies[FIXED_BEST] = FixedCascade(best_fixed(plans, train, costs, comparator), costs, comparator)
    return policies, {QUERY_ONLY: _aiq(_query_only(validation, costs, sweep), validation),
                      **{n: v for n, (_, v) in recipes.items()}}


def trace_of(policy, rows: Rows, costs: np.ndarray, lams: np.ndarray | None = None) -> Trace:
    """What a candidate does on ``rows`` at each lambda (a fixed cascade: one column)."""
    lams = lambdas(costs) if lams is None else np.asarray(lams, float)
    if policy is None:
        return _query_only(rows, costs, lams)
    return replay(policy, logit(rows.p), rows.answers, rows.correct, rows.cost,
                  lams[:1] if isinstance(policy, FixedCascade) else lams)


def choose(policies: dict, validation: Rows, costs: np.ndarray) -> np.ndarray:
    """Per lambda of ``lambdas(costs)``, the index in ``policies`` of the candidate with the
    best accuracy - lambda x cost on the validation rows."""
    return select([trace_of(p, validation, costs) for p in policies.values()], lambdas(costs))


def release(policies: dict, validation: Rows, test: Rows, models: list[str], costs: np.ndarray, lam: float,
            budget: float | None = None, *, resamples: int = 1000, seed: int = 0) -> dict:
    """The cascade released with the router and the evidence for it. At the released
    knob's ``lam`` the validation rows choose a candidate as ``choose`` does (with a
    ``budget``, USD per 1,000 queries, among those within it on those rows: a budgeted
    cascade is never served by default above its budget there): a cascade there is
    served by default, unless the test rows show it less accurate than the query-only
    router at ``lam`` beyond the paired interval (``RELEASE_RULE``). Where the query-only
    router is chosen (or nothing fits the budget), the best fixed cascade is released all
    the same, served only where a profile asks for it. ``policy`` in the result: what to
    save."""
    names = list(policies)
    traces = [trace_of(p, validation, costs, np.array([lam])) for p in policies.values()]
    within = [i for i, t in enumerate(traces) if budget is None or t.cost.mean() * 1000 <= budget] or [0]
    at = names[within[int(select([traces[i] for i in within], np.array([lam]))[0])]]
    name = at if at != QUERY_ONLY else (FIXED_BEST if FIXED_BEST in policies else FIXED_NEXT_TWO)
    policy = policies[name]
    point = {s: (trace_of(policy, rows, costs, np.array([lam])), _query_only(rows, costs, np.array([lam])))
             for s, rows in (("validation", validation), ("test", test))}
    (ct, qt) = point["test"]
    weights = fr.resample_weights(len(test.correct), resamples, seed)
    d = ct.right[:, 0].astype(float) - qt.right[:, 0]
    diff = fr.interval(lambda w: float(d.mean() if w is None else w @ d / w.sum()), weights)
    worse = bool(at != QUERY_ONLY and np.isfinite(diff["hi"]) and diff["hi"] < 0)
    if at == QUERY_ONLY:
        why = (f"at the released lambda ({lam:.4g}) the validation rows choose the query-only router: served when a "
               "profile asks for it (cascade: released)")
    elif worse:
        why = (f"the validation rows choose it at the released lambda ({lam:.4g}), but on the test rows it is less "
               "accurate than the query-only router beyond the interval: served only when a profile asks for it")
    else:
        why = f"the validation rows choose it at the released lambda ({lam:.4g}) over the query-only router"

    def figures(s: str) -> dict:
        c, q = point[s]
        return {"cascade_accuracy": float(c.right.mean()), "cascade_usd_per_1000": float(c.cost.mean() * 1000),
                "query_only_accuracy": float(q.right.mean()), "query_only_usd_per_1000": float(q.cost.mean() * 1000),
                "rows": len(c.right)}

    return {"policy": policy, "candidate": name, "kind": "fixed" if isinstance(policy, FixedCascade) else "learned",
            "plan": [[models[m] for m in step] for step in policy.plan.steps], "describe": policy.plan.describe(),
            "comparator": policy.comparator, "default": at != QUERY_ONLY and not worse, "worse_on_test": worse,
            "why": why, "lambda": float(lam), "validation": figures("validation"),
            "test": {**figures("test"), "accuracy_difference": float(diff["diff"]),
                     "accuracy_difference_lo": float(diff["lo"]), "accuracy_difference_hi": float(diff["hi"])}}


def evaluate_cascade(policies: dict, choice: np.ndarray, test: Rows, models: list[str], costs: np.ndarray, *,
                     resamples: int = 1000, seed: int = 0) -> CascadeReport:
    """Every candidate and the cascade (``choice`` per lambda) on the test rows, beside the
    query-only router, each single model, the random mix and the oracle."""
    sweep = lambdas(costs)
    traces = {name: trace_of(p, test, costs) for name, p in policies.items()}
    chosen_trace = selected(list(traces.values()), choice)
    cascade = with_cheapest(chosen_trace.right, chosen_trace.cost, test.correct, test.cost)
    curves = {"cascade": cascade,
              **{n: with_cheapest(t.right, t.cost, test.correct, test.cost) for n, t in traces.items()
                 if n != QUERY_ONLY and not n.startswith("learned: ")},
              QUERY_ONLY: fr.curve(np.stack([decide(test.p, costs, lam) for lam in sweep], axis=1), test.correct,
                                   test.cost),
              "random mix": fr.random_mix(test.correct, test.cost),
              "oracle": fr.oracle(test.correct, test.cost, sweep)}
    curves.update(zip(models, fr.singles(test.correct, test.cost)))
    kinds = ["learned" if n == LEARNED or n.startswith("learned: ") else n for n in policies]
    won = {k: int(sum(kinds[i] == k for i in choice)) for k in dict.fromkeys(kinds)}
    chosen = {**{n: p.plan.describe() for n, p in policies.items() if n in (LEARNED, FIXED_NEXT_TWO, FIXED_BEST)},
              "knob values won on the validation rows": won}

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
    }
    below = bool(np.isfinite(vs["hi"]) and vs["hi"] < 0)
    note = (f"cascade minus query-only AIQ {vs['diff']:+.4f} [{vs['lo']:+.4f}, {vs['hi']:+.4f}]: below it beyond "
            "the interval" if below else "")
    return CascadeReport(chosen, pd.DataFrame(table), figures, intervals, curves, (not below, note))
