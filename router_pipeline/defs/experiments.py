"""The serving group: what the routing server's experiments show, read from its state
database. A thin wrapper around online_quality.py (the figures ``router-pipeline
experiment report`` prints, as a JSON file, tables and a plot). Without a state database
or without experiment traffic it materialises saying there is nothing to report, so the
whole graph still runs offline where no server ever started.
"""

import json
from typing import Optional

import dagster as dg
import pandas as pd
from pydantic import Field

from router_pipeline import settings
from router_pipeline.defs.plots import experiment_arms, markdown_image
from router_pipeline.defs.resources import ArtifactStore
from router_pipeline.online_quality import (StateUnreadable, arm_rows, difference_rows, read_state, render,
                                            separation, state_location)

SERVING_GROUP = "serving"
ARMS_CHECK = "no_arm_below_another"
ARMS_CHECK_DESCRIPTION = (
    "Warns when, in an experiment, the 95% Newcombe interval of two arms' accuracy difference excludes 0: one "
    "arm's feedback accuracy is below the other's beyond the interval. Pairs where an arm has fewer than "
    "min_graded grades are not judged (it passes, saying so). Every pair is tested at 95%: with many arms, one "
    "pair in twenty may warn by chance.")


class ExperimentReportConfig(dg.Config):
    feedback_dir: Optional[str] = Field(
        default=None, description="the SQLite state database's folder (default: <artifacts>/feedback, as "
                                  "`router-pipeline experiment report`)")
    database_var: Optional[str] = Field(
        default=None, description="the environment variable holding a postgresql:// state database URL (default: "
                                  "the server's, ROUTER_DATABASE_URL). A URL may hold a password: the run config "
                                  "names a variable, never the URL")
    profile: Optional[str] = Field(default=None, description="only this serving profile's experiments")
    min_graded: int = Field(default=30, ge=1, description="grades each arm of a pair needs before the check judges "
                                                          "the pair")


def _where(config: ExperimentReportConfig, artifacts: ArtifactStore):
    """(folder, URL or None): the CLI's defaults (online_quality.state_location) unless configured."""
    url = None
    if config.database_var:
        url = settings.secret(config.database_var)
        if not url:
            raise dg.Failure(f"database_var: ${config.database_var} is not set (it should hold the postgresql:// "
                             f"URL of the state database)")
    return state_location(config.feedback_dir, url, root=artifacts.root)


def _md(rows: list[dict]) -> dg.MarkdownMetadataValue:
    return dg.MetadataValue.md(pd.DataFrame(rows).to_markdown(index=False, floatfmt="g"))


@dg.asset(group_name=SERVING_GROUP, kinds={"sqlite"},
          check_specs=[dg.AssetCheckSpec(ARMS_CHECK, asset="experiment_report", blocking=False,
                                         description=ARMS_CHECK_DESCRIPTION)])
def experiment_report(context: dg.AssetExecutionContext, config: ExperimentReportConfig,
                      artifacts: ArtifactStore) -> dg.MaterializeResult:
    """Per serving profile and experiment, each arm's requests, spend, spend per 1,000
    requests, escalations, graded requests and feedback accuracy with its 95% Wilson
    interval, and every pair of arms' accuracy difference with its 95% Newcombe interval:
    <artifacts>/experiment_report/report.json, tables and a plot (accuracy with interval
    bars, spend per 1,000 beside). Reads the state database (read-only) that
    ``router-pipeline experiment report`` reads; says "nothing to report" when there is none
    or it holds no experiment traffic."""
    layout = artifacts.layout()
    folder, url = _where(config, artifacts)
    try:
        reading = read_state(folder, url)
    except StateUnreadable as exc:
        raise dg.Failure(str(exc)) from None
    out, plot = layout.root / "experiment_report" / "report.json", layout.plots / "experiment_arms.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = arm_rows(reading.figures, config.profile) if reading.figures else []
    reason = reading.missing or (None if rows else (
        f"the state database {reading.where} holds no request served in an experiment"
        + (f" of profile {config.profile!r}" if config.profile else "")))
    if reason:
        plot.unlink(missing_ok=True)  # an earlier run's plot would show traffic that is not there
        out.write_text(json.dumps({"database": reading.where, "nothing_to_report": reason}, indent=1))
        context.log.info(f"nothing to report: {reason}")
        return dg.MaterializeResult(
            metadata={"skipped": f"nothing to report: {reason}", "database": reading.where,
                      "report_json": dg.MetadataValue.path(str(out))},
            check_results=[dg.AssetCheckResult(check_name=ARMS_CHECK, passed=True,
                                               severity=dg.AssetCheckSeverity.WARN,
                                               description=f"nothing to report: {reason}")])
    differences = difference_rows(reading.figures, config.profile)
    judged = separation(reading.figures, config.min_graded, config.profile)
    text = render(reading.figures, config.profile)
    experiment_arms(rows, plot)
    out.write_text(json.dumps({"database": reading.where, "profile": config.profile, "min_graded": config.min_graded,
                               "arms": rows, "differences": differences, "below": judged.below,
                               "unjudged": judged.unjudged}, indent=1))
    context.log.info(text)
    return dg.MaterializeResult(
        metadata={"database": reading.where, "experiments": len({(r["profile"], r["experiment"]) for r in rows}),
                  "arms": len(rows), "requests": sum(r["requests"] for r in rows),
                  "graded": sum(r["graded"] for r in rows),
                  "spend_usd": round(sum(r["spend_usd"] for r in rows), 8),
                  "arms_table": _md(rows), "differences": _md(differences) if differences else "no pair of arms",
                  "report": dg.MetadataValue.md(f"```\n{text}\n```"),
                  "arms_plot": dg.MetadataValue.md(markdown_image(plot, "accuracy and spend per arm")),
                  "arms_png": dg.MetadataValue.path(str(plot)), "report_json": dg.MetadataValue.path(str(out))},
        check_results=[_check(judged, len(differences))])


def _check(judged, pairs: int) -> dg.AssetCheckResult:
    if judged.below:
        description = "; ".join(judged.below)
    elif len(judged.unjudged) == pairs:
        description = "too little graded feedback to judge: " + "; ".join(judged.unjudged)
    else:
        description = (f"no arm below another beyond the 95% interval ({pairs - len(judged.unjudged)} of {pairs} "
                       f"pairs judged)" + ("; " + "; ".join(judged.unjudged) if judged.unjudged else ""))
    return dg.AssetCheckResult(check_name=ARMS_CHECK, passed=not judged.below, severity=dg.AssetCheckSeverity.WARN,
                               description=description,
                               metadata={"pairs": pairs, "pairs_judged": pairs - len(judged.unjudged),
                                         "pairs_below": len(judged.below)})
