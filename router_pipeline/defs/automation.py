"""What keeps the router current: the council-folder sensor, the retraining job and its
weekly schedule.

- ``council_sensor`` (shipped RUNNING): every 60 s it fingerprints the session files
  under the council folder; when one is new, changed or removed it requests one run
  of ``council_refresh_job`` (council_labels and what depends on it, up to the SFT/DPO
  datasets). The cursor holds the fingerprints, so unchanged files are never
  reprocessed. Running by default because it is cheap: no answering model is
  called, only the analyser for new council queries.
- ``retraining_job`` + ``weekly_retraining`` (shipped STOPPED): the whole graph,
  questions to released_router, Mondays 03:00 UTC. Stopped by default because a full
  retrain spends Gemini and Modal GPU money and needs their credentials: an operator
  turns it on (UI toggle or ``dagster schedule start weekly_retraining``). Its run
  config comes from the settings when the definitions are built:
  ROUTER_RETRAIN_SOURCES (default bundled; the outcomes of the routing server's feedback
  are always added, last, from its SQLite state database when it exists; with PostgreSQL,
  list the file ``router-pipeline export-outcomes`` writes), ROUTER_RETRAIN_SAMPLE_SIZE (default 0 =
  every question), ROUTER_RETRAIN_COMPUTE (modal | local, default modal) and
  ROUTER_RETRAIN_CRON. Its Gemini calls go through the Batch API (half price).

Why a schedule and a sensor, not declarative automation:
- the retrain needs run config that differs from the defaults (every question, not
  the 24 of the offline sample; Modal GPUs): ``AutomationCondition.on_cron`` would
  materialise the assets with their defaults, i.e. retrain on 24 questions locally.
- the council folder is outside Dagster: no upstream asset changes when a file is
  dropped there, so ``eager`` would never fire; a sensor is what sees the files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import dagster as dg

from router_pipeline import settings
from router_pipeline.artifacts import STATE_FILE, Artifacts
from router_pipeline.labels.council import council_files
from router_pipeline.defs.resources import CouncilInbox, LLMRoles
from router_pipeline.llm.roles import roles_for
from router_pipeline.settings import Settings

DATASETS = ["sft_dataset", "dpo_dataset"]
COUNCIL_REFRESH = dg.AssetSelection.assets("council_labels").downstream() & \
    dg.AssetSelection.assets(*DATASETS).upstream()

council_refresh_job = dg.define_asset_job(
    "council_refresh_job", selection=COUNCIL_REFRESH,
    description="Re-read the council folder and rebuild the labels, analyses, examples and datasets.")
retraining_job = dg.define_asset_job(
    "retraining_job", selection=dg.AssetSelection.all(),
    description="The whole graph: questions, answers, labels, datasets, SFT, DPO, evaluation, release.")


def fingerprints(folder) -> dict[str, str]:
    """Relative path -> sha256 of the content, for every session file."""
    out = {}
    for path in council_files(folder):
        out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


@dg.sensor(job=council_refresh_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="New or changed llm-council session files -> refresh council labels and datasets.")
def council_sensor(context: dg.SensorEvaluationContext, council_inbox: CouncilInbox):
    folder = council_inbox.path()
    if not folder.is_dir():
        return dg.SkipReason(f"council folder {folder} does not exist")
    current = fingerprints(folder)
    before = json.loads(context.cursor) if context.cursor else {}
    added = sorted(set(current) - set(before))
    changed = sorted(k for k in set(current) & set(before) if current[k] != before[k])
    removed = sorted(set(before) - set(current))
    if not (added or changed or removed):
        return dg.SkipReason(f"no new or changed session files in {folder} ({len(current)} known)")
    state = json.dumps(current, sort_keys=True)
    context.update_cursor(state)
    return dg.RunRequest(
        run_key=hashlib.sha256(state.encode()).hexdigest()[:16],
        tags={"council/added": str(len(added)), "council/changed": str(len(changed)), "council/removed": str(len(removed))},
    )


def retraining_run_config(s: Settings) -> dict:
    sources = [{"source": source, "path": path} for source, path in s.retrain_sources]
    feedback = Artifacts(s.artifacts_dir).feedback / STATE_FILE  # the routing server's state database
    sources.append({"source": "outcomes", "path": str(feedback), "required": False})  # production feedback, once there is some
    return {"ops": {"questions": {"config": {"sources": sources, "sample_size": s.retrain_sample_size}}},
            # A full retrain is a large label run: Gemini calls go through the Batch API (half price).
            "resources": {"compute": {"config": {"where": s.retrain_compute}},
                          "llm": {"config": LLMRoles.of(replace(roles_for(s), batch=True)).model_dump(exclude_none=True)}}}


def weekly_retraining_schedule(s: Settings) -> dg.ScheduleDefinition:
    @dg.schedule(name="weekly_retraining", job=retraining_job, cron_schedule=s.retrain_cron,
                 execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.STOPPED,
                 description="Weekly full retrain (stopped by default: it spends Gemini and GPU money).")
    def weekly_retraining(context: dg.ScheduleEvaluationContext):
        return dg.RunRequest(run_key=None, run_config=retraining_run_config(s),
                             tags={"retrain/scheduled_for": context.scheduled_execution_time.isoformat()})

    return weekly_retraining


@dg.definitions
def automation() -> dg.Definitions:
    """Built when the definitions load: the schedule takes the settings of that moment."""
    return dg.Definitions(jobs=[council_refresh_job, retraining_job], sensors=[council_sensor],
                          schedules=[weekly_retraining_schedule(settings.load())])
