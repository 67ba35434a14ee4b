"""The release rule without Dagster: the choice reads out-of-fold and validation scores
only, compares candidates on the rows they share, and records its evidence."""

import numpy as np
import pandas as pd
import pytest

from router_pipeline import release
from router_pipeline.policies import AMBIGUOUS, COMPLEX, STANDARD


def _outcomes(n: int, prefix: str, rng) -> pd.DataFrame:
    medium = rng.choice(["Correct", "Incorrect"], n, p=[0.6, 0.4])
    large = np.where(medium == "Correct", rng.choice(["Correct", "Incorrect"], n, p=[0.9, 0.1]), "Correct")
    return pd.DataFrame({"qid": [f"{prefix}{i}" for i in range(n)], "medium_label": medium, "large_label": large})


def _needs_large(table: pd.DataFrame) -> np.ndarray:
    return ((table["medium_label"] != "Correct") & (table["large_label"] == "Correct")).to_numpy(float)


def _decisions(table: pd.DataFrame, scores) -> pd.DataFrame:
    scores = np.asarray(scores, float)
    return pd.DataFrame({"qid": table["qid"], "p_large": scores,
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
