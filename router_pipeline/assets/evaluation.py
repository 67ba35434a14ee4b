"""Evaluation assets: score the DPO router on the test split, then release it.

``router_evaluation`` routes the test split (and the train split, for threshold
calibration) on the configured compute, then replays the graded answers (no new
model calls). Its blocking checks guard ``released_router``: a retrain that loses
to the random router or to the previous evaluation never replaces the router the
CLI serves.
"""

import json
import math
from typing import Optional

import dagster as dg
import pandas as pd

from router_pipeline import compute, evaluation
from router_pipeline.assets.metadata import table
from router_pipeline.assets.training import adapter_dir, dpo_adapter
from router_pipeline.paths import artifacts_dir
from router_pipeline.plots import cost_quality_curves, markdown_image
from router_pipeline.policies import COMPLEX
from router_pipeline.routing import RouteDecision, RouterConfig, decisions_frame, write_calibration

EVALUATION_GROUP = "evaluation"
T4_USD_PER_HOUR = 0.59  # Modal's list price for a T4; override in config
REGRESSION_METRICS = ("correct", "policy_accuracy")
POINTS = {"router": "router (its decisions)", "router @ calibrated threshold": "router @ calibrated threshold",
          "always-medium": "always-medium", "always-large": "always-large"}


class EvaluationConfig(dg.Config):
    compute: str = "local"  # local | modal (T4)
    adapter: str = "dpo"  # which trained adapter: dpo | sft
    mode: Optional[str] = None  # None: the mode recorded with the adapter
    fallback: str = COMPLEX  # policy used when the router's output does not parse
    min_policy_mass: float = 0.0  # fast mode: below it the output counts as unparsed
    ambiguous: str = "medium"  # what Ambiguous_Query routes to here: medium | large | abstain
    random_seeds: int = 20
    knn_k: int = 5
    target_share: Optional[float] = None  # calibrate to this share of large calls ...
    target_pgr: float = 0.9  # ... or else to the cheapest threshold recovering this much of the gap
    regression_tolerance: float = 0.05  # allowed drop in correct / policy_accuracy vs the last evaluation
    batch_size: int = 16
    max_new_tokens: int = 96  # reasoning mode: room for the analysis and the decision
    gpu_usd_per_hour: float = T4_USD_PER_HOUR
    progress: bool = True


def _route(config: EvaluationConfig, adapter, queries: list[str]) -> tuple[list[dict], Optional[float]]:
    router_config = RouterConfig(mode=config.mode, fallback=config.fallback, batch_size=config.batch_size,
                                 max_new_tokens=config.max_new_tokens, min_policy_mass=config.min_policy_mass).__dict__
    if config.compute == "modal":
        return compute.launch_modal_route(adapter, queries, router_config)
    return compute.route_queries(adapter, queries, router_config, progress=config.progress), None


def _previous(context, key: dg.AssetKey) -> dict:
    """The headline figures of the last evaluation before this run."""
    event = context.instance.get_latest_materialization_event(key)
    if event is None:
        return {}
    meta = event.asset_materialization.metadata
    return {m: meta[m].value for m in REGRESSION_METRICS if m in meta}


def _plain(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


@dg.asset(
    group_name=EVALUATION_GROUP, kinds={"pytorch"}, deps=[dpo_adapter],
    check_specs=[
        dg.AssetCheckSpec("beats_random", asset="router_evaluation", blocking=True,
                          description="The router's APGR exceeds the mean APGR of random routers on the same data."),
        dg.AssetCheckSpec("no_regression", asset="router_evaluation", blocking=True,
                          description="Accuracy and policy accuracy are not worse than the previous evaluation's beyond the tolerance."),
    ],
)
def router_evaluation(context: dg.AssetExecutionContext, config: EvaluationConfig, train_questions: pd.DataFrame,
                      test_questions: pd.DataFrame, answers: pd.DataFrame, judgments: pd.DataFrame,
                      training_examples: pd.DataFrame):
    """The router on the held-out test split: policy accuracy, SimpleQA metrics of the
    routed answers, cost, and the cost-quality curve (APGR, CPT) against random,
    always-medium, always-large, oracle and MiniLM k-NN/logistic baselines."""
    if config.compute not in compute.COMPUTES:
        raise dg.Failure(f"compute must be one of {compute.COMPUTES}, got {config.compute!r}")
    adapter = adapter_dir(config.adapter)
    if not (adapter / "adapter_config.json").exists():
        raise dg.Failure(f"no {config.adapter} adapter at {adapter}: materialise the training assets first")
    previous = _previous(context, context.asset_key)  # read before this run's own materialisation lands
    test = evaluation.outcome_table(test_questions, answers, judgments)
    train = evaluation.outcome_table(train_questions, answers, judgments)
    if test.empty:
        raise dg.Failure("no test question has both grades: nothing to evaluate (check answers/judgments)")
    queries = list(test["query"]) + list(train["query"])
    context.log.info(f"routing {len(test)} test + {len(train)} train queries on {config.compute}")
    records, gpu_seconds = _route(config, adapter, queries)
    decisions = decisions_frame([RouteDecision(**r) for r in records], list(test["qid"]) + list(train["qid"]))
    report = evaluation.evaluate(test, decisions.iloc[:len(test)], train, decisions.iloc[len(test):],
                                 training_examples[["query", "policy"]], ambiguous=config.ambiguous,
                                 random_seeds=config.random_seeds, target_share=config.target_share,
                                 target_pgr=config.target_pgr, knn_k=config.knn_k)
    write_calibration(adapter, {**report.calibration, "p_large": "P(Complex_Query)", "split": "train"})
    plot = cost_quality_curves(
        {name: (c.share, c.accuracy) for name, c in report.curves.items()},
        {POINTS[row["router"]]: (row["large_share"], row["correct"]) for row in report.summary.to_dict("records")
         if row["router"] in POINTS},
        artifacts_dir() / "plots" / "cost_quality.png")
    router = report.summary.iloc[0]
    parse_failures = int((~decisions["parse_ok"].iloc[:len(test)]).sum())  # test split; the train split is for calibration
    meta = {
        "test_questions": len(test),
        "test_questions_ungraded": len(test_questions) - len(test),
        "correct": _plain(router["correct"]),
        "policy_accuracy": _plain(router["policy_accuracy"]),
        "apgr": _plain(router["apgr"]),
        "random_apgr": _plain(report.random_apgr),
        "cpt50": _plain(router["cpt50"]),
        "cpt80": _plain(router["cpt80"]),
        "cost_usd": _plain(router["cost_usd"]),
        "savings_vs_large": _plain(router["savings_vs_large"]),
        "large_share": _plain(router["large_share"]),
        "parse_failures": parse_failures,
        "parse_failures_train": int((~decisions["parse_ok"].iloc[len(test):]).sum()),
        "summary": table(report.summary.round(4)),
        "confusion_matrix": table(report.confusion),
        "cost_quality_curve": dg.MetadataValue.md(markdown_image(plot, "cost-quality curves")),
        "cost_quality_png": dg.MetadataValue.path(str(plot)),
        "calibration": dg.MetadataValue.json(report.calibration),
        "mode": records[0]["mode"] if records else None,
        "compute": config.compute,
        "mean_latency_ms": _plain(decisions["latency_ms"].mean()),
    }
    if gpu_seconds is not None:
        meta["gpu_seconds"] = round(gpu_seconds, 1)
        meta["estimated_cost_usd"] = round(gpu_seconds / 3600 * config.gpu_usd_per_hour, 4)
    yield dg.Output(report.per_query, metadata=meta)

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

    drops = {m: previous[m] - meta[m] for m in previous
             if previous[m] is not None and meta[m] is not None and previous[m] - meta[m] > config.regression_tolerance}
    yield dg.AssetCheckResult(check_name="no_regression", passed=not drops, metadata={
        "previous": dg.MetadataValue.json(previous or {"note": "no previous evaluation"}),
        "current": dg.MetadataValue.json({m: meta[m] for m in REGRESSION_METRICS}),
        "tolerance": config.regression_tolerance,
        "regressions": dg.MetadataValue.json(drops)})


RELEASE_DIR = "router"


def release_dir():
    return artifacts_dir() / RELEASE_DIR


class ReleaseConfig(dg.Config):
    adapter: str = "dpo"  # the adapter router_evaluation evaluated


@dg.asset(group_name=EVALUATION_GROUP, deps=[router_evaluation])
def released_router(context: dg.AssetExecutionContext, config: ReleaseConfig) -> dg.MaterializeResult:
    """The evaluated adapter copied to artifacts/router/, what `router-pipeline route`
    serves by default. Runs only when router_evaluation's blocking checks pass."""
    src = adapter_dir(config.adapter)
    dest = compute.install_adapter(src, release_dir())
    event = context.instance.get_latest_materialization_event(router_evaluation.key)
    figures = {}
    if event is not None:
        md = event.asset_materialization.metadata
        figures = {k: md[k].value for k in ("correct", "policy_accuracy", "apgr", "random_apgr", "cpt50", "cpt80") if k in md}
    (dest / "evaluation.json").write_text(json.dumps(figures, indent=2))
    return dg.MaterializeResult(metadata={"router_dir": dg.MetadataValue.path(str(dest)), "from": str(src), **figures})


EVALUATION_ASSETS = [router_evaluation, released_router]
