"""Evaluation assets: score the trained router on the test split, then release it.

``router_evaluation`` routes the test split (and the validation slice held out from
training, for threshold calibration) on the configured compute, then replays the
graded answers (no new model calls). Its blocking checks guard ``released_router``:
a retrain that loses to the random router, regresses against the released router,
or fails to decide more than 5% of the time never replaces the router the CLI serves.
"""

import json
import math
import shutil
from typing import Literal, Optional

import dagster as dg
import pandas as pd

from router_pipeline import compute as compute_module
from router_pipeline import evaluation
from router_pipeline.artifacts import ADAPTER_CONFIG, CALIBRATION_FILE, EVALUATION_FILE, SUMMARY_FILE, Artifacts
from router_pipeline.defs.metadata import table
from router_pipeline.defs.resources import ArtifactStore, TrainingCompute
from router_pipeline.defs.training import dpo_adapter
from router_pipeline.plots import cost_quality_curves, markdown_image
from router_pipeline.routing import RouteDecision, RouterConfig, decisions_frame
from router_pipeline.serve.mapper import evaluated_spec
from router_pipeline.split import VALIDATION

EVALUATION_GROUP = "evaluation"
REGRESSION_METRICS = ("served_correct", "policy_accuracy")
MAX_PARSE_FAILURE_RATE = 0.05  # a router that fails to decide more often than this is never released
CALIBRATED = "router @ calibrated threshold"
POINTS = {"router": "router (its decisions)", "router @ calibrated threshold": "router @ calibrated threshold",
          "always-medium": "always-medium", "always-large": "always-large"}
_R = RouterConfig()  # the one source of the routing defaults


class EvaluationConfig(dg.Config):
    adapter: Literal["dpo", "sft"] = "dpo"  # which trained adapter; released_router releases this one
    fallback: Literal["Standard_Query", "Complex_Query", "Ambiguous_Query"] = _R.fallback  # when an output does not parse
    min_policy_mass: float = _R.min_policy_mass  # fast mode: below it the output counts as unparsed
    ambiguous: Literal["medium", "large", "abstain"] = "medium"  # what Ambiguous_Query routes to here
    random_seeds: int = 20
    knn_k: int = 5
    target_share: Optional[float] = None  # calibrate to this share of large calls ...
    target_pgr: float = 0.9  # ... or else to the cheapest threshold recovering this much of the gap
    regression_tolerance: float = 0.05  # allowed drop in served accuracy / policy accuracy vs the released router
    batch_size: int = _R.batch_size
    max_new_tokens: int = _R.max_new_tokens  # reasoning mode: room for the analysis and the decision


def _route(config: EvaluationConfig, compute: TrainingCompute, adapter, queries: list[str]):
    """(decision dicts, GPU seconds or None) from the router on the configured compute."""
    router_config = RouterConfig(fallback=config.fallback, batch_size=config.batch_size,
                                 max_new_tokens=config.max_new_tokens, min_policy_mass=config.min_policy_mass).__dict__
    if compute.where == "modal":
        return compute_module.launch_modal_route(adapter, queries, router_config)
    return compute_module.route_queries(adapter, queries, router_config, progress=compute.progress), None


def released_figures(layout: Artifacts) -> dict:
    """The headline figures of the router released now ({} when none is)."""
    path = layout.release / EVALUATION_FILE
    if not path.exists():
        return {}
    try:
        figures = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise dg.Failure(f"{path} of the released router is unreadable ({exc}); restore it or delete the release") from None
    return figures if isinstance(figures, dict) else {}


def _plain(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


@dg.asset(
    group_name=EVALUATION_GROUP, kinds={"pytorch"}, deps=[dpo_adapter],
    check_specs=[
        dg.AssetCheckSpec("beats_random", asset="router_evaluation", blocking=True,
                          description="The router's APGR exceeds the mean APGR of random routers on the same data."),
        dg.AssetCheckSpec("no_regression", asset="router_evaluation", blocking=True,
                          description="Served accuracy and policy accuracy are not worse than the released router's "
                                      "beyond the tolerance."),
        dg.AssetCheckSpec("parse_failures_within_limit", asset="router_evaluation", blocking=True,
                          description=f"At most {MAX_PARSE_FAILURE_RATE:.0%} of the test decisions are parse failures."),
    ],
)
def router_evaluation(context: dg.AssetExecutionContext, config: EvaluationConfig, artifacts: ArtifactStore,
                      compute: TrainingCompute, train_questions: pd.DataFrame, test_questions: pd.DataFrame,
                      answers: pd.DataFrame, judgments: pd.DataFrame, training_examples: pd.DataFrame):
    """The router on the held-out test split: policy accuracy, SimpleQA metrics of the
    routed answers, cost, and the cost-quality curve (APGR, CPT) against random,
    always-medium, always-large, oracle and MiniLM k-NN/logistic baselines. The
    threshold is calibrated on the validation slice held out from training."""
    layout = artifacts.layout()
    adapter = layout.adapter(config.adapter)
    if not (adapter / ADAPTER_CONFIG).exists():
        raise dg.Failure(f"no {config.adapter} adapter at {adapter}: materialise the training assets first")
    test = evaluation.outcome_table(test_questions, answers, judgments)
    if test.empty:
        raise dg.Failure("no test question has both grades: nothing to evaluate (check answers/judgments)")
    held_out = set(training_examples.loc[training_examples["split"] == VALIDATION, "qid"])
    validation = evaluation.outcome_table(train_questions[train_questions["qid"].isin(held_out)], answers, judgments)
    queries = list(test["query"]) + list(validation["query"])
    context.log.info(f"routing {len(test)} test + {len(validation)} validation queries on {compute.where}")
    records, gpu_seconds = _route(config, compute, adapter, queries)
    decisions = decisions_frame([RouteDecision(**r) for r in records], list(test["qid"]) + list(validation["qid"]))
    trained_on = training_examples[training_examples["split"] != VALIDATION]
    report = evaluation.evaluate(test, decisions.iloc[:len(test)], validation, decisions.iloc[len(test):],
                                 trained_on[["query", "policy"]], ambiguous=config.ambiguous,
                                 random_seeds=config.random_seeds, target_share=config.target_share,
                                 target_pgr=config.target_pgr, knn_k=config.knn_k)
    plot = cost_quality_curves(
        {name: (c.share, c.accuracy) for name, c in report.curves.items()},
        {POINTS[row["router"]]: (row["large_share"], row["correct"]) for row in report.summary.to_dict("records")
         if row["router"] in POINTS},
        layout.plots / "cost_quality.png")
    rows = report.summary.set_index("router")
    router, served = rows.loc["router"], rows.loc[CALIBRATED]
    parse_failures = int((~decisions["parse_ok"].iloc[:len(test)]).sum())
    parse_rate = parse_failures / len(test)
    figures = {
        "adapter": config.adapter,
        "mode": records[0]["mode"] if records else None,
        "test_questions": len(test),
        "validation_questions": len(validation),
        "threshold": report.calibration.get("threshold"),
        "served_correct": _plain(served["correct"]),
        "served_large_share": _plain(served["large_share"]),
        "served_savings_vs_large": _plain(served["savings_vs_large"]),
        "correct": _plain(router["correct"]),
        "policy_accuracy": _plain(router["policy_accuracy"]),
        "apgr": _plain(router["apgr"]),
        "random_apgr": _plain(report.random_apgr),
        "cpt50": _plain(router["cpt50"]),
        "cpt80": _plain(router["cpt80"]),
        "parse_failure_rate": round(parse_rate, 4),
    }
    out = layout.evaluation(config.adapter)
    out.mkdir(parents=True, exist_ok=True)
    (out / CALIBRATION_FILE).write_text(json.dumps(
        {**report.calibration, "score": "P(Complex_Query)", "split": "validation",
         "mapping": evaluated_spec(report.calibration)}, indent=2))
    (out / EVALUATION_FILE).write_text(json.dumps(figures, indent=2))
    report.summary.to_csv(out / SUMMARY_FILE, index=False)
    meta = {
        **{k: v for k, v in figures.items() if v is not None},
        "test_questions_ungraded": len(test_questions) - len(test),
        "cost_usd": _plain(router["cost_usd"]),
        "savings_vs_large": _plain(router["savings_vs_large"]),
        "large_share": _plain(router["large_share"]),
        "parse_failures": parse_failures,
        "summary": table(report.summary.round(4)),
        "confusion_matrix": table(report.confusion),
        "cost_quality_curve": dg.MetadataValue.md(markdown_image(plot, "cost-quality curves")),
        "cost_quality_png": dg.MetadataValue.path(str(plot)),
        "calibration": dg.MetadataValue.json(report.calibration),
        "compute": compute.where,
        "mean_latency_ms": _plain(decisions["latency_ms"].mean()),
    }
    if gpu_seconds is not None:
        meta["gpu_seconds"] = round(gpu_seconds, 1)
        meta["estimated_cost_usd"] = round(gpu_seconds / 3600 * compute.t4_usd_per_hour, 4)
    # The adapter column tells released_router which adapter these figures are for.
    yield dg.Output(report.per_query.assign(adapter=config.adapter), metadata=meta)

    apgr, rand = router["apgr"], report.random_apgr
    gap = test["large_label"].eq("Correct").mean() - test["medium_label"].eq("Correct").mean()
    if math.isnan(apgr):
        # No quality gap between the tiers on this test split: APGR is undefined, so
        # the router cannot be shown to beat random. Say so; do not block on it.
        yield dg.AssetCheckResult(check_name="beats_random", passed=False, severity=dg.AssetCheckSeverity.WARN,
                                  description=f"undefined: always-large is not more accurate than always-medium "
                                              f"on these {len(test)} test questions (gap {gap:+.3f})",
                                  metadata={"apgr": None, "random_apgr": None, "accuracy_gap": float(gap)})
    else:
        yield dg.AssetCheckResult(check_name="beats_random", passed=bool(apgr > rand),
                                  metadata={"apgr": float(apgr), "random_apgr": float(rand), "accuracy_gap": float(gap)})

    released = released_figures(layout)
    drops = {m: released[m] - figures[m] for m in REGRESSION_METRICS
             if released.get(m) is not None and figures[m] is not None
             and released[m] - figures[m] > config.regression_tolerance}
    yield dg.AssetCheckResult(check_name="no_regression", passed=not drops, metadata={
        "released": dg.MetadataValue.json({m: released.get(m) for m in REGRESSION_METRICS} if released
                                          else {"note": "no released router yet"}),
        "current": dg.MetadataValue.json({m: figures[m] for m in REGRESSION_METRICS}),
        "tolerance": config.regression_tolerance,
        "regressions": dg.MetadataValue.json(drops)})
    yield dg.AssetCheckResult(check_name="parse_failures_within_limit", passed=parse_rate <= MAX_PARSE_FAILURE_RATE,
                              metadata={"parse_failures": parse_failures, "rate": round(parse_rate, 4),
                                        "limit": MAX_PARSE_FAILURE_RATE})


@dg.asset(group_name=EVALUATION_GROUP)
def released_router(artifacts: ArtifactStore, router_evaluation: pd.DataFrame) -> dg.MaterializeResult:
    """The evaluated adapter, its calibration and figures, copied to <artifacts>/router/:
    what `router-pipeline route` serves by default. Runs only when router_evaluation's
    blocking checks pass."""
    layout = artifacts.layout()
    adapters = set(router_evaluation["adapter"])
    if len(adapters) != 1:
        raise dg.Failure(f"router_evaluation names {sorted(adapters)} as its adapter; expected exactly one")
    adapter = adapters.pop()
    src, evaluated = layout.adapter(adapter), layout.evaluation(adapter)
    if not (evaluated / EVALUATION_FILE).exists():
        raise dg.Failure(f"no evaluation of the {adapter} adapter at {evaluated}: materialise router_evaluation first")
    staging = layout.root / "release-staging"
    compute_module.install_adapter(src, staging)
    for name in (CALIBRATION_FILE, EVALUATION_FILE):
        shutil.copy2(evaluated / name, staging / name)
    dest = compute_module.install_adapter(staging, layout.release)
    shutil.rmtree(staging, ignore_errors=True)
    figures = json.loads((dest / EVALUATION_FILE).read_text())
    return dg.MaterializeResult(metadata={"router_dir": dg.MetadataValue.path(str(dest)), "from": str(src),
                                          **{k: v for k, v in figures.items() if v is not None}})


evaluation_job = dg.define_asset_job(
    "evaluation_job", selection=dg.AssetSelection.groups(EVALUATION_GROUP),
    description="Evaluate the trained router on the test split; release it if its checks pass.")
