import math

import numpy as np
import pandas as pd
import pytest

from router_pipeline import evaluation as ev
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
    by_share = ev.calibrate(TABLE, scores, target_share=0.5)
    assert by_share["threshold"] == 0.8 and by_share["achieved_share"] == 0.5
    by_quality = ev.calibrate(TABLE, scores, target_pgr=0.4)
    assert by_quality["threshold"] == 0.9 and by_quality["achieved_pgr"] == 0.5
    tiers = ev.route_with_threshold(scores, by_share["threshold"])
    assert tiers.tolist() == ["medium", "medium", "large", "large"]
    with pytest.raises(ValueError, match="exactly one"):
        ev.calibrate(TABLE, scores)


def test_evaluate_report_ranks_router_against_baselines():
    rng = np.random.default_rng(0)
    n = 40
    medium = list(rng.choice(["Correct", "Incorrect", "IDK"], n, p=[0.5, 0.3, 0.2]))
    table = outcomes(medium, ["Correct"] * n)
    oracle = ev.oracle_policies(table)
    # A good (noisy) router: high P(Complex) where the oracle says Complex.
    p_large = np.clip(np.array([0.8 if p == COMPLEX else 0.2 for p in oracle]) + rng.normal(0, 0.15, n), 0, 1)
    decisions = pd.DataFrame({"qid": table["qid"], "policy": [COMPLEX if p > 0.5 else STANDARD for p in p_large],
                              "p_large": p_large})
    test, validation = table.iloc[:30].reset_index(drop=True), table.iloc[30:].reset_index(drop=True)
    report = ev.evaluate(test, decisions.iloc[:30], validation, decisions.iloc[30:], None, random_seeds=10)
    s = report.summary.set_index("router")
    assert s.loc["router", "apgr"] > report.random_apgr + 0.1  # the oracle itself reaches ~0.75 here
    assert s.loc["oracle", "apgr"] >= s.loc["router", "apgr"] - 1e-9
    assert s.loc["always-large", "large_share"] == 1 and s.loc["always-medium", "large_share"] == 0
    assert 0.5 < s.loc["router", "policy_accuracy"] <= 1
    assert report.calibration["n"] == 10  # calibrated on the validation rows, never the test rows
    assert report.calibration["achieved_pgr"] >= 0.9
    assert len(report.per_query) == 30 and set(report.per_query["tier"]) <= {"medium", "large"}
