"""Cascades: plans and their errors, the answer comparator, the fixed cascade (accept on
agreement), the learned one on a slice of the recorded MMLU-Pro outcomes against the
query-only choice, and the pure next-action API a server loop calls."""

import json
from pathlib import Path

import numpy as np
import pytest

from router_pipeline.evaluation import frontier as fr
from router_pipeline.labels.outcomes import read_outcomes
from router_pipeline.routers.cascade import (
    GO_ON,
    FixedCascade,
    PlanError,
    abstains,
    comparator_for,
    logit,
    make_plan,
    next_action,
    read_answers,
    same_answer,
    state_features,
)
from router_pipeline.routers.pool import decide, lambdas
from router_pipeline.training.cascade import Trace, fit_cascade, replay

MMLU_PRO = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing_outcomes" / "mmlu_pro_dev_outcomes.csv"
POOL = ("gemini-1.5-flash", "llama-3.1-70b-instruct", "gemini-1.5-pro")


@pytest.mark.parametrize(
    "steps, problem",
    [
        ([], "at least one step"),
        ([["a"], []], "step 2 is empty"),
        (["a", "x"], r"step 2: unknown model 'x'; the pool has \['a', 'b', 'c'\]"),
        (["a", ["b", "a"]], "step 2: 'a' is already called at step 1: a model is called once per query"),
    ],
)
def test_a_plan_that_cannot_run_is_refused_saying_why(steps, problem):
    with pytest.raises(PlanError, match=problem):
        make_plan(steps, ["a", "b", "c"])


def test_answers_agree_as_letters_or_as_normalised_text_and_an_abstention_agrees_with_nothing():
    assert not abstains("A") and same_answer("a ", "A", "letter")  # "A" is a choice, not an article
    assert not same_answer("A", "B", "letter")
    assert same_answer("The Eiffel Tower.", "eiffel tower", "text")
    assert not same_answer("Paris", "Lyon", "text")
    for idk in ("I don't know", "", None, float("nan")):
        assert abstains(idk) and not same_answer(idk, idk, "text")
    assert comparator_for([["A", "j"], [None, "C"]]) == "letter" and comparator_for([["Paris", "B"]]) == "text"
    with pytest.raises(ValueError, match="unknown comparator"):
        same_answer("a", "a", "judge")


def _fixed():
    plan = make_plan([["flash", "llama"], "pro"], ["flash", "llama", "pro"])
    return FixedCascade(plan, np.array([1.0, 5.0, 10.0]))


def test_the_fixed_cascade_accepts_on_agreement_and_escalates_on_disagreement():
    policy, p = _fixed(), {"flash": 0.6, "llama": 0.6, "pro": 0.7}
    assert next_action(policy, p, {}, 0.0).kind == "call"
    assert next_action(policy, p, {"flash": "B", "llama": "b"}, 0.0).model == "flash"  # agreed: stop, no Pro
    assert next_action(policy, p, {"flash": "B", "llama": "C"}, 0.0).step == 2  # disagreed: go on to Pro
    assert next_action(policy, p, {"flash": "B", "llama": "C", "pro": "C"}, 0.0).model == "llama"  # Pro sides with it
    assert next_action(policy, p, {"flash": "B", "llama": "C", "pro": "D"}, 0.0).model == "pro"
    # Replayed on recorded rows, a query costs the sum of every model it called.
    raw = np.array([["B", "B", "B"], ["B", "C", "C"], ["I don't know", "C", "A"]], dtype=object)
    correct = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]], bool)
    cost = np.tile(policy.costs, (3, 1))
    trace = replay(policy, np.zeros((3, 3)), read_answers(raw), correct, cost, np.array([0.0]))
    assert trace.cost[:, 0].tolist() == [6.0, 16.0, 16.0] and trace.right[:, 0].tolist() == [True, True, True]


def test_answers_must_come_from_the_plans_first_steps():
    with pytest.raises(PlanError, match="not the first steps"):
        next_action(_fixed(), {"flash": 0.5, "llama": 0.5, "pro": 0.5}, {"pro": "A"}, 0.0)
    with pytest.raises(PlanError, match="outside the pool"):
        next_action(_fixed(), {"flash": 0.5, "llama": 0.5, "pro": 0.5}, {"gpt": "A"}, 0.0)


def test_a_step_reads_no_answer_of_a_model_not_yet_called():
    plan = make_plan(["flash", "llama", "pro"], ["flash", "llama", "pro"])
    raw = np.array([["A", "B", "C"], ["A", "A", "A"]], dtype=object)
    other = raw.copy()
    other[:, 1:] = "J"
    readable = np.ones(3, bool)
    q = np.zeros((2, 3))
    assert np.array_equal(
        state_features(q, read_answers(raw), plan, 1, readable),
        state_features(q, read_answers(other), plan, 1, readable),
    )
    assert not np.array_equal(
        state_features(q, read_answers(raw), plan, 2, readable),
        state_features(q, read_answers(other), plan, 2, readable),
    )


@pytest.fixture(scope="module")
def mmlu_pro_slice():
    if not MMLU_PRO.exists():
        pytest.skip(f"the shared MMLU-Pro outcomes are not at {MMLU_PRO}")
    outcomes = read_outcomes(MMLU_PRO, list(POOL))
    frame = outcomes.frame.sample(n=1500, random_state=0).reset_index(drop=True)
    correct = np.stack([(frame[m + "_grade"] == "Correct").to_numpy() for m in POOL], axis=1)
    cost = np.stack([frame[m + "_cost_usd"].to_numpy(float) for m in POOL], axis=1)
    raw = np.stack([frame[m + "_answer"].to_numpy(object) for m in POOL], axis=1)
    return correct, cost, raw


def _query_only(correct, cost, train, rows):
    """The query-only choice with no query features (each model's training accuracy as
    its P): the router a cascade must not fall below."""
    p = np.tile(correct[train].mean(axis=0), (rows, 1))
    return p, logit(p)


def _aiq(trace, correct, cost) -> float:
    cheapest = int(np.argmin(cost.mean(axis=0)))  # every router may send everything to it
    right = np.concatenate([trace.right, correct[:, [cheapest]]], axis=1).astype(float)
    return fr.aiq(fr.Curve(right, np.concatenate([trace.cost, cost[:, [cheapest]]], axis=1)), cost)


def test_the_learned_cascade_beats_the_query_only_choice_on_its_validation_rows(mmlu_pro_slice):
    correct, cost, raw = mmlu_pro_slice
    train, val = np.arange(len(correct)) < 1000, np.arange(len(correct)) >= 1000
    answers = read_answers(raw, comparator_for(raw))
    sweep = lambdas(cost[train].mean(axis=0), points=40)
    p, q = _query_only(correct, cost, train, len(correct))
    plan = make_plan(list(POOL), list(POOL))
    policy, _ = fit_cascade(plan, q[train], answers.rows(train), correct[train], cost[train], sweep)
    got = replay(policy, q[val], answers.rows(val), correct[val], cost[val], sweep)
    rows = np.arange(val.sum())[:, None]
    pick = np.stack([decide(p[val], policy.costs, lam) for lam in sweep], axis=1)
    only = Trace(correct[val][rows, pick], cost[val][rows, pick])
    gain = _aiq(got, correct[val], cost[val]) - _aiq(only, correct[val], cost[val])
    assert gain > 0.005  # agreement is evidence the query alone lacks
    # What the trace says a query cost is what the server loop (next_action) would pay for it.
    models, lam_i = list(POOL), 25
    for r in np.nonzero(val)[0][:40]:
        answers_so_far, paid = {}, 0.0
        while (act := next_action(policy, dict(zip(models, p[r])), answers_so_far, sweep[lam_i])).kind == "call":
            for m in plan.steps[act.step - 1]:
                answers_so_far[models[m]], paid = raw[r, m], paid + cost[r, m]
        paid += 0.0 if act.model in answers_so_far else cost[r, models.index(act.model)]
        assert paid == pytest.approx(got.cost[r - 1000, lam_i])
        assert correct[r, models.index(act.model)] == got.right[r - 1000, lam_i]


def test_a_file_without_answers_still_fits_a_cascade_reading_the_query_only(mmlu_pro_slice):
    correct, cost, raw = mmlu_pro_slice
    none = np.full(raw.shape, None, dtype=object)
    answers = read_answers(none, comparator_for(none))
    sweep = lambdas(cost.mean(axis=0), points=20)
    _, q = _query_only(correct, cost, slice(None), len(correct))
    plan = make_plan(list(POOL), list(POOL))
    policy, trace = fit_cascade(plan, q, answers, correct, cost, sweep)
    assert not policy.readable.any() and state_features(q, answers, plan, 3, policy.readable).shape == (len(q), 3)
    assert trace.right.shape == (len(q), len(sweep)) and (policy.decide(0, q, answers, sweep) != GO_ON).any()


def test_what_is_chosen_never_reads_the_test_rows(mmlu_pro_slice):
    """The candidates, the one chosen at every knob value and the cascade to serve are the
    same whatever the test rows hold (their grades flipped, their answers shuffled); only
    the test figures move."""
    from router_pipeline.evaluation.cascade import Rows, candidates, choose, evaluate_cascade, release

    correct, cost, raw = mmlu_pro_slice
    comparator = comparator_for(raw)
    p, _ = _query_only(correct, cost, np.arange(len(correct)) < 800, len(correct))
    rng = np.random.default_rng(0)

    def rows(part, scrambled=False):
        grades, answers = correct[part], raw[part]
        if scrambled:
            grades, answers = ~grades, answers[rng.permutation(len(answers))]
        return Rows(grades, cost[part], p[part], read_answers(answers, comparator))

    train, val, test = slice(0, 800), slice(800, 1100), slice(1100, None)
    costs = cost[train].mean(axis=0)
    runs = []
    for scrambled in (False, True):
        splits = (rows(train), rows(val), rows(test, scrambled))
        policies, validation_aiq = candidates(*splits[:2], list(POOL), costs, comparator=comparator,
                                              alphas=(100.0,), folds=3, log=lambda *_: None)
        choice = choose(policies, splits[1], costs)
        served = release(policies, splits[1], splits[2], list(POOL), costs, 0.0, resamples=50)
        report = evaluate_cascade(policies, choice, splits[2], list(POOL), costs, resamples=50)
        runs.append((validation_aiq, choice, served, report))
    (aiq, choice, served, report), (aiq_again, choice_again, served_again, report_again) = runs
    assert aiq == aiq_again and np.array_equal(choice, choice_again) and report.chosen == report_again.chosen
    for key in ("candidate", "plan", "kind", "validation"):
        assert served[key] == served_again[key], key
    assert served["test"] != served_again["test"]
    assert report.figures["cascade_aiq"] != report_again.figures["cascade_aiq"]
    # At lambda 0 (accuracy at any cost) the validation rows choose a cascade over the router ...
    assert served["candidate"] != "query-only router" and served["default"]
    assert served["validation"]["cascade_usd_per_1000"] > 0.4
    # ... and a budget (USD per 1,000 queries) is kept on those rows: what is served by default fits it; where no
    # cascade does (0.40), none is served by default.
    for budget, by_default in ((0.4, False), (served["validation"]["cascade_usd_per_1000"], True)):
        budgeted = release(policies, rows(val), rows(test), list(POOL), costs, 0.0, budget, resamples=50)
        assert budgeted["default"] is by_default
        assert budgeted["validation"]["cascade_usd_per_1000"] <= budget or not by_default


def test_a_released_learned_cascade_is_saved_loaded_and_decides_as_fitted(mmlu_pro_slice, tmp_path):
    from types import SimpleNamespace

    from router_pipeline.routers.cascade import LearnedCascade, released_cascade, save_cascade

    correct, cost, raw = mmlu_pro_slice
    answers = read_answers(raw, comparator_for(raw))
    sweep = lambdas(cost.mean(axis=0), points=20)
    _, q = _query_only(correct, cost, slice(None), len(correct))
    policy, _ = fit_cascade(make_plan([["gemini-1.5-flash", "llama-3.1-70b-instruct"], "gemini-1.5-pro"], list(POOL)),
                            q, answers, correct, cost, sweep, folds=3)
    files = save_cascade(policy, tmp_path, default=False)
    assert [f.name for f in files] == ["cascade.json", "cascade_heads.npz"]
    loaded = released_cascade(SimpleNamespace(path=tmp_path, models=list(POOL), costs=policy.costs))
    assert isinstance(loaded, LearnedCascade) and not loaded.by_default and loaded.plan == policy.plan
    for k in range(len(policy.plan.steps) + 1):
        assert np.array_equal(loaded.decide(k, q, answers, sweep), policy.decide(k, q, answers, sweep))
    # Heads of another pool, or of another plan, are refused when loaded, naming the file.
    with pytest.raises(ValueError, match="cascade_heads.npz: the learned cascade's heads cannot be read"):
        released_cascade(SimpleNamespace(path=tmp_path, models=list(POOL) + ["gpt"], costs=[0.0] * 4))
    spec = json.loads((tmp_path / "cascade.json").read_text())
    (tmp_path / "cascade.json").write_text(json.dumps({**spec, "plan": list(POOL)}))  # three steps, not two
    with pytest.raises(ValueError, match="cascade_heads.npz: the learned cascade's heads cannot be read"):
        released_cascade(SimpleNamespace(path=tmp_path, models=list(POOL), costs=policy.costs))
    # A profile cannot configure a learned cascade: it comes released with its heads.
    from router_pipeline.routers.cascade import fixed_from_dict
    with pytest.raises(PlanError, match="kind 'learned' cannot be served here"):
        fixed_from_dict({"kind": "learned", "plan": list(POOL)}, list(POOL), [0.0] * 3)
