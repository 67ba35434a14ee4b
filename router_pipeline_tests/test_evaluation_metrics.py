import math

import numpy as np
import pandas as pd
import pytest

from router_pipeline.evaluation import metrics as ev
from router_pipeline.evaluation import release
from router_pipeline.policies import AMBIGUOUS, COMPLEX, STANDARD


def outcomes(medium, large, medium_cost=1.0, large_cost=10.0):
    n = len(medium)
    return pd.DataFrame({"qid": [f"q{i}" for i in range(n)], "query": [f"question {i}" for i in range(n)],
                         "medium_label": medium, "large_label": large,
                         "medium_cost": [medium_cost] * n, "large_cost": [large_cost] * n})


# medium right on q0, q1; large right on all four: acc_m = 0.5, acc_l = 1.0
TABLE = outcomes(["Correct", "Correct", "Incorrect", "IDK"], ["Correct"] * 4)


def test_curve_apgr_cpt_on_a_hand_built_case():
    c = ev.curve(TABLE, [0.1, 0.2, 0.9, 0.8])
    # points: share 0 -> acc .5, .25 -> .75, .5 -> 1, .75 -> 1, 1 -> 1
    assert c.share.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert c.accuracy.tolist() == [0.5, 0.75, 1.0, 1.0, 1.0]
    assert c.apgr == pytest.approx(0.25 * 0.25 + 0.25 * 0.75 + 0.25 + 0.25)  # 0.75
    assert c.cpt(0.5) == pytest.approx(0.25)
    assert c.cpt(0.8) == pytest.approx(0.25 + 0.25 * (0.8 - 0.5) / 0.5)  # 0.40


def test_worst_router_and_ties():
    worst = ev.curve(TABLE, [0.9, 0.8, 0.1, 0.2])  # escalates the queries medium already gets right
    assert worst.apgr == pytest.approx(0.25)
    assert worst.cpt(0.5) == pytest.approx(0.75)
    tied = ev.curve(TABLE, [0.5] * 4)  # all move together: the straight line, APGR 0.5
    assert tied.share.tolist() == [0, 1] and tied.apgr == pytest.approx(0.5)


def test_random_router_averages_near_half():
    rng = np.random.default_rng(1)
    big = outcomes(list(rng.choice(["Correct", "Incorrect"], 400)), ["Correct"] * 400)
    stats = ev.curve_stats(ev.random_curves(big, seeds=20))
    assert abs(stats["apgr"] - 0.5) < 0.05


def test_undefined_without_a_quality_gap():
    flat = outcomes(["Incorrect"] * 3, ["IDK"] * 3)
    c = ev.curve(flat, [0.1, 0.5, 0.9])
    assert math.isnan(c.apgr) and math.isnan(c.cpt(0.5))


def test_simpleqa_metrics():
    m = ev.simpleqa_metrics(pd.Series(["Correct", "Correct", "Incorrect", "IDK"]))
    assert (m["correct"], m["incorrect"], m["not_attempted"]) == (0.5, 0.25, 0.25)
    assert m["correct_given_attempted"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_summary_cost_savings_and_abstain():
    row = ev.summarise(TABLE, np.array(["medium", "medium", "large", "abstain"]), "r")
    assert row["correct"] == 0.75 and row["not_attempted"] == 0.25
    assert row["cost_usd"] == 12.0 and row["savings_vs_large"] == pytest.approx(1 - 12 / 40)
    assert row["quality_retained"] == 0.75 and row["large_share"] == 0.25


def test_oracle_policies_and_confusion():
    assert ev.oracle_policies(TABLE) == [STANDARD, STANDARD, COMPLEX, COMPLEX]
    conf = ev.confusion([STANDARD, COMPLEX, COMPLEX], [STANDARD, AMBIGUOUS, COMPLEX])
    assert conf.loc[COMPLEX, AMBIGUOUS] == 1 and conf.loc[COMPLEX, COMPLEX] == 1 and conf.to_numpy().sum() == 3
    assert conf.shape == (3, 3)


def test_calibration_by_share_and_by_quality():
    scores = [0.1, 0.2, 0.9, 0.8]
    by_share = ev.fit_threshold(TABLE, scores, target_share=0.5)
    assert by_share["threshold"] == 0.8 and by_share["achieved_share"] == 0.5
    by_quality = ev.fit_threshold(TABLE, scores, target_pgr=0.4)
    assert by_quality["threshold"] == 0.9 and by_quality["achieved_pgr"] == 0.5
    tiers = ev.route_with_threshold(scores, by_share["threshold"])
    assert tiers.tolist() == ["medium", "medium", "large", "large"]
    with pytest.raises(ValueError, match="exactly one"):
        ev.fit_threshold(TABLE, scores)


def _decisions(table, p_complex):
    return pd.DataFrame({"qid": table["qid"], "policy": [COMPLEX if p > 0.5 else STANDARD for p in p_complex],
                         "p_complex": p_complex, "parse_ok": True})


def _noisy_router(oracle, rng, noise):
    return np.clip(np.array([0.8 if p == COMPLEX else 0.2 for p in oracle]) + rng.normal(0, noise, len(oracle)), 0, 1)


def test_evaluate_scores_every_candidate_and_chooses_on_validation_only():
    rng = np.random.default_rng(0)
    n = 60
    medium = list(rng.choice(["Correct", "Incorrect", "IDK"], n, p=[0.5, 0.3, 0.2]))
    table = outcomes(medium, ["Correct"] * n)
    oracle = ev.oracle_policies(table)
    good = _noisy_router(oracle, rng, 0.15)
    test, validation = table.iloc[:40].reset_index(drop=True), table.iloc[40:].reset_index(drop=True)
    # "val_only" ranks the validation rows perfectly and the test rows backwards: the
    # choice must follow validation, whatever the test rows would say.
    val_only = np.where(np.arange(n) < 40, 1 - good, good)
    decided = {"good": (_decisions(test, good[:40]), _decisions(validation, good[40:])),
               "val_only": (_decisions(test, val_only[:40]), _decisions(validation, val_only[40:]))}
    choice = release.from_evaluation(validation, {n: v for n, (_, v) in decided.items()}, {}, test.iloc[:0],
                                     resamples=100)
    report = ev.evaluate(test, validation, decided, chosen=choice.name, why=choice.why, random_seeds=10,
                         resamples=200)
    s = report.summary.set_index("router")
    assert s.loc["good", "apgr"] > report.random_apgr + 0.1 > s.loc["val_only", "apgr"]
    assert s.loc["val_only", "validation_apgr"] == pytest.approx(s.loc["good", "validation_apgr"])
    assert report.chosen == "good" and "best cross-validated APGR" in report.why  # a tie: the first listed
    assert s.loc["oracle", "apgr"] >= s.loc["good", "apgr"] - 1e-9
    assert s.loc["always-large", "large_share"] == 1 and s.loc["always-medium", "large_share"] == 0
    assert 0.5 < s.loc["good", "policy_accuracy"] <= 1
    assert report.calibrations["good"]["n"] == 20  # calibrated on the validation rows, never the test rows
    assert report.calibration["achieved_pgr"] >= 0.9
    assert len(report.per_query) == 40 and set(report.per_query["tier"]) <= {"medium", "large"}
    assert {"good_p_complex", "val_only_p_complex", "good_policy"} <= set(report.per_query)
    (row,) = report.intervals.to_dict("records")
    assert (row["a"], row["b"]) == ("good", "val_only") and row["lo"] > 0 and row["diff"] == pytest.approx(
        s.loc["good", "apgr"] - s.loc["val_only", "apgr"])

    flipped = {"val_only": decided["val_only"][1], "good": _decisions(validation, 1 - good[40:])}
    assert release.from_evaluation(validation, flipped, {}, test.iloc[:0], resamples=50).name == "val_only"
    with pytest.raises(ValueError, match="not among the candidates"):
        ev.evaluate(test, validation, decided, chosen="dpo")


def test_fast_apgr_matches_the_curve_with_ties_and_weights():
    rng = np.random.default_rng(3)
    n = 200
    table = outcomes(list(rng.choice(["Correct", "Incorrect"], n, p=[0.6, 0.4])),
                     list(rng.choice(["Correct", "Incorrect"], n, p=[0.85, 0.15])))
    scores = np.round(rng.random(n), 1)  # many ties
    med, large = (table["medium_label"] == "Correct").to_numpy(), (table["large_label"] == "Correct").to_numpy()
    assert ev.apgr_weighted(scores, med, large) == pytest.approx(ev.curve(table, scores).apgr)
    w = rng.integers(0, 3, n)  # a resample's multiplicities == the table with rows repeated
    repeated = table.loc[np.repeat(np.arange(n), w)].reset_index(drop=True)
    assert ev.apgr_weighted(scores, med, large, w) == pytest.approx(ev.curve(repeated, np.repeat(scores, w)).apgr)


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(4)
    n = 300
    table = outcomes(list(rng.choice(["Correct", "Incorrect"], n, p=[0.6, 0.4])), ["Correct"] * n)
    oracle = ev.oracle_scores(table)
    same = ev.paired_bootstrap(table, oracle, oracle, resamples=100)
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0
    better = ev.paired_bootstrap(table, oracle + rng.normal(0, 0.3, n), rng.random(n), resamples=300)
    assert 0 < better["lo"] < better["diff"] < better["hi"] and better["resamples"] == 300


def test_cross_fitted_apgr_never_ranks_two_folds_together():
    """Cross-fitted APGR is the row-weighted mean of each fold's own APGR: shifting one
    fold's scores (another model's scale) changes nothing, while pooling them would."""
    rng = np.random.default_rng(5)
    n = 400
    table = outcomes(list(rng.choice(["Correct", "Incorrect"], n, p=[0.6, 0.4])),
                     list(rng.choice(["Correct", "Incorrect"], n, p=[0.85, 0.15])))
    med, large = (table["medium_label"] == "Correct").to_numpy(), (table["large_label"] == "Correct").to_numpy()
    folds = np.repeat([0, 1, 2], [100, 100, 200])
    scores = ev.oracle_scores(table) + rng.normal(0, 1.0, n)
    by_hand = sum(len(i) / n * ev.apgr_weighted(scores[i], med[i], large[i])
                  for i in (np.arange(100), np.arange(100, 200), np.arange(200, 400)))
    assert ev.crossfit_apgr(scores, med, large, folds) == pytest.approx(by_hand)
    shifted = scores + np.where(folds == 2, 10.0, 0.0)
    assert ev.crossfit_apgr(shifted, med, large, folds) == pytest.approx(by_hand)
    assert ev.apgr_weighted(shifted, med, large) != pytest.approx(by_hand)
    other = rng.random(n)
    d = ev.paired_bootstrap(table, shifted, other, resamples=300, folds=folds)
    assert d["diff"] == pytest.approx(by_hand - ev.crossfit_apgr(other, med, large, folds))
    assert d["lo"] < d["diff"] < d["hi"] and d["resamples"] == 300
    same = ev.paired_bootstrap(table, shifted, scores, resamples=200, folds=folds)  # one ranking within every fold
    assert same["diff"] == pytest.approx(0) and same["lo"] == pytest.approx(0) and same["hi"] == pytest.approx(0)


def test_calibration_error_policy_mix_and_collapse():
    rng = np.random.default_rng(5)
    p = rng.random(5000)
    assert ev.expected_calibration_error(p, rng.random(5000) < p) < 0.03  # calibrated
    assert ev.expected_calibration_error(np.full(1000, 0.999), np.arange(1000) < 300) == pytest.approx(0.699)
    labels = [STANDARD] * 60 + [COMPLEX] * 30 + [AMBIGUOUS] * 10
    assert ev.policy_mix(labels) == {STANDARD: 0.6, COMPLEX: 0.3, AMBIGUOUS: 0.1}
    assert ev.collapsed([STANDARD] * 97 + [COMPLEX] * 3, labels)  # DPO's failure: one policy for all
    assert not ev.collapsed([STANDARD] * 90 + [COMPLEX] * 10, labels)
    assert not ev.collapsed([STANDARD] * 100, [STANDARD] * 95 + [COMPLEX] * 5)  # labels themselves are one policy


