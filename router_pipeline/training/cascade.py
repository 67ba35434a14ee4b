"""Fitting a learned cascade on training rows, and replaying any cascade on recorded
outcomes (every model's answer, grade and cost per row) at every value of the knob.

The heads are fitted by backward induction over the plan's steps, cross-fitted on the
training rows. After each step k, a head per model gives P(correct | state) (logistic
on the state features, Platt-calibrated on its out-of-fold scores: ``fit_pool_head`` /
``fit_platt``). The out-of-fold decisions after the last step are replayed to each
row's realised return (right - lambda x the cost of the calls made after step k; the
heads' own P in place of "right" was tried: the max over several estimates is biased
up, and the policy then goes on where it does not pay); the step before learns by ridge regression how much that return beats its best stop (on the
state features and its heads' P), one output per lambda, and so on back to step 0. Decisions made with out-of-fold heads keep the returns honest: a head
never judges the rows it was fitted on, and the out-of-fold trace scores a plan on the
training rows without reading a test row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from router_pipeline.routers.cascade import (
    GO_ON,
    Answers,
    LearnedCascade,
    Linear,
    Plan,
    choose,
    gain_features,
    make_plan,
    priced,
    state_features,
    stop_utility,
)
from router_pipeline.training.pool import fit_platt, fit_pool_head, inner_folds


@dataclass
class Trace:
    """What a cascade did on recorded rows, per (row, lambda)."""

    right: np.ndarray  # whether the answer it stopped with was right
    cost: np.ndarray  # USD: the sum over every model it called


def _walk(plan: Plan, codes: list, correct: np.ndarray, cost: np.ndarray, start: int) -> Trace:
    """The outcome of following ``codes[k]`` (rows, lambdas) from step ``start`` on, the
    cost counting the calls made after ``start`` only."""
    rows = np.arange(len(correct))[:, None]
    out = None
    for k in reversed(range(start, len(plan.steps) + 1)):
        code = codes[k]
        stop = np.where(code == GO_ON, 0, code)
        here = Trace(correct[rows, stop], np.where(np.isin(stop, plan.called(k)), 0.0, cost[rows, stop]))
        if out is not None:
            go = code == GO_ON
            step_cost = cost[:, list(plan.steps[k])].sum(axis=1)[:, None]
            here = Trace(np.where(go, out.right, here.right), np.where(go, step_cost + out.cost, here.cost))
        out = here
    return out


def replay(
    policy, q_logit: np.ndarray, answers: Answers, correct: np.ndarray, cost: np.ndarray, lams: np.ndarray
) -> Trace:
    """What ``policy`` (a LearnedCascade or a FixedCascade) does on recorded rows at each
    lambda. The file holds every model's answer, but each step's decision reads only the
    models called by then (``state_features``)."""
    codes = [policy.decide(k, q_logit, answers, lams) for k in range(len(policy.plan.steps) + 1)]
    return _walk(policy.plan, codes, np.asarray(correct, bool), np.asarray(cost, float), 0)


def _fit_p(x: np.ndarray, correct: np.ndarray, models: list[str], fold_of: np.ndarray, c: float, seed: int):
    """A calibrated logistic head per model, and its calibrated out-of-fold P on ``x``."""
    costs = np.zeros(len(models))  # the heads' own costs are not read: the policy holds them
    oof = np.zeros(correct.shape)
    for f in np.unique(fold_of):
        held = fold_of == f
        oof[held] = fit_pool_head("logistic", x[~held], correct[~held], costs, models, c=c, seed=seed).scores(x[held])
    head = fit_platt(fit_pool_head("logistic", x, correct, costs, models, c=c, seed=seed), oof, correct)
    return head, head.calibrated(oof)


def _fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> Linear:
    from sklearn.linear_model import Ridge

    from router_pipeline.training.heads import standardise

    z, mean, scale = standardise(np.asarray(x, float))
    fit = Ridge(alpha=alpha).fit(z, y)
    return Linear(mean, scale, np.atleast_2d(fit.coef_), np.atleast_1d(fit.intercept_))


def fit_cascade(
    plan: Plan,
    q_logit: np.ndarray,
    answers: Answers,
    correct: np.ndarray,
    cost: np.ndarray,
    lams: np.ndarray,
    *,
    comparator: str = "letter",
    folds: int = 5,
    seed: int = 0,
    c: float = 1.0,
    alpha: float = 10.0,
    fold_of: np.ndarray | None = None,
) -> tuple[LearnedCascade, Trace]:
    """A learned cascade over ``plan`` from training rows only, with its out-of-fold trace
    on those rows (to choose a plan or a knob without test rows). ``q_logit``: the
    query-only router's out-of-fold log-odds on these rows; ``correct``, ``cost``: (rows,
    models) outcomes. The features read the answers of the models the rows record.
    ``fold_of``: the cross-fitting folds (default: ``folds`` random ones; whole domains
    when the policy must hold on domains it never saw)."""
    models = list(plan.models)
    correct, cost = np.asarray(correct, bool), np.asarray(cost, float)
    costs = cost.mean(axis=0)
    readable = (answers.canon != "").any(axis=0)
    steps = len(plan.steps)
    fold_of = inner_folds(len(correct), folds, seed) if fold_of is None else np.asarray(fold_of)
    x = [state_features(q_logit, answers, plan, k, readable) for k in range(steps + 1)]
    p_heads, p_oof = [], [np.exp(-np.logaddexp(0.0, -q_logit))]
    for k in range(1, steps + 1):
        head, oof = _fit_p(x[k], correct, models, fold_of, c, seed)
        p_heads.append(head)
        p_oof.append(oof)
    codes: list = [None] * (steps + 1)
    codes[steps] = choose(p_oof[steps], plan.called(steps), costs, lams)
    go_on: list = [None] * steps
    finite = np.where(np.isinf(lams), 0.0, lams)  # lambda infinity never goes on: its column is unused
    for k in reversed(range(steps)):
        after = _walk(plan, codes, correct, cost, k + 1)
        best_stop = stop_utility(p_oof[k], plan.called(k), costs, lams).max(axis=2)
        # The gain over stopping now is learnt, not the return itself: most of the return's
        # spread across rows is the P of stopping, which the heads already give.
        target = np.where(np.isinf(lams), 0.0, after.right - finite[None, :] * after.cost - best_stop)
        xk = gain_features(x[k], p_oof[k])
        oof = np.zeros(target.shape)
        for f in np.unique(fold_of):
            held = fold_of == f
            oof[held] = _fit_ridge(xk[~held], target[~held], alpha)(xk[held])
        go_on[k] = _fit_ridge(xk, target, alpha)
        codes[k] = choose(p_oof[k], plan.called(k), costs, lams, oof - priced(lams, costs[list(plan.steps[k])].sum()))
    policy = LearnedCascade(plan, costs, np.asarray(lams, float), p_heads, go_on, readable, comparator)
    return policy, _walk(plan, codes, correct, cost, 0)


def select(traces: list[Trace], lams: np.ndarray) -> np.ndarray:
    """Per lambda, the index of the trace (each a candidate's, on rows none of them was
    fitted on) with the best mean of right - lambda x cost; at lambda infinity the
    cheapest. Ties: the cheaper, then the earlier candidate. A trace of one column (a
    fixed cascade: the same at every lambda) counts at every lambda."""
    lams = np.asarray(lams, float)
    acc = np.stack([np.broadcast_to(t.right.mean(axis=0), lams.shape) for t in traces])  # (candidates, lambdas)
    spent = np.stack([np.broadcast_to(t.cost.mean(axis=0), lams.shape) for t in traces])
    utility = np.where(np.isinf(lams), -spent, acc - np.where(np.isinf(lams), 0.0, lams) * spent)
    return np.array([np.lexsort((spent[:, i], -utility[:, i]))[0] for i in range(len(lams))], dtype=int)


def selected(traces: list[Trace], choice: np.ndarray) -> Trace:
    """The trace of following candidate ``choice[i]`` at the i-th lambda (a one-column
    trace is the same at every lambda)."""
    def column(t: Trace, i: int, which: str) -> np.ndarray:
        a = getattr(t, which)
        return a[:, min(i, a.shape[1] - 1)]

    return Trace(*(np.stack([column(traces[c], i, w) for i, c in enumerate(choice)], axis=1)
                   for w in ("right", "cost")))


# -- candidate plans -------------------------------------------------------------
# Chosen from the training rows' accuracies and costs only (benchmarks/cascade_quality.py
# and the pool_cascade asset both read them).


def learned_plans(models, correct, costs) -> list[Plan]:
    """The k most accurate models, cheapest first, for k = 2 .. all; and the next two
    together before the most accurate (the fixed rule's plan, where a learned policy may
    also read how sure each answer is)."""
    by_acc = np.argsort(-np.asarray(correct).mean(axis=0), kind="stable")
    plans = [
        make_plan([models[m] for m in sorted(by_acc[:k], key=lambda m: costs[m])], models)
        for k in range(2, len(models) + 1)
    ]
    together = next_two_plan(models, correct)
    return plans + ([together] if len(models) > 2 and together not in plans else [])


def next_two_plan(models, correct) -> Plan:
    """The second and third most accurate models together, else the most accurate."""
    best, second, third = (list(np.argsort(-np.asarray(correct).mean(axis=0), kind="stable")) + [None])[:3]
    first = [models[m] for m in (second, third) if m is not None]
    return make_plan([first, models[best]], models)


def fixed_plans(models, correct) -> list[Plan]:
    """Every "two or three models together, perhaps one more, else the most accurate"."""
    best = int(np.argmax(np.asarray(correct).mean(axis=0)))
    rest = [m for m in range(len(models)) if m != best]
    plans = []
    for size in (2, 3):
        for first in itertools.combinations(rest, size):
            others = [m for m in rest if m not in first]
            for then in [None, *others]:
                steps = [[models[m] for m in first]] + ([models[then]] if then is not None else []) + [models[best]]
                plans.append(make_plan(steps, models))
    return plans
