"""The council sensor, the retraining job and its schedule."""

import json

import dagster as dg
import pytest

from router_pipeline import settings
from router_pipeline.defs.automation import council_sensor, weekly_retraining_schedule
from router_pipeline.defs.resources import CouncilInbox
from router_pipeline.settings import SettingsError


def _tick(cursor=None, folder=None):
    context = dg.build_sensor_context(cursor=cursor, instance=dg.DagsterInstance.ephemeral(),
                                      resources={"council_inbox": CouncilInbox(folder=str(folder))})
    result = council_sensor(context)
    return result, context.cursor


def test_sensor_requests_one_run_for_new_files_and_skips_unchanged(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"query": "q", "best_model": "gemini-2.5-pro", "borda_score": 1}\n')
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "readme.txt").write_text("not a session file")
    first, cursor = _tick(None, tmp_path)
    assert isinstance(first, dg.RunRequest) and first.tags["council/added"] == "2"
    assert set(json.loads(cursor)) == {"a.jsonl", "b.json"}

    unchanged, same_cursor = _tick(cursor, tmp_path)
    assert isinstance(unchanged, dg.SkipReason) and same_cursor == cursor

    (tmp_path / "b.json").write_text('{"query": "edited"}')  # same name, new content
    changed, cursor2 = _tick(cursor, tmp_path)
    assert isinstance(changed, dg.RunRequest) and changed.tags["council/changed"] == "1"
    assert changed.run_key != first.run_key and cursor2 != cursor

    (tmp_path / "a.jsonl").unlink()
    removed, _ = _tick(cursor2, tmp_path)
    assert isinstance(removed, dg.RunRequest) and removed.tags["council/removed"] == "1"


def test_sensor_skips_a_missing_folder(tmp_path):
    result, _ = _tick(folder=tmp_path / "nowhere")
    assert isinstance(result, dg.SkipReason) and "does not exist" in result.skip_message


def test_the_sensor_and_council_labels_read_one_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTER_PIPELINE_COUNCIL_DIR", str(tmp_path / "inbox"))
    from router_pipeline.definitions import build_defs

    defs = build_defs()
    assert defs.resources["council_inbox"].path() == tmp_path / "inbox"
    assert "council_inbox" in defs.resolve_assets_def("council_labels").required_resource_keys
    assert "council_inbox" in council_sensor.required_resource_keys


def test_sensor_targets_council_labels_up_to_the_datasets(defs):
    job = defs.resolve_job_def("council_refresh_job")
    assert sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys) == \
        ["council_labels", "dpo_dataset", "query_analyses", "sft_dataset", "training_examples"]
    assert council_sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_weekly_retraining_schedule_and_its_run_config(monkeypatch):
    from router_pipeline.definitions import build_defs

    monkeypatch.setenv("ROUTER_RETRAIN_SAMPLE_SIZE", "500")
    monkeypatch.setenv("ROUTER_RETRAIN_COMPUTE", "local")
    monkeypatch.setenv("ROUTER_RETRAIN_CRON", "30 4 * * 0")
    monkeypatch.setenv("ROUTER_RETRAIN_SOURCES", "bundled,traffic:logs/queries.jsonl")
    defs = build_defs()  # the schedule takes the settings when the definitions are built
    schedule = defs.resolve_schedule_def("weekly_retraining")
    assert schedule.cron_schedule == "30 4 * * 0"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    job = defs.resolve_job_def("retraining_job")
    assert {"questions", "sft_adapter", "dpo_adapter", "router_evaluation", "released_router"} <= \
        {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    context = dg.build_schedule_context(scheduled_execution_time=__import__("datetime").datetime(2026, 11, 23, 3))
    request = schedule.evaluate_tick(context).run_requests[0]
    questions = request.run_config["ops"]["questions"]["config"]
    assert questions["sample_size"] == 500
    # The configured sources, then the server's feedback outcomes once they exist.
    assert [(q["source"], q["path"]) for q in questions["sources"][:2]] == \
        [("bundled", None), ("traffic", "logs/queries.jsonl")]
    assert questions["sources"][2]["source"] == "outcomes" and questions["sources"][2]["required"] is False
    assert questions["sources"][2]["path"].endswith("feedback/requests.sqlite")
    assert request.run_config["resources"]["compute"]["config"]["where"] == "local"
    assert request.run_config["resources"]["llm"]["config"]["batch"] is True  # a large label run: batch prices
    # The run config is valid for the job it launches (a real validation, not a lookup).
    assert dg.validate_run_config(job, request.run_config)
    bad = {**request.run_config, "resources": {"compute": {"config": {"where": "cloud"}}}}
    with pytest.raises(dg.DagsterInvalidConfigError, match="not in enum"):
        dg.validate_run_config(job, bad)
    assert weekly_retraining_schedule(settings.load({})).cron_schedule == "0 3 * * 1"
    monkeypatch.setenv("ROUTER_RETRAIN_COMPUTE", "cloud")
    with pytest.raises(Exception) as err:  # dg's loader wraps it; the cause names the variable
        build_defs()
    assert isinstance(err.value.__cause__, SettingsError)
    assert "ROUTER_RETRAIN_COMPUTE='cloud'; expected one of local, modal" in str(err.value.__cause__)
    monkeypatch.setenv("ROUTER_RETRAIN_COMPUTE", "local")
    monkeypatch.setenv("ROUTER_RETRAIN_SOURCES", "bundled,s3:bucket/x")
    with pytest.raises(Exception) as err:
        build_defs()
    assert "ROUTER_RETRAIN_SOURCES: unknown source 's3'" in str(err.value.__cause__)
