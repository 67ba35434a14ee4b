"""The experiment_report asset on a real state database, written through the server's own
functions (the feedback store's request memory and grades, record_served): the figures
per arm are the ones written, the plot is drawn, and the check warns when one arm is
clearly below another and passes when the arms are close or too little is graded. With
no state database (a fresh clone, no server ever started) it says there is nothing to
report and the run succeeds."""

import json

import dagster as dg
import pytest

from router_pipeline.artifacts import STATE_FILE, Artifacts
from router_pipeline.defs.experiments import ARMS_CHECK, SERVING_GROUP, experiment_report
from router_pipeline.defs.resources import ArtifactStore
from router_pipeline.online_quality import difference, wilson
from router_pipeline.serve.experiments import record_served
from router_pipeline.serve.feedback import FeedbackStore, ServedRequest

PROFILE, EXPERIMENT = "team", "router-vs-pro"


@pytest.fixture(autouse=True)
def no_database_url(monkeypatch):
    monkeypatch.delenv("ROUTER_DATABASE_URL", raising=False)


def _serve(store: FeedbackStore, arm: str, model: str, requests: int, graded: int, correct: int, cost: float,
           escalations: int = 0, experiment: str | None = EXPERIMENT) -> None:
    """``requests`` served as ``arm`` by ``model``; the first ``graded`` get feedback, the
    first ``correct`` of them Correct."""
    for i in range(requests):
        rid = f"{experiment}-{arm}-{i}"
        store.remember(ServedRequest(rid, PROFILE, f"question {i}", model, store_query=False))
        record_served(store.db, rid, PROFILE, experiment, arm if experiment else None, "Standard_Query", model, cost,
                      i < escalations)
        if i < graded:
            store.add(rid, grade="Correct" if i < correct else "Incorrect", profile=PROFILE)


def _materialize(root, **config):
    result = dg.materialize([experiment_report], resources={"artifacts": ArtifactStore(root=str(root))},
                            run_config={"ops": {"experiment_report": {"config": config}}},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    (mat,) = result.asset_materializations_for_node("experiment_report")
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == ARMS_CHECK and check.severity == dg.AssetCheckSeverity.WARN
    return mat.metadata, check


def test_an_arm_clearly_below_another_warns_with_the_figures_written(tmp_path):
    root = tmp_path / "art"
    store = FeedbackStore(Artifacts(root).feedback)  # where the server keeps it by default
    _serve(store, "router", "medium", requests=120, graded=100, correct=90, cost=0.001, escalations=10)
    _serve(store, "pro", "large", requests=100, graded=100, correct=50, cost=0.01)
    _serve(store, "-", "large", requests=7, graded=0, correct=0, cost=0.5, experiment=None)  # not in the experiment
    store.close()

    meta, check = _materialize(root)
    report = json.loads((root / "experiment_report" / "report.json").read_text())
    arms = {r["arm"]: r for r in report["arms"]}
    assert set(arms) == {"pro", "router"} and {r["profile"] for r in arms.values()} == {PROFILE}
    acc, lo, hi = wilson(90, 100)
    assert arms["router"] == {"profile": PROFILE, "experiment": EXPERIMENT, "arm": "router", "requests": 120,
                              "spend_usd": pytest.approx(0.12), "usd_per_1000": pytest.approx(1.0), "escalations": 10,
                              "graded": 100, "accuracy": 0.9, "accuracy_lo95": pytest.approx(lo, abs=1e-4),
                              "accuracy_hi95": pytest.approx(hi, abs=1e-4)}
    assert (arms["pro"]["requests"], arms["pro"]["usd_per_1000"], arms["pro"]["graded"], arms["pro"]["accuracy"],
            arms["pro"]["escalations"]) == (100, pytest.approx(10.0), 100, 0.5, 0)
    (pair,) = report["differences"]
    d, dlo, dhi = difference((50, 100), (90, 100))
    assert (pair["a"], pair["b"], pair["accuracy_a_minus_b"]) == ("pro", "router", pytest.approx(d, abs=1e-4))
    assert (pair["lo95"], pair["hi95"]) == (pytest.approx(dlo, abs=1e-4), pytest.approx(dhi, abs=1e-4)) and dhi < 0

    assert not check.passed
    assert "arm pro's accuracy 0.500" in check.description and "below arm router's accuracy 0.900" in \
        check.description and "over 100 graded" in check.description and f"{d:+.3f}" in check.description
    assert check.metadata["pairs_below"].value == 1
    plot = root / "plots" / "experiment_arms.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert meta["arms_png"].value == str(plot) and "data:image/png;base64," in meta["arms_plot"].value
    assert (meta["arms"].value, meta["requests"].value, meta["graded"].value) == (2, 220, 200)
    assert "| router " in meta["arms_table"].value and "router-vs-pro" in meta["arms_table"].value
    assert "arm router: 120 requests, $1.000 per 1000, 10 escalations, accuracy 0.900" in meta["report"].value


def _two_arms(folder, requests: int, graded: int, router_correct: int, pro_correct: int) -> str:
    """A state database where the router and Pro arms each served ``requests``."""
    store = FeedbackStore(folder)
    _serve(store, "router", "medium", requests=requests, graded=graded, correct=router_correct, cost=0.001)
    _serve(store, "pro", "large", requests=requests, graded=graded, correct=pro_correct, cost=0.01)
    store.close()
    return str(folder)


def test_close_arms_pass_and_too_little_feedback_passes_saying_so(tmp_path):
    close = _two_arms(tmp_path / "close", requests=100, graded=100, router_correct=72, pro_correct=70)
    _, check = _materialize(tmp_path / "art", feedback_dir=close)
    assert check.passed and "no arm below another beyond the 95% interval (1 of 1 pairs judged)" in check.description

    few = _two_arms(tmp_path / "few", requests=20, graded=5, router_correct=5, pro_correct=0)
    _, check = _materialize(tmp_path / "art", feedback_dir=few)
    assert check.passed and check.description.startswith("too little graded feedback to judge")
    assert "5 and 5 graded, fewer than 30" in check.description
    _, check = _materialize(tmp_path / "art", feedback_dir=few, min_graded=5)  # 5/5 against 0/5 is clear
    assert not check.passed and "arm pro's accuracy 0.000" in check.description


def test_without_a_state_database_the_whole_graph_says_nothing_to_report(defs, resources, artifacts):
    """As in a fresh clone: the asset is in the graph (the serving group) and materialises
    with nothing to report; no folder or database is created."""
    assert defs.resolve_assets_def("experiment_report").group_names_by_key[dg.AssetKey("experiment_report")] == \
        SERVING_GROUP
    result = dg.materialize(list(defs.assets), selection=["experiment_report"], resources=resources,
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    (mat,) = result.asset_materializations_for_node("experiment_report")
    feedback = Artifacts(artifacts).feedback
    assert mat.metadata["skipped"].value == f"nothing to report: there is no state database at " \
                                            f"{feedback / STATE_FILE} (no routing server has run with this folder)"
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.description.startswith("nothing to report")
    assert not feedback.exists()


def test_a_database_without_experiment_traffic_says_nothing_to_report(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    _serve(store, "-", "large", requests=3, graded=3, correct=3, cost=0.01, experiment=None)
    store.close()
    meta, check = _materialize(tmp_path / "art", feedback_dir=str(tmp_path / "fb"))
    assert "holds no request served in an experiment" in meta["skipped"].value and check.passed
    assert not (tmp_path / "art" / "plots" / "experiment_arms.png").exists()


def test_postgresql_from_the_variable_the_config_names(tmp_path, monkeypatch, postgres_url):
    import uuid

    import psycopg

    name = f"experiments_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    store = FeedbackStore(tmp_path / "unused", database=url)
    _serve(store, "router", "medium", requests=40, graded=40, correct=36, cost=0.001)
    _serve(store, "pro", "large", requests=40, graded=40, correct=12, cost=0.01)
    store.close()
    monkeypatch.setenv("TEST_STATE_URL", url)
    meta, check = _materialize(tmp_path / "art", database_var="TEST_STATE_URL")
    assert meta["database"].value == "PostgreSQL" and meta["graded"].value == 80
    assert not check.passed and "arm pro's accuracy 0.300" in check.description
    monkeypatch.setenv("ROUTER_DATABASE_URL", url)  # the server's variable, the default
    meta, _ = _materialize(tmp_path / "art")
    assert meta["database"].value == "PostgreSQL"
    monkeypatch.delenv("TEST_STATE_URL")
    result = dg.materialize([experiment_report], resources={"artifacts": ArtifactStore(root=str(tmp_path / "art"))},
                            run_config={"ops": {"experiment_report": {"config": {"database_var": "TEST_STATE_URL"}}}},
                            raise_on_error=False, instance=dg.DagsterInstance.ephemeral())
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "$TEST_STATE_URL is not set" in failure.event_specific_data.error.message
