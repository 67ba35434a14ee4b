"""The release without Dagster: the choice reads out-of-fold and validation scores only,
compares candidates on the rows they share and records its evidence; the gate refuses
what each of its rules must; record and publish write what the server reads."""

import numpy as np
import pandas as pd
import pytest

from router_pipeline.evaluation import release
from router_pipeline.policies import AMBIGUOUS, COMPLEX, STANDARD


def _outcomes(n: int, prefix: str, rng) -> pd.DataFrame:
    medium = rng.choice(["Correct", "Incorrect"], n, p=[0.6, 0.4])
    large = np.where(medium == "Correct", rng.choice(["Correct", "Incorrect"], n, p=[0.9, 0.1]), "Correct")
    return pd.DataFrame({"qid": [f"{prefix}{i}" for i in range(n)], "medium_label": medium, "large_label": large})


def _needs_large(table: pd.DataFrame) -> np.ndarray:
    return ((table["medium_label"] != "Correct") & (table["large_label"] == "Correct")).to_numpy(float)


def _decisions(table: pd.DataFrame, scores) -> pd.DataFrame:
    scores = np.asarray(scores, float)
    return pd.DataFrame({"qid": table["qid"], "p_complex": scores,
                         "policy": np.where(scores >= 0.5, COMPLEX, STANDARD)})


def _oof(table: pd.DataFrame, scores) -> pd.DataFrame:
    return pd.DataFrame({"qid": table["qid"], "fold": np.arange(len(table)) % 5, "p_complex": scores})


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    return _outcomes(400, "tr", rng), _outcomes(30, "va", rng), rng


def test_out_of_fold_evidence_outweighs_a_small_validation_slice(rows):
    """On 30 validation rows "lucky" ranks better; on 400 out-of-fold training rows
    "steady" ranks far better: the release follows all the evidence, and says so."""
    train, validation, rng = rows
    truth_t, truth_v = _needs_large(train), _needs_large(validation)
    steady_t = truth_t * 0.5 + rng.random(len(train)) * 0.7
    lucky_t = rng.random(len(train))
    steady_v = truth_v * 0.2 + rng.random(len(validation))
    lucky_v = truth_v + 0.01 * rng.random(len(validation))  # perfect on validation
    decisions = {"lucky": _decisions(validation, lucky_v), "steady": _decisions(validation, steady_v)}
    oof = {"lucky": _oof(train, lucky_t), "steady": _oof(train, steady_t)}

    on_validation = release.from_evaluation(validation, decisions, {}, train.iloc[:0], resamples=200)
    assert on_validation.name == "lucky" and on_validation.record["rows"] == {"lucky": 30, "steady": 30}
    choice = release.from_evaluation(validation, decisions, oof, train, resamples=200)
    assert choice.name == "steady" and choice.record["rows"] == {"lucky": 430, "steady": 430}
    versus = choice.record["chosen_minus"]["lucky"]
    assert versus["rows"] == 430 and 0 < versus["lo"] < versus["diff"] < versus["hi"]
    assert choice.record["apgr"]["steady"] > choice.record["apgr"]["lucky"]
    assert choice.why.startswith("best cross-validated APGR: steady") and "lucky +" in choice.why


def test_an_adapter_without_out_of_fold_scores_is_compared_on_validation_rows(rows):
    train, validation, rng = rows
    truth_v = _needs_large(validation)
    head_v = truth_v * 0.3 + rng.random(len(validation))
    decisions = {"gemma": _decisions(validation, head_v), "sft": _decisions(validation, truth_v)}
    choice = release.from_evaluation(validation, decisions, {"gemma": _oof(train, _needs_large(train))}, train,
                                     resamples=100)
    # gemma is perfect out of fold, but the rows both have are the validation slice, where sft is.
    assert choice.name == "sft" and choice.record["chosen_minus"]["gemma"]["rows"] == 30
    assert choice.record["rows"] == {"gemma": 430, "sft": 30}


def test_ties_keep_the_earlier_candidate_and_collapsed_ones_are_skipped(rows):
    train, validation, _ = rows
    scores = _needs_large(validation)
    same = {"first": _decisions(validation, scores), "second": _decisions(validation, scores)}
    assert release.from_evaluation(validation, same, {}, train, resamples=50).name == "first"
    collapsed = same | {"first": _decisions(validation, scores).assign(policy=AMBIGUOUS)}
    choice = release.from_evaluation(validation, collapsed, {}, train, resamples=50)
    assert choice.name == "second" and choice.record["collapsed_on_validation"] == ["first"]
    assert "collapsed to one policy on validation: first" in choice.why


def test_without_evidence_the_first_candidate_is_released(rows):
    train, _, _ = rows
    empty = pd.DataFrame(columns=["qid", "medium_label", "large_label"])
    decisions = {"gemma": _decisions(empty, []), "logistic": _decisions(empty, [])}
    choice = release.from_evaluation(empty, decisions, {}, train.iloc[:0], resamples=10)
    assert choice.name == "gemma" and "first candidate" in choice.why
    with pytest.raises(ValueError, match="no candidate"):
        release.choose({}, train)


def test_the_choice_never_reads_test_rows(rows):
    """Only validation and out-of-fold rows are evidence: a candidate's scores on any
    other row (a test row routed by mistake) change nothing."""
    train, validation, rng = rows
    test = _outcomes(200, "te", rng)
    a_v, b_v = rng.random(len(validation)), _needs_large(validation) + rng.random(len(validation))
    clean = {"a": _decisions(validation, a_v), "b": _decisions(validation, b_v)}
    polluted = {"a": pd.concat([clean["a"], _decisions(test, _needs_large(test))]),
                "b": pd.concat([clean["b"], _decisions(test, rng.random(len(test)))])}
    assert release.from_evaluation(validation, clean, {}, train, resamples=50).record == \
        release.from_evaluation(validation, polluted, {}, train, resamples=50).record


# -- the gate, without Dagster ---------------------------------------------------------
def _table(n: int, prefix: str, rng) -> pd.DataFrame:
    return _outcomes(n, prefix, rng).assign(query=lambda t: t["qid"], medium_cost=0.001, large_cost=0.01)


def _evaluated(test, validation, test_scores: dict, val_scores: dict, *, parse_ok=None, policy=None):
    """release.from_evaluation (validation only), metrics.evaluate, the chosen one's figures."""
    from router_pipeline.evaluation import metrics

    decided = {}
    for name in test_scores:
        t = _decisions(test, test_scores[name]).assign(parse_ok=True if parse_ok is None else parse_ok)
        if policy is not None:
            t = t.assign(policy=policy)
        decided[name] = (t, _decisions(validation, val_scores[name]))
    choice = release.from_evaluation(validation, {n: v for n, (_, v) in decided.items()}, {}, validation.iloc[:0],
                                     resamples=50)
    report = metrics.evaluate(test, validation, decided, chosen=choice.name, why=choice.why, random_seeds=5,
                              resamples=50)
    rate = float((~decided[choice.name][0]["parse_ok"].astype(bool)).mean())
    return choice, report, release.figures(report, choice.name, test, validation, rate, "head")


def _verdicts(report, test, figures, released=None, tolerance=0.05):
    return {v.rule: v for v in release.gate(report, test, figures, released or {}, regression_tolerance=tolerance)}


@pytest.fixture
def tables():
    rng = np.random.default_rng(3)
    return _table(300, "te", rng), _table(120, "va", rng), rng


def test_the_best_validation_candidate_is_chosen_and_test_rows_only_judge_it(tables):
    """"val_star" ranks the validation rows perfectly and the test rows backwards;
    "test_star" the reverse. The choice reads validation only, so val_star is chosen,
    and the gate (which reads test rows) refuses it: below random."""
    test, validation, rng = tables
    good_t, good_v = _needs_large(test) + 0.1 * rng.random(len(test)), _needs_large(validation)
    choice, report, figures = _evaluated(test, validation, {"val_star": -good_t, "test_star": good_t},
                                         {"val_star": good_v, "test_star": -good_v})
    assert choice.name == report.chosen == "val_star"
    verdicts = _verdicts(report, test, figures)
    assert set(verdicts) == set(release.RULES)
    assert not verdicts["beats_random"].passed and verdicts["beats_random"].blocking
    assert verdicts["beats_random"].metadata["apgr"] < verdicts["beats_random"].metadata["random_apgr"]


def test_a_good_router_passes_every_rule(tables):
    test, validation, rng = tables
    choice, report, figures = _evaluated(test, validation, {"good": _needs_large(test) + 0.1 * rng.random(len(test))},
                                         {"good": _needs_large(validation)})
    verdicts = _verdicts(report, test, figures)
    assert all(v.passed for v in verdicts.values()), {r: v.metadata for r, v in verdicts.items()}
    assert verdicts["no_regression"].metadata["released"] == {"note": "no released router yet"}


def test_each_blocking_rule_refuses_what_it_must(tables):
    test, validation, rng = tables
    good = {"good": _needs_large(test) + 0.1 * rng.random(len(test))}
    val = {"good": _needs_large(validation)}
    _, report, figures = _evaluated(test, validation, good, val)
    # A release that served better than this one beyond the tolerance: a regression.
    better = {"served_correct": figures["served_correct"] + 0.06, "policy_accuracy": figures["policy_accuracy"]}
    regression = _verdicts(report, test, figures, better)["no_regression"]
    assert not regression.passed and regression.blocking and set(regression.metadata["regressions"]) == {"served_correct"}
    within = {"served_correct": figures["served_correct"] + 0.04}
    assert _verdicts(report, test, figures, within)["no_regression"].passed
    # Parse failures above 5% of the test decisions.
    failing = np.arange(len(test)) % 10 == 0  # 10%
    _, report, figures = _evaluated(test, validation, good, val, parse_ok=~failing)
    parses = _verdicts(report, test, figures)["parse_failures_within_limit"]
    assert not parses.passed and parses.blocking and parses.metadata["parse_failures"] == 30
    # One policy for every test query while the labels have two above 10% each.
    _, report, figures = _evaluated(test, validation, good, val, policy=STANDARD)
    collapse = _verdicts(report, test, figures)["no_policy_collapse"]
    assert not collapse.passed and collapse.blocking and collapse.metadata["decided"][STANDARD] == 1.0


def test_few_test_rows_or_no_quality_gap_warn_instead_of_blocking(tables):
    test, validation, rng = tables
    few = test.iloc[:20]
    _, report, figures = _evaluated(few, validation, {"good": _needs_large(few)}, {"good": _needs_large(validation)},
                                    policy=STANDARD)
    collapse = _verdicts(report, few, figures)["no_policy_collapse"]
    assert not collapse.passed and not collapse.blocking and "only 20 test rows" in collapse.note
    flat = test.assign(medium_label="Correct", large_label="Correct")  # always-large is no better: APGR undefined
    _, report, figures = _evaluated(flat, validation, {"good": rng.random(len(flat))},
                                    {"good": _needs_large(validation)})
    beats = _verdicts(report, flat, figures)["beats_random"]
    assert figures["apgr"] is None and not beats.passed and not beats.blocking and "undefined" in beats.note


def test_record_and_publish_write_what_the_server_reads(tables, tmp_path):
    from router_pipeline.artifacts import CALIBRATION_FILE, EVALUATION_FILE, ROUTER_FILE, Artifacts

    test, validation, rng = tables
    choice, report, _ = _evaluated(test, validation, {"knn": _needs_large(test) + 0.1 * rng.random(len(test))},
                                   {"knn": _needs_large(validation)})
    layout = Artifacts(tmp_path)
    layout.head("knn").mkdir(parents=True)
    (layout.head("knn") / ROUTER_FILE).write_text('{"kind": "head", "encoder": {"encoder": "minilm"}}')
    release.record(layout, report, choice, test, validation, {"knn": 0.0}, {"knn": "head"})
    assert release.released_figures(layout) == {}  # nothing released yet
    released = release.publish(layout, "knn")
    assert released["router_dir"] == layout.release and (layout.release / ROUTER_FILE).is_file()
    from router_pipeline.routers.manifest import check_manifest

    assert check_manifest(layout.release)  # every released file hashed, as load_router checks it
    figures = release.released_figures(layout)
    assert figures["candidate"] == "knn" and figures["chosen"] and figures["release_evidence"] == choice.record
    assert (layout.release / CALIBRATION_FILE).is_file()
    (layout.release / EVALUATION_FILE).write_text("{not json")
    with pytest.raises(release.ReleaseError, match=str(layout.release / EVALUATION_FILE)):
        release.released_figures(layout)
    with pytest.raises(release.ReleaseError, match="no evaluation of logistic"):
        release.publish(layout, "logistic")
