"""The council sensor, the retraining job and its schedule."""

import json

import dagster as dg
import pytest

from router_pipeline.automation import council_sensor, retraining_run_config, weekly_retraining
from router_pipeline.definitions import defs


def _tick(cursor=None):
    context = dg.build_sensor_context(cursor=cursor, instance=dg.DagsterInstance.ephemeral())
    result = council_sensor(context)
    return result, context.cursor


def test_sensor_requests_one_run_for_new_files_and_skips_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTER_PIPELINE_COUNCIL_DIR", str(tmp_path))
    (tmp_path / "a.jsonl").write_text('{"query": "q", "best_model": "gemini-2.5-pro", "borda_score": 1}\n')
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "readme.txt").write_text("not a session file")
    first, cursor = _tick()
    assert isinstance(first, dg.RunRequest) and first.tags["council/added"] == "2"
    assert set(json.loads(cursor)) == {"a.jsonl", "b.json"}

    unchanged, same_cursor = _tick(cursor)
    assert isinstance(unchanged, dg.SkipReason) and same_cursor == cursor

    (tmp_path / "b.json").write_text('{"query": "edited"}')  # same name, new content
    changed, cursor2 = _tick(cursor)
    assert isinstance(changed, dg.RunRequest) and changed.tags["council/changed"] == "1"
    assert changed.run_key != first.run_key and cursor2 != cursor

    (tmp_path / "a.jsonl").unlink()
    removed, _ = _tick(cursor2)
    assert isinstance(removed, dg.RunRequest) and removed.tags["council/removed"] == "1"


def test_sensor_skips_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTER_PIPELINE_COUNCIL_DIR", str(tmp_path / "nowhere"))
    result, _ = _tick()
    assert isinstance(result, dg.SkipReason) and "does not exist" in result.skip_message


def test_sensor_targets_council_labels_up_to_the_datasets():
    job = defs.resolve_job_def("council_refresh_job")
    assert sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys) == \
        ["council_labels", "dpo_dataset", "query_analyses", "sft_dataset", "training_examples"]
    assert council_sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_weekly_retraining_schedule_and_its_run_config(monkeypatch):
    assert weekly_retraining.cron_schedule == "0 3 * * 1"
    assert weekly_retraining.default_status == dg.DefaultScheduleStatus.STOPPED
    job = defs.resolve_job_def("retraining_job")
    assert {"questions", "sft_adapter", "dpo_adapter", "router_evaluation", "released_router"} <= \
        {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    monkeypatch.setenv("ROUTER_RETRAIN_SAMPLE_SIZE", "500")
    monkeypatch.setenv("ROUTER_RETRAIN_COMPUTE", "local")
    context = dg.build_schedule_context(scheduled_execution_time=__import__("datetime").datetime(2026, 11, 23, 3))
    request = weekly_retraining(context)
    ops = request.run_config["ops"]
    assert ops["questions"]["config"]["sample_size"] == 500
    assert {ops[k]["config"]["compute"] for k in ("sft_adapter", "dpo_adapter", "router_evaluation")} == {"local"}
    # The run config is valid for the job it launches.
    assert job.run_config_schema.config_type is not None
    from dagster._config import process_config

    assert process_config(job.run_config_schema.config_type, request.run_config).success
    monkeypatch.setenv("ROUTER_RETRAIN_COMPUTE", "cloud")
    with pytest.raises(ValueError, match="local or modal"):
        retraining_run_config()
