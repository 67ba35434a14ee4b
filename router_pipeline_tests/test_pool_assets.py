"""The pool_routing group through Dagster: pool_job with the offline resources (the three
Gemma 3 270M stand-ins flash-lite, flash and pro answer real SimpleQA questions and an
llm-council session's query, the rules judge grades them) trains, scores and releases a
pool router that ``route --pool`` and ``answer --pool`` use; and pool_outcomes on a
small run, with a grade missing and after the pool changed."""

import json
import math
import os
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from router_pipeline.policies import GRADES
from router_pipeline_tests.support import write_asset

MODELS = ["flash-lite", "flash", "pro"]  # the offline pool (llm.pool.offline_pool), cheapest first
CANDIDATES = ["minilm_lda", "minilm_knn"]  # MiniLM only: no Gemma encoder pass or bf16 export, so seconds
POOL_ASSETS = {"pool_questions", "pool_answers", "pool_judgments", "pool_outcomes", "pool_routers", "pool_evaluation",
               "released_pool_router", "pool_cascade"}


def _metadata(result) -> dict:
    return {m.asset_key.to_user_string(): m.materialization.metadata for m in result.get_asset_materialization_events()}


def _checks(result) -> dict:
    return {(c.asset_key.to_user_string(), c.check_name): c for c in result.get_asset_check_evaluations()}


def _records(value) -> list[dict]:
    return [r.data for r in value.records]


def test_pool_job_answers_grades_trains_scores_and_releases_a_router_that_routes(
        gemma_path, sample_questions, defs, resources, artifacts, capsys):
    """10 real SimpleQA questions: 8 train (2 of them held out by training_examples: the
    knob's validation rows) and 2 test; every model of the offline pool answers all 10.
    An llm-council session holds flash's and pro's answers to an 11th query (a training
    row): recorded, judged against the council's final answer; flash-lite answers it.
    pool_job runs with the definitions' own resources (the offline profile)."""
    from router_pipeline.evaluation.cascade import RELEASE_RULE
    from router_pipeline.evaluation.pool import MIN_ROWS_TO_BLOCK, POOL_RULES
    from router_pipeline.routers.cascade import released_cascade
    from router_pipeline.routers.pool import PoolRouter
    from router_pipeline.routers.registry import load_router
    from router_pipeline.serve import cli

    assert resources["pool"].pool().names == MODELS
    io = resources["io_manager"]
    train = sample_questions[sample_questions["split"] == "train"].head(8)
    test = sample_questions[sample_questions["split"] == "test"].head(2)
    held_out = list(train["qid"][:2])
    write_asset(io, "train_questions", train)
    write_asset(io, "test_questions", test)
    write_asset(io, "training_examples", train[["qid", "query"]].assign(
        split=["validation" if q in held_out else "train" for q in train["qid"]]))
    council_query = "Who composed the opera Turandot?"
    answers_of = {"flash": "It was Giacomo Puccini.", "pro": "Giuseppe Verdi wrote it."}
    (Path(os.environ["ROUTER_PIPELINE_COUNCIL_DIR"]) / "s1.json").write_text(json.dumps({
        "query": council_query, "stage1_results": [{"model": m, "response": r} for m, r in answers_of.items()],
        "stage2_results": [{"model": "flash", "parsed_ranking": {"ranking": ["Response B", "Response A"]}},
                           {"model": "pro", "parsed_ranking": {"ranking": ["Response A", "Response B"]}}],
        "stage3_result": {"model": "pro", "response": "Giacomo Puccini"},
        "metadata": {"label_to_model": {"Response A": "flash", "Response B": "pro"}}}))

    job = defs.resolve_job_def("pool_job")
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), run_config={"ops": {
        "pool_routers": {"config": {"candidates": CANDIDATES, "knob": "budget", "knob_value": 2.0}},
        "pool_evaluation": {"config": {"bootstrap_resamples": 200}}}})
    assert result.success
    meta = _metadata(result)
    assert set(meta) == POOL_ASSETS
    checks = _checks(result)

    # pool_questions: both splits and the council session's query, as a training row.
    assert meta["pool_questions"]["council_rows"].value == 1 and meta["pool_questions"]["rows"].value == 11
    assert meta["pool_questions"]["council_answers_by_model"].value == {"flash-lite": 0, "flash": 1, "pro": 1}

    # pool_answers: every pool model answered every question, priced as Flash-Lite < Flash < Pro;
    # the council's answers are recorded, not paid again: 30 + 1 (flash-lite on the council query) calls.
    answers = result.output_for_node("pool_answers")
    assert len(answers) == 3 * 11 and set(answers["tier"]) == set(MODELS)
    assert meta["pool_answers"]["models"].value == {m: "local:gemma3-270m" for m in MODELS}
    assert meta["pool_answers"]["model_calls"].value == 31 and checks[("pool_answers", "no_failed_calls")].passed
    recorded = answers[answers["status"] == "recorded"].set_index("tier")["answer"].to_dict()
    assert recorded == answers_of

    # pool_outcomes: a row per question, <model>_grade and _cost_usd for each model, and split.
    outcomes = pd.read_parquet(artifacts / "assets" / "pool_outcomes.parquet")
    council_row = outcomes.set_index("query").loc[council_query]
    assert len(outcomes) == 11 and set(outcomes["qid"]) == set(train["qid"]) | set(test["qid"]) | {council_row["qid"]}
    assert (council_row["split"], council_row["flash_grade"], council_row["pro_grade"]) == ("train", "Correct", "Incorrect")
    for m in MODELS:
        assert {f"{m}_grade", f"{m}_cost_usd"} <= set(outcomes.columns), m
        assert outcomes[f"{m}_grade"].isin(GRADES).all() and (outcomes[f"{m}_cost_usd"] > 0).all(), m
    # A recorded answer of unknown cost counts at its model's mean cost on the other rows.
    assert council_row["pro_cost_usd"] == pytest.approx(outcomes.loc[outcomes["query"] != council_query, "pro_cost_usd"].mean())
    split = outcomes.set_index("qid")["split"]
    assert set(split[split == "validation"].index) == set(held_out)
    assert set(split[split == "test"].index) == set(test["qid"]) and (split == "train").sum() == 7
    assert meta["pool_outcomes"]["validation_slice"].value == "training_examples"
    assert meta["pool_outcomes"]["models"].value == MODELS
    per_model = {r["model"]: r for r in _records(meta["pool_outcomes"]["per_model"])}
    usd = [per_model[m]["usd_per_1000"] for m in MODELS]
    assert usd == sorted(usd) and usd[0] < usd[2]
    assert per_model["pro"]["usd_per_1000"] == pytest.approx(outcomes["pro_cost_usd"].mean() * 1000, abs=1e-4)
    graded = checks[("pool_outcomes", "every_model_graded")]
    assert graded.passed and graded.metadata["ungraded_by_model"].value == {m: 0 for m in MODELS}

    # pool_routers: each candidate fitted on the 7 training rows, its knob set on the 2 validation rows.
    routers = meta["pool_routers"]
    assert routers["knob"].value == "budget 2.0"
    assert (routers["training_rows"].value, routers["validation_rows"].value) == (7, 2)
    assert [r["candidate"] for r in _records(routers["candidates"])] == CANDIDATES
    for name in CANDIDATES:
        calibration = json.loads((artifacts / "pool" / name / "router_calibration.json").read_text())
        assert (calibration["knob"], calibration["knob_value"], calibration["validation_rows"]) == ("budget", 2.0, 2)
        assert calibration["validation_usd_per_1000"] <= 2.0 and calibration["validation_sweep"]
        assert json.loads((artifacts / "pool" / name / "router.json").read_text())["models"] == MODELS

    # pool_evaluation: the chosen candidate's frontier figures beside the single models, mix and oracle.
    ev = meta["pool_evaluation"]
    chosen = ev["chosen"].value
    assert chosen in CANDIDATES and ev["test_rows"].value == 2
    assert set(ev["validation_aiq"].value) == set(CANDIDATES) and ev["why"].value.startswith("best validation AIQ")
    table = {r["router"]: r for r in _records(ev["frontier_table"])}
    assert set(table) == set(CANDIDATES) | {"random mix", "oracle"} | set(MODELS)
    for key in ("aiq", "accuracy_at_cheapest_cost", "usd_per_1000_at_best_accuracy", "usd_per_1000_at_95pct_best"):
        assert ev[key].value == pytest.approx(table[chosen][key], abs=1e-4), key
    assert 0.0 <= ev["aiq"].value <= table["oracle"]["aiq"] + 1e-9 <= 1.0 + 1e-9
    assert set(ev["test_shares"].value) == set(MODELS) and math.isclose(sum(ev["test_shares"].value.values()), 1.0)
    assert (artifacts / "plots" / "pool_frontier.png").stat().st_size > 1000
    for name in CANDIDATES:
        figures = json.loads((artifacts / "evaluation" / f"pool_{name}" / "evaluation.json").read_text())
        assert figures["chosen"] == (name == chosen) and figures["test_rows"] == 2 and figures["models"] == MODELS
    # Both blocking rules ran; on fewer than MIN_ROWS_TO_BLOCK test rows they only warn, so the
    # release went ahead either way (a failed one says why it is not a verdict).
    assert 2 < MIN_ROWS_TO_BLOCK
    rules = {rule: c for (asset, rule), c in checks.items() if asset == "pool_evaluation"}
    assert set(rules) == set(POOL_RULES)
    for rule, c in rules.items():
        assert c.severity == dg.AssetCheckSeverity.WARN and c.metadata["candidate"].value == chosen, rule
        assert c.passed or "a warning, not a verdict" in c.description, rule

    # pool_cascade: the stand-ins' answers are recorded, but a handful of training rows cannot fit a cascade;
    # pool_routers recorded each candidate's P on its training rows for it.
    for name in CANDIDATES:
        assert (artifacts / "pool" / f"{name}.training_p.npz").is_file()
    assert "training rows: the learned cascade needs at least" in meta["pool_cascade"]["skipped"].value
    assert checks[("pool_cascade", "cascade_not_below_query_only")].passed
    # ... but a fixed cascade needs no fitting: chosen on the training rows and released beside the router. Its
    # last step is the most accurate model on the training rows: flash, right on the council's row. At the
    # released knob's lambda the validation rows, where every stand-in is graded wrong, choose the query-only
    # router over the cascades (as accurate, and cheaper): it is not served by default.
    served = meta["pool_cascade"]["served_cascade"].value
    assert served.endswith(" -> flash") and "flash" not in served.split(" -> ")[0].split("+")
    assert meta["pool_cascade"]["served_by_default"].value is False
    assert "the validation rows choose the query-only router" in meta["pool_cascade"]["served_cascade_why"].value
    assert meta["pool_cascade"]["served_cascade_kind"].value == "fixed"
    assert checks[("pool_cascade", RELEASE_RULE)].passed
    evidence = meta["pool_cascade"]["served_cascade_evidence"].value
    assert evidence["validation"]["rows"] == 2 and evidence["test"]["rows"] == 2

    # released_pool_router: <artifacts>/pool_router with a manifest of its files, the chosen candidate's.
    release = artifacts / "pool_router"
    assert meta["released_pool_router"]["router_dir"].value == str(release)
    manifest = json.loads((release / "manifest.json").read_text())["files"]
    assert {"router.json", "pool_head.npz", "router_calibration.json", "evaluation.json", "cascade.json"} <= set(manifest)
    assert meta["released_pool_router"]["cascade"].value == served
    assert meta["released_pool_router"]["cascade_by_default"].value is False
    assert json.loads((release / "router.json").read_text())["candidate"] == chosen
    assert json.loads((release / "evaluation.json").read_text())["chosen"] is True

    # What `route --pool` / `serve --pool` load: the release, manifest checked, routing among the pool.
    assert cli.default_router_dir(pool=True) == release
    router = load_router(release)
    assert isinstance(router, PoolRouter) and router.models == MODELS
    decision = router.route("Who wrote the opera Tosca?")
    assert decision.model in MODELS and set(decision.p_correct) == set(MODELS)
    capsys.readouterr()
    assert cli.main(["route", "--pool", "--json", "Who wrote the opera Tosca?"]) == 0
    routed = json.loads(capsys.readouterr().out)
    assert routed["target"] == decision.model and routed["model"] == "gemma3-270m"
    assert routed["p_correct"] == decision.p_correct
    assert "cascade" not in routed  # not served by default ...
    assert cli.main(["route", "--pool", "--cascade", "--json", "Who wrote the opera Tosca?"]) == 0
    routed = json.loads(capsys.readouterr().out)  # ... but there for the asking: `route` says what to call first
    plan = released_cascade(router).plan
    assert not released_cascade(router).by_default
    assert routed["cascade"] == {"plan": served, "first": plan.step_names(1)}
    # `answer --pool --cascade`: the released cascade runs (the offline Gemma behind every pool model); the answer
    # is the model it stopped with, priced at that model's pool price, and the charge is every call's.
    assert cli.main(["answer", "--pool", "--cascade", "--json", "Who wrote the opera Tosca?"]) == 0
    answered = json.loads(capsys.readouterr().out)
    steps = answered["cascade"]["steps"]
    assert answered["answer_status"] == "ok" and answered["answer"] and answered["cascade"]["plan"] == served
    assert {s["model"] for s in steps if s["step"] == 1} == set(routed["cascade"]["first"])
    assert [s["model"] for s in steps if s["kept"]] == [answered["target"]]
    assert answered["cost_usd"] == pytest.approx(sum(s["cost_usd"] for s in steps), abs=1e-8)
    kept = next(s for s in steps if s["kept"])
    assert kept["cost_usd"] == pytest.approx(resources["pool"].pool()[answered["target"]].cost(
        answered["input_tokens"], answered["output_tokens"]), abs=1e-8)


def _small_run(resources, questions, *, ungraded=None):
    """Upstream assets on disk for pool_outcomes: each model's answer and grade per question
    (``ungraded``: a (qid, model) the judge left without a grade)."""
    io = resources["io_manager"]
    write_asset(io, "train_questions", questions[questions["split"] == "train"])
    write_asset(io, "test_questions", questions[questions["split"] == "test"])
    write_asset(io, "pool_questions", questions)
    rows = [{"qid": q, "tier": m, "answer": "x", "cost_usd": 0.001 * (i + 1), "input_tokens": 10, "output_tokens": 2}
            for q in questions["qid"] for i, m in enumerate(MODELS)]
    answers = pd.DataFrame(rows)
    write_asset(io, "pool_answers", answers)
    judgments = answers[["qid", "tier"]].assign(label="Incorrect")
    if ungraded:
        judgments.loc[(judgments["qid"] == ungraded[0]) & (judgments["tier"] == ungraded[1]), "label"] = None
    write_asset(io, "pool_judgments", judgments)
    train = questions[questions["split"] == "train"]
    write_asset(io, "training_examples", train[["qid", "query"]].assign(split="train"))  # none held out


def test_pool_outcomes_of_a_small_run_a_missing_grade_and_a_changed_pool(sample_questions, defs, resources):
    from router_pipeline.defs.pool import MIN_VALIDATION_ROWS
    from router_pipeline.defs.resources import ModelPool
    from router_pipeline.llm.pool import pool_from_dict

    questions = pd.concat([sample_questions[sample_questions["split"] == "train"].head(8),
                           sample_questions[sample_questions["split"] == "test"].head(2)], ignore_index=True)
    missing = questions["qid"].iloc[0]
    _small_run(resources, questions, ungraded=(missing, "flash"))
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(list(defs.assets), instance=instance, resources=resources, selection=["pool_outcomes"])
    assert result.success  # the check warns: the row is kept, pool_routers leaves it out of training
    outcomes = defs.load_asset_value("pool_outcomes", instance=instance)
    # training_examples held no row out: the knob's validation rows are the training rows of smallest seeded hash.
    assert (outcomes["split"] == "validation").sum() == MIN_VALIDATION_ROWS
    assert (outcomes["split"] == "test").sum() == 2 and (outcomes["split"] == "train").sum() == 8 - MIN_VALIDATION_ROWS
    assert "smallest seeded hash" in _metadata(result)["pool_outcomes"]["validation_slice"].value
    assert pd.isna(outcomes.set_index("qid").loc[missing, "flash_grade"])
    (graded,) = _checks(result).values()
    assert not graded.passed and graded.severity == dg.AssetCheckSeverity.WARN
    assert graded.metadata["ungraded_by_model"].value == {"flash-lite": 0, "flash": 1, "pro": 0}

    # A model added to the pool after pool_answers was materialised: refused, saying what to do.
    bigger = pool_from_dict(resources["pool"].pool().to_dict()["models"] + [
        {"name": "ultra", "backend": "local", "model": "gemma3-270m", "input_usd_per_mtok": 5.0,
         "output_usd_per_mtok": 20.0}])
    failed = dg.materialize(list(defs.assets), instance=instance, resources={**resources, "pool": ModelPool.of(bigger)},
                            selection=["pool_outcomes"], raise_on_error=False)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "no answers of model 'ultra'" in message and "rematerialise pool_answers" in message
