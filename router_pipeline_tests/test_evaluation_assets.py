"""router_evaluation and released_router through Dagster, and routing on Modal up to
the SDK boundary."""

import json
import re
from pathlib import Path

import dagster as dg
import modal
import pandas as pd
import pytest

from router_pipeline.training import compute
from router_pipeline.policies import AMBIGUOUS, COMPLEX, STANDARD
from router_pipeline.routers.contract import RouteDecision
from router_pipeline_tests.support import FakeRemote, training_examples, write_asset

TRAIN = [f"Train question number {i} about an obscure topic?" for i in range(8)]
TEST = [f"Held-out question {i} about a little-known person?" for i in range(8)]
VALIDATION = {"tr6", "tr7"}  # held out from training: the threshold is calibrated there


@pytest.fixture
def graded(artifacts, resources):
    """Upstream assets on disk: on even questions only the large model is right (the
    oracle says Complex), on odd ones both are (Standard)."""
    io = resources["io_manager"]
    rows = [(f"tr{i}", q, "train") for i, q in enumerate(TRAIN)] + [(f"te{i}", q, "test") for i, q in enumerate(TEST)]
    questions = pd.DataFrame(rows, columns=["qid", "query", "split"]).assign(gold_answer="x")
    write_asset(io, "train_questions", questions[questions["split"] == "train"])
    write_asset(io, "test_questions", questions[questions["split"] == "test"])
    answers, judgments = [], []
    for qid, _, split in rows:
        even = int(qid[2:]) % 2 == 0
        for tier, label, cost in (("medium", "IDK" if even else "Correct", 0.001), ("large", "Correct", 0.01)):
            answers.append({"qid": qid, "split": split, "tier": tier, "cost_usd": cost})
            judgments.append({"qid": qid, "split": split, "tier": tier, "label": label})
    write_asset(io, "answers", pd.DataFrame(answers))
    write_asset(io, "judgments", pd.DataFrame(judgments))
    qids = [f"tr{i}" for i in range(8)]
    write_asset(io, "training_examples", pd.DataFrame({
        "qid": qids, "query": TRAIN, "policy": [COMPLEX, STANDARD] * 4,
        "split": ["validation" if q in VALIDATION else "train" for q in qids]}))
    for stage in ("sft", "dpo"):
        adapter = artifacts / "adapters" / stage
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(json.dumps({"stage": stage}))
    for head in ("gemma", "minilm_lda", "logistic", "knn"):
        (artifacts / "heads" / head).mkdir(parents=True)
        (artifacts / "heads" / head / "router.json").write_text(json.dumps({"kind": "head", "name": head}))
    return resources


def _router(kind: str, seen: list | None = None, by_router: dict | None = None):
    """Stands in for the model work only (the routers have their own tests). ``good``
    escalates exactly the even questions, ``bad`` exactly the odd ones, ``mediocre``
    gets questions 0 and 1 wrong, ``unparseable`` fails to decide on them;
    ``by_router`` gives a kind per router folder name instead."""

    def route_queries(router_dir, queries, router_config, progress=False):
        if seen is not None:
            seen.extend(queries)
        kind_ = by_router[Path(router_dir).name] if by_router else kind
        return [_decide(kind_, q) for q in queries]

    return route_queries


def _decide(kind: str, q: str) -> dict:
    i = int(re.search(r"\d+", q).group())
    complex_ = (i % 2 == 0) == (kind != "bad")
    if kind == "mediocre" and i in (0, 1) and q.startswith("Held-out"):
        complex_ = not complex_
    p = 0.9 if complex_ else 0.1
    d = RouteDecision(q, COMPLEX if complex_ else STANDARD, {STANDARD: 1 - p, COMPLEX: p, AMBIGUOUS: 0.0}, True, "fast")
    if kind == "unparseable" and i in (0, 1) and q.startswith("Held-out"):
        d = RouteDecision(q, COMPLEX, {}, False, "reasoning", parse_error="no [DECISION] marker", fallback_used=True)
    if kind == "collapsed":  # DPO's failure: one policy for everything, the ranking kept
        d = RouteDecision(q, STANDARD, {STANDARD: 1 - p / 1000, COMPLEX: p / 1000, AMBIGUOUS: 0.0}, True, "fast")
    return d.to_dict()


def _materialise(resources, instance, candidates=("sft",)):
    from router_pipeline.definitions import build_defs

    return dg.materialize(list(build_defs().assets), selection=["router_evaluation", "released_router"],
                          instance=instance, resources=resources, raise_on_error=False,
                          run_config={"ops": {"router_evaluation": {"config": {"candidates": list(candidates)}}}})


def _checks(result) -> dict:
    return {c.check_name: c.passed for c in result.get_asset_check_evaluations()}


def _released(result) -> bool:
    return any(m.asset_key.to_user_string() == "released_router" for m in result.get_asset_materialization_events())


def test_evaluation_metadata_calibration_and_release(graded, artifacts, monkeypatch):
    seen = []
    monkeypatch.setattr(compute, "route_queries", _router("good", seen))
    first = _materialise(graded, dg.DagsterInstance.ephemeral())
    assert first.success
    # The router saw the test split and the validation slice, never a training row.
    assert set(seen) == set(TEST) | {TRAIN[6], TRAIN[7]}
    meta = {m.asset_key.to_user_string(): m.materialization.metadata for m in first.get_asset_materialization_events()}
    ev = meta["router_evaluation"]
    assert ev["policy_accuracy"].value == 1.0 and ev["correct"].value == 1.0 and ev["parse_failures"].value == 0
    assert ev["apgr"].value > ev["random_apgr"].value and ev["large_share"].value == 0.5
    assert ev["savings_vs_large"].value == pytest.approx(1 - (4 * 0.01 + 4 * 0.001) / 0.08)
    summary = {r.data["router"]: r.data for r in ev["summary"].value.records}
    assert {"sft", "always-medium", "always-large", "oracle"} <= set(summary)
    assert summary["always-medium"]["correct"] == 0.5 and summary["oracle"]["apgr"] == pytest.approx(0.75)
    random_row = summary["random (mean of 20)"]
    assert 0.5 < random_row["correct"] < 1 and 0.3 < random_row["large_share"] < 0.7
    assert "data:image/png;base64," in ev["cost_quality_curve"].value
    assert (artifacts / "plots" / "cost_quality.png").stat().st_size > 1000
    calibration = json.loads((artifacts / "router" / "router_calibration.json").read_text())
    assert calibration["threshold"] == 0.9 and calibration["split"] == "validation" and calibration["n"] == 2
    assert "mapping" not in calibration  # the server derives its rules from the threshold (mapper.evaluated_spec)
    assert _checks(first) == {"beats_random": True, "no_regression": True, "parse_failures_within_limit": True,
                              "no_policy_collapse": True}
    released = json.loads((artifacts / "router" / "evaluation.json").read_text())
    assert released["policy_accuracy"] == 1.0 and released["served_correct"] == 1.0 and released["threshold"] == 0.9
    assert (artifacts / "router" / "adapter_config.json").exists()


def test_release_gate_compares_with_the_released_router(graded, artifacts, monkeypatch):
    instance = dg.DagsterInstance.ephemeral()
    monkeypatch.setattr(compute, "route_queries", _router("good"))
    assert _released(_materialise(graded, instance))
    released = json.loads((artifacts / "router" / "evaluation.json").read_text())

    # A worse retrain: it loses to random and regresses; the released router stays.
    monkeypatch.setattr(compute, "route_queries", _router("bad"))
    bad = _materialise(graded, instance)
    assert _checks(bad) == {"beats_random": False, "no_regression": False, "parse_failures_within_limit": True,
                            "no_policy_collapse": True}
    assert not _released(bad)
    # Better than the last (failed) evaluation but worse than the released router: refused.
    monkeypatch.setattr(compute, "route_queries", _router("mediocre"))
    mediocre = _materialise(graded, instance)
    checks = _checks(mediocre)
    assert checks["beats_random"] and not checks["no_regression"] and not _released(mediocre)
    # Good routing, but 2 of 8 test decisions unparsed (25% > 5%): refused.
    monkeypatch.setattr(compute, "route_queries", _router("unparseable"))
    unparseable = _materialise(graded, instance)
    assert not _checks(unparseable)["parse_failures_within_limit"] and not _released(unparseable)
    assert json.loads((artifacts / "router" / "evaluation.json").read_text()) == released


def test_modal_evaluation_routes_on_the_t4_function(tiny_model_dir, tmp_path, monkeypatch):
    from router_pipeline.training.lora import TrainConfig, train_sft
    from router_pipeline.training.examples import build_sft_dataset
    adapter = train_sft(build_sft_dataset(training_examples(), "fast"),
                        TrainConfig(base_model=tiny_model_dir, mode="fast", batch_size=4, grad_accum=1, max_steps=1),
                        tmp_path / "sft").adapter_dir
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    monkeypatch.setenv("ROUTER_MODAL_RUNS_ROOT", str(tmp_path / "volume"))
    monkeypatch.setattr(modal.Function, "from_name", FakeRemote)
    FakeRemote.calls = []
    decisions, gpu_s = compute.launch_modal_route(adapter, ["Who wrote Hamlet?", "What is 2 + 2?"], {"batch_size": 2})
    (app_name, fn_name, (tar, queries, config)), = FakeRemote.calls
    assert (app_name, fn_name) == ("router-pipeline", "evaluate_router") and tar[:2] == b"\x1f\x8b"
    assert queries == ["Who wrote Hamlet?", "What is 2 + 2?"] and config == {"batch_size": 2}
    assert [d["mode"] for d in decisions] == ["fast", "fast"] and gpu_s > 0
    assert all(sum(d["probabilities"].values()) == pytest.approx(1) for d in decisions)


def test_release_picks_the_candidate_with_the_better_validation_score(graded, artifacts, monkeypatch):
    """knn ranks the validation rows right and the test rows wrong; gemma the reverse.
    The release follows validation (it never looks at test scores) and says why."""

    def route_queries(router_dir, queries, router_config, progress=False):
        name = Path(router_dir).name
        good_on = "Train" if name == "knn" else "Held-out"
        return [_decide("good" if q.startswith(good_on) else "bad", q) for q in queries]

    monkeypatch.setattr(compute, "route_queries", route_queries)
    result = _materialise(graded, dg.DagsterInstance.ephemeral(), candidates=("gemma", "knn"))
    meta = {m.asset_key.to_user_string(): m.materialization.metadata for m in result.get_asset_materialization_events()}
    ev = meta["router_evaluation"]
    summary = {r.data["router"]: r.data for r in ev["summary"].value.records}
    assert summary["gemma"]["apgr"] > summary["knn"]["apgr"]  # on test, gemma is better ...
    assert summary["knn"]["validation_apgr"] > summary["gemma"]["validation_apgr"]  # ... on validation, knn
    assert ev["candidate"].value == "knn" and ev["why"].value.startswith("best cross-validated APGR: knn")
    evidence = ev["release_evidence"].value  # no head has out-of-fold scores here: the validation rows decide
    assert evidence["chosen"] == "knn" and evidence["rows"] == {"gemma": 2, "knn": 2}
    # The chosen knn loses to random on test: released_router refuses it.
    assert not _checks(result)["beats_random"] and not _released(result)
    (interval,) = [r.data for r in ev["intervals"].value.records]
    assert (interval["a"], interval["b"]) == ("gemma", "knn") and interval["diff"] > 0
    for name in ("gemma", "knn"):
        figures = json.loads((artifacts / "evaluation" / name / "evaluation.json").read_text())
        assert figures["candidate"] == name and figures["chosen"] == (name == "knn")


def test_release_weighs_out_of_fold_scores_beside_the_validation_slice(graded, artifacts, monkeypatch):
    """knn is right on the 2 validation rows, gemma on the 6 training rows out of fold
    (their OOF_FILE): the release follows all 8 rows of evidence, not the validation
    slice alone, and records them."""

    def route_queries(router_dir, queries, router_config, progress=False):
        good_on = "Train" if Path(router_dir).name == "knn" else "Held-out"
        return [_decide("good" if q.startswith(good_on) else "bad", q) for q in queries]

    for name, right in (("gemma", True), ("knn", False)):
        even = [(i % 2 == 0) == right for i in range(6)]
        pd.DataFrame({"qid": [f"tr{i}" for i in range(6)], "fold": [0, 0, 1, 1, 2, 2],
                      "p_complex": [0.9 if e else 0.1 for e in even]}).to_csv(
            artifacts / "heads" / name / "oof_scores.csv", index=False)
    monkeypatch.setattr(compute, "route_queries", route_queries)
    result = _materialise(graded, dg.DagsterInstance.ephemeral(), candidates=("knn", "gemma"))
    ev = result.asset_materializations_for_node("router_evaluation")[0].metadata
    evidence = ev["release_evidence"].value
    assert ev["candidate"].value == "gemma" and evidence["rows"] == {"knn": 8, "gemma": 8}
    assert evidence["apgr"]["gemma"] > evidence["apgr"]["knn"] and evidence["chosen_minus"]["knn"]["rows"] == 8
    assert _released(result)
    released = json.loads((artifacts / "router" / "evaluation.json").read_text())
    assert released["candidate"] == "gemma" and released["release_evidence"] == evidence


def test_released_router_releases_the_chosen_head_router(graded, artifacts, monkeypatch):
    monkeypatch.setattr(compute, "route_queries", _router("", by_router={"sft": "bad", "logistic": "good"}))
    result = _materialise(graded, dg.DagsterInstance.ephemeral(), candidates=("sft", "logistic"))
    (release,) = [m for m in result.get_asset_materialization_events() if m.asset_key.to_user_string() == "released_router"]
    assert release.materialization.metadata["from"].value == str(artifacts / "heads" / "logistic")
    assert json.loads((artifacts / "router" / "router.json").read_text())["name"] == "logistic"
    assert json.loads((artifacts / "router" / "evaluation.json").read_text())["candidate"] == "logistic"
    assert not (artifacts / "router" / "adapter_config.json").exists()


def test_a_collapsed_router_is_refused(graded, artifacts, monkeypatch):
    """40 test rows: deciding Standard for all of them, with half the labels Complex, is
    a collapse, even though the ranking (APGR) is perfect."""
    rows = [(f"te{i}", f"Held-out question {i} about a little-known person?") for i in range(8, 40)]
    io = graded["io_manager"]
    test = pd.concat([io.load_input(dg.build_input_context(asset_key=dg.AssetKey("test_questions"))),
                      pd.DataFrame(rows, columns=["qid", "query"]).assign(split="test", gold_answer="x")])
    write_asset(io, "test_questions", test)
    answers, judgments = [], []
    for qid, _ in rows:
        for tier, label in (("medium", "IDK" if int(qid[2:]) % 2 == 0 else "Correct"), ("large", "Correct")):
            answers.append({"qid": qid, "split": "test", "tier": tier, "cost_usd": 0.01})
            judgments.append({"qid": qid, "split": "test", "tier": tier, "label": label})
    for key, extra in (("answers", answers), ("judgments", judgments)):
        old = io.load_input(dg.build_input_context(asset_key=dg.AssetKey(key)))
        write_asset(io, key, pd.concat([old, pd.DataFrame(extra)], ignore_index=True))
    monkeypatch.setattr(compute, "route_queries", _router("collapsed"))
    result = _materialise(graded, dg.DagsterInstance.ephemeral(), candidates=("dpo",))
    checks = _checks(result)
    assert checks["beats_random"] and not checks["no_policy_collapse"] and not _released(result)


def test_a_released_embedding_router_is_served_with_the_evaluated_decisions(graded, artifacts, tmp_path, capsys):
    """Real MiniLM head routers, trained, evaluated and released by the pipeline; then
    `router-pipeline route` and the server's /v1/route decide each test query exactly
    as the evaluation scored it."""
    import urllib.request

    from router_pipeline.definitions import build_defs
    from router_pipeline.serve.cli import main
    from router_pipeline.serve.gateway import build_gateway
    from router_pipeline_tests.support import serving

    result = dg.materialize(
        list(build_defs().assets), selection=["head_routers", "router_evaluation", "released_router"],
        instance=dg.DagsterInstance.ephemeral(), resources=graded,
        run_config={"ops": {"head_routers": {"config": {"heads": ["minilm_lda", "logistic", "knn"]}},
                            "router_evaluation": {"config": {"candidates": ["minilm_lda", "logistic", "knn"]}}}})
    assert result.success and _released(result)
    scored = result.asset_value("router_evaluation").set_index("query")
    name = scored["candidate"].iloc[0]
    summary = {r.data["router"]: r.data for r in
               result.asset_materializations_for_node("router_evaluation")[0].metadata["summary"].value.records}
    assert {"minilm_lda", "logistic", "knn"} <= set(summary)  # every MiniLM head evaluated on the same rows
    assert json.loads((artifacts / "router" / "router.json").read_text())["name"] == name

    assert main(["route", "--json", *TEST]) == 0
    routed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["policy"] for r in routed] == list(scored.loc[TEST, f"{name}_policy"])
    assert [r["probabilities"][COMPLEX] for r in routed] == pytest.approx(list(scored.loc[TEST, f"{name}_p_complex"]),
                                                                          abs=1e-6)

    state = build_gateway(artifacts / "router", profiles_path=None, feedback_dir=tmp_path / "feedback")
    with serving(state) as url:
        for query in TEST:
            body = json.dumps({"model": "router", "messages": [{"role": "user", "content": query}]}).encode()
            request = urllib.request.Request(f"{url}/v1/route", body, {"Content-Type": "application/json"})
            reply = json.loads(urllib.request.urlopen(request, timeout=30).read())
            assert reply["policy"] == scored.loc[query, f"{name}_policy"]
            assert reply["p_complex"] == pytest.approx(scored.loc[query, f"{name}_p_complex"], abs=1e-4)


def test_unknown_candidates_and_heads_are_refused_before_the_run():
    from pydantic import ValidationError

    from router_pipeline.defs.evaluation import EvaluationConfig
    from router_pipeline.defs.training import HeadRoutersConfig

    with pytest.raises(ValidationError, match=r"unknown candidates \['svm'\]"):
        EvaluationConfig(candidates=["gemma", "svm"])
    with pytest.raises(ValidationError, match=r"unknown heads \['bert'\]"):
        HeadRoutersConfig(heads=["bert"])
