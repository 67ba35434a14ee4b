"""pool_cascade through Dagster on a slice of the recorded MMLU-Pro outcomes (three of its
models under the offline pool's names; the query-only router a stand-in reading each
domain's training accuracy): the cascade is fitted, chosen on the validation rows and
scored on the test rows beside the query-only router, with its frontier plot and its
warning check; and without answer columns it records why it skipped."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from router_pipeline.labels.outcomes import read_outcomes
from router_pipeline_tests.support import write_asset

MMLU_PRO = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing_outcomes" / "mmlu_pro_dev_outcomes.csv"
RECORDED = {"gemini-1.5-flash": "flash-lite", "llama-3.1-70b-instruct": "flash", "gemini-1.5-pro": "pro"}
MODELS = list(RECORDED.values())  # the offline pool's names
RULE = "cascade_not_below_query_only"


@pytest.fixture(scope="module")
def outcomes_slice() -> pd.DataFrame:
    """900 rows: 600 train, 150 validation, 150 test."""
    if not MMLU_PRO.exists():
        pytest.skip(f"the shared MMLU-Pro outcomes are not at {MMLU_PRO}")
    frame = read_outcomes(MMLU_PRO, list(RECORDED)).frame.sample(n=900, random_state=1).reset_index(drop=True)
    frame = frame.rename(columns={c: RECORDED[m] + c[len(m):] for c in frame.columns for m in RECORDED
                                  if c.startswith(m + "_")})
    keep = ["qid", "query", "domain"] + [c for c in frame.columns if c.split("_")[0] in MODELS]
    return frame[keep].assign(split=["train"] * 600 + ["validation"] * 150 + ["test"] * 150)


def _stand_in_router(frame: pd.DataFrame):
    """query_only_p reading the domain of each query: P(correct) = that domain's training
    accuracy per model (a query-only router with some signal, and no encoder)."""
    train = frame[frame["split"] == "train"]
    by_domain = train.groupby("domain")[[m + "_grade" for m in MODELS]].agg(lambda g: (g == "Correct").mean())
    overall = (train[[m + "_grade" for m in MODELS]] == "Correct").mean().to_numpy()
    domain_of = dict(zip(frame["query"], frame["domain"]))
    costs = train[[m + "_cost_usd" for m in MODELS]].mean().to_numpy(float)

    def query_only_p(path, queries):
        p = np.stack([by_domain.loc[domain_of[q]].to_numpy(float) if domain_of[q] in by_domain.index else overall
                      for q in queries])
        return np.clip(p, 0.02, 0.98), costs, {"knob": "quality", "knob_value": 0.95}

    return query_only_p


def _materialise(defs, resources, frame, monkeypatch):
    from router_pipeline.defs import cascade
    from router_pipeline.defs.resources import ModelPool
    from router_pipeline.llm.pool import offline_pool

    assert offline_pool().names == MODELS
    monkeypatch.setattr(cascade, "query_only_p", _stand_in_router(frame))
    io = resources["io_manager"]
    write_asset(io, "pool_outcomes", frame)
    router = Path(resources["artifacts"].layout().root) / "pool" / "minilm_lda"
    train = frame[frame["split"] == "train"]
    router.parent.mkdir(parents=True, exist_ok=True)  # the stand-in's P on the training rows, as if out of fold
    np.savez(router.with_name("minilm_lda.training_p.npz"), qid=train["qid"].astype(str).to_numpy(dtype=str),
             p=_stand_in_router(frame)("", list(train["query"]))[0])
    write_asset(io, "pool_routers", pd.DataFrame({"candidate": ["minilm_lda"], "path": [str(router)]}))
    write_asset(io, "pool_evaluation", pd.DataFrame({"qid": frame["qid"], "candidate": "minilm_lda"}))
    result = dg.materialize(list(defs.assets), instance=dg.DagsterInstance.ephemeral(),
                            resources={**resources, "pool": ModelPool.of(offline_pool())}, selection=["pool_cascade"],
                            run_config={"ops": {"pool_cascade": {"config": {
                                "alphas": [100.0], "folds": 3, "bootstrap_resamples": 200}}}})
    assert result.success
    meta = result.asset_materializations_for_node("pool_cascade")[0].metadata
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    return meta, checks[RULE]


def test_the_cascade_is_scored_beside_the_query_only_router_with_its_plot_and_check(
        defs, resources, outcomes_slice, artifacts, monkeypatch):
    meta, check = _materialise(defs, resources, outcomes_slice, monkeypatch)
    assert "skipped" not in meta
    assert meta["comparator"].value == "letter" and meta["answers_of"].value == MODELS
    assert meta["query_only_p_on_training_rows"].value == "out-of-fold"
    assert (meta["training_rows"].value, meta["validation_rows"].value, meta["test_rows"].value) == (600, 150, 150)
    aiq, query_only = meta["cascade_aiq"].value, meta["query_only_aiq"].value
    assert 0.3 < query_only < aiq < 1  # agreement is evidence the domain alone lacks
    diff, lo, hi = (meta[f"cascade_minus_query_only_aiq{s}"].value for s in ("", "_lo", "_hi"))
    assert lo <= diff <= hi and diff == pytest.approx(aiq - query_only, abs=1e-9)
    assert meta["best_single_model"].value == "pro"
    lo, hi = meta["cascade_minus_best_single_at_its_cost_lo"].value, meta["cascade_minus_best_single_at_its_cost_hi"].value
    assert lo <= meta["cascade_minus_best_single_at_its_cost"].value <= hi
    assert 0 < meta["cascade_accuracy_at_best_single_cost"].value <= 1
    assert 0 < meta["cascade_cost_at_best_single_accuracy_ratio"].value
    routers = {r.data["router"] for r in meta["frontier_table"].value.records}
    assert {"cascade", "query-only router", "learned cascade", "random mix", "oracle", *MODELS} <= routers
    chosen = meta["chosen"].value
    assert set(chosen) == {"learned cascade", "fixed: next two agree, else best", "fixed: best on training rows",
                           "knob values won on the validation rows"}
    won = chosen["knob values won on the validation rows"]  # one candidate per knob value of the sweep
    assert set(won) <= {"query-only router", "learned", *chosen} and sum(won.values()) == 202  # 0, 200, inf
    pairs = {r.data["models"]: r.data for r in meta["agreement_on_training_rows"].value.records}
    assert set(pairs) == {"flash-lite + flash", "flash-lite + pro", "flash + pro"}
    assert all(0 < r["agree"] < 1 and 0.5 < r["right_when_agreeing"] <= 1 for r in pairs.values())
    assert "data:image/png;base64," in meta["frontier"].value
    assert Path(meta["frontier_png"].value).stat().st_size > 0
    assert check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert (artifacts / "pool_cascade" / "report.json").exists()
    # The cascade to serve: the candidate the validation rows choose at the released lambda, its test figures beside.
    evidence, served = meta["served_cascade_evidence"].value, meta["served_cascade"].value
    assert evidence["validation"]["rows"] == 150 and evidence["test"]["rows"] == 150
    t = evidence["test"]
    assert t["accuracy_difference_lo"] <= t["accuracy_difference"] <= t["accuracy_difference_hi"]
    assert t["accuracy_difference"] == pytest.approx(t["cascade_accuracy"] - t["query_only_accuracy"], abs=1e-9)
    released = json.loads((artifacts / "pool_cascade" / "cascade.json").read_text())
    assert " -> ".join("+".join(step) for step in released["plan"]) == served
    assert released["default"] == meta["served_by_default"].value and released["about"]["test"] == t
    assert released["kind"] == meta["served_cascade_kind"].value
    assert (artifacts / "pool_cascade" / "cascade_heads.npz").is_file() == (released["kind"] == "learned")


def test_without_answer_columns_the_cascade_is_skipped_saying_why(defs, resources, outcomes_slice, monkeypatch):
    frame = outcomes_slice.drop(columns=[m + "_answer" for m in MODELS])
    meta, check = _materialise(defs, resources, frame, monkeypatch)
    assert "a cascade compares the answers of at least two models" in meta["skipped"].value
    assert "cascade_aiq" not in meta
    assert check.passed and "no cascade" in check.description
