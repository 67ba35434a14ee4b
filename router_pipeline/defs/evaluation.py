"""Evaluation assets: score every candidate router on the test split, release the best.

``router_evaluation`` routes the test split and the validation slice (held out from
every candidate's training rows) with each candidate: the head routers (frozen Gemma
states; MiniLM LDA / logistic / k-NN) and the fine-tuned LM adapter, then replays the
graded answers (no new model calls). The choice (cross-validated evidence, never test
rows), the scoring and the gate's rules live in ``evaluation/``; here they are routed,
called and shown. The gate's verdicts are blocking checks on ``released_router``: a
chosen router that loses to random, regresses against the released router, fails to
decide, or decides one policy for almost every query never replaces the router that is
served.
"""

from typing import Literal

import dagster as dg
import pandas as pd
from pydantic import field_validator

from router_pipeline.artifacts import ADAPTER_CONFIG, OOF_FILE, ROUTER_FILE, STAGES, Artifacts, check_names
from router_pipeline.defs.config import derived, plain
from router_pipeline.defs.metadata import table
from router_pipeline.defs.plots import cost_quality_curves, markdown_image
from router_pipeline.defs.resources import ArtifactStore, TrainingCompute
from router_pipeline.defs.training import dpo_adapter, head_routers
from router_pipeline.evaluation import metrics, release
from router_pipeline.labels.split import VALIDATION
from router_pipeline.policies import POLICIES
from router_pipeline.routers.contract import RouteDecision, RouterConfig, decisions_frame
from router_pipeline.training import compute as compute_module

EVALUATION_GROUP = "evaluation"


class _Evaluation(dg.Config):
    """Every field and default is release.EvaluationSpec's or (routing) RouterConfig's."""

    @field_validator("candidates", check_fields=False)
    @classmethod
    def _known_candidates(cls, value: list[str]) -> list[str]:
        return check_names(value, release.CANDIDATES, "candidates")


EvaluationConfig = derived(RouterConfig, derived(release.EvaluationSpec, _Evaluation),
                           name="EvaluationConfig", exclude=("mode", "allow_hub", "prefix_cache", "precision"),
                           types={"fallback": Literal[POLICIES]})


def _route(config: EvaluationConfig, compute: TrainingCompute, name: str, router_dir, queries: list[str]):
    """(decision dicts, GPU seconds or None). LM adapters route on the configured compute;
    head routers always here (they decide in milliseconds)."""
    router_config = plain(config, RouterConfig).__dict__
    if compute.where == "modal" and name in STAGES:
        return compute_module.launch_modal_route(router_dir, queries, router_config)
    return compute_module.route_queries(router_dir, queries, router_config, progress=compute.progress), None


def _router_dir(layout: Artifacts, name: str):
    path = layout.candidate(name)
    marker = ADAPTER_CONFIG if name in STAGES else ROUTER_FILE
    if not (path / marker).exists():
        asset = f"{name}_adapter" if name in STAGES else "head_routers"
        raise dg.Failure(f"no {name} router at {path}: materialise {asset} first, or drop {name!r} from candidates")
    return path


@dg.asset(
    group_name=EVALUATION_GROUP, kinds={"pytorch"}, deps=[dpo_adapter, head_routers],
    check_specs=[dg.AssetCheckSpec(rule, asset="router_evaluation", blocking=True, description=description)
                 for rule, description in release.RULES.items()],
)
def router_evaluation(context: dg.AssetExecutionContext, config: EvaluationConfig, artifacts: ArtifactStore,
                      compute: TrainingCompute, train_questions: pd.DataFrame, test_questions: pd.DataFrame,
                      answers: pd.DataFrame, judgments: pd.DataFrame, training_examples: pd.DataFrame):
    """Every candidate router on the held-out test split: policy accuracy and mix,
    calibration (ECE of P(Complex_Query)), SimpleQA metrics of the routed answers, cost,
    the cost-quality curve (APGR, CPT) against random, always-medium, always-large and
    the oracle, and paired-bootstrap intervals between candidates. The candidate with
    the best cross-validated APGR (out-of-fold training rows + validation slice) is
    chosen; thresholds are calibrated on the validation slice held out from training."""
    layout = artifacts.layout()
    if not config.candidates:
        raise dg.Failure(f"no candidates configured: name at least one of {', '.join(release.CANDIDATES)}")
    dirs = {name: _router_dir(layout, name) for name in dict.fromkeys(config.candidates)}
    test = metrics.outcome_table(test_questions, answers, judgments)
    if test.empty:
        raise dg.Failure("no test question has both grades: nothing to evaluate (check answers/judgments)")
    held_out = training_examples.loc[training_examples["split"] == VALIDATION, "qid"]
    is_held_out = train_questions["qid"].isin(set(held_out))
    validation = metrics.outcome_table(train_questions[is_held_out], answers, judgments)
    trained = metrics.outcome_table(train_questions[~is_held_out], answers, judgments)
    queries, qids = list(test["query"]) + list(validation["query"]), list(test["qid"]) + list(validation["qid"])
    decided, modes, gpu_seconds, parse_rates = {}, {}, 0.0, {}
    for name, path in dirs.items():
        context.log.info(f"routing {len(test)} test + {len(validation)} validation queries with {name}")
        records, gpu = _route(config, compute, name, path, queries)
        gpu_seconds += gpu or 0.0
        frame = decisions_frame([RouteDecision(**r) for r in records], qids)
        decided[name] = (frame.iloc[:len(test)], frame.iloc[len(test):])
        modes[name] = records[0]["mode"] if records else None
        parse_rates[name] = float((~frame["parse_ok"].iloc[:len(test)].astype(bool)).mean())
    oof = {name: pd.read_csv(path / OOF_FILE, dtype={"qid": str}) for name, path in dirs.items()
           if (path / OOF_FILE).is_file()}
    choice = release.from_evaluation(validation, {name: val for name, (_, val) in decided.items()}, oof, trained,
                                     resamples=config.bootstrap_resamples)
    report = metrics.evaluate(test, validation, decided, chosen=choice.name, why=choice.why,
                              ambiguous=config.ambiguous, random_seeds=config.random_seeds,
                              target_share=config.target_share, target_pgr=config.target_pgr,
                              resamples=config.bootstrap_resamples)
    chosen = report.chosen
    context.log.info(f"chosen: {chosen} ({report.why})")
    release.record(layout, report, choice, test, validation, parse_rates, modes)
    figures = release.figures(report, chosen, test, validation, parse_rates[chosen], modes[chosen])
    try:
        verdicts = release.gate(report, test, figures, release.released_figures(layout),
                                regression_tolerance=config.regression_tolerance)
    except release.ReleaseError as exc:
        raise dg.Failure(str(exc)) from None
    yield dg.Output(report.per_query, metadata=_metadata(report, choice, figures, test_questions, test, decided,
                                                         layout, compute, gpu_seconds))
    for v in verdicts:
        yield dg.AssetCheckResult(
            check_name=v.rule, passed=v.passed, description=v.note,
            severity=dg.AssetCheckSeverity.ERROR if v.blocking else dg.AssetCheckSeverity.WARN,
            metadata={k: dg.MetadataValue.json(x) if isinstance(x, dict) else x for k, x in v.metadata.items()})


def _metadata(report: metrics.Report, choice: release.Choice, figures: dict, test_questions, test, decided,
              layout: Artifacts, compute: TrainingCompute, gpu_seconds: float) -> dict:
    """What the Dagster UI shows of an evaluation (the candidate column of the output tells
    released_router which router these figures are for)."""
    chosen, summary = report.chosen, report.summary.set_index("router")
    plot = cost_quality_curves(
        {name: (c.share, c.accuracy) for name, c in report.curves.items()},
        {name: (row["large_share"], row["correct"]) for name, row in summary.iterrows()
         if name in ("always-medium", "always-large")} | {
            f"{chosen} @ calibrated threshold": tuple(summary.loc[chosen, ["served_large_share", "served_correct"]])},
        layout.plots / "cost_quality.png")
    columns = ["router", "apgr", "validation_apgr", "cpt50", "cpt80", "policy_accuracy", "ece_p_complex", "correct",
               "served_correct", "served_large_share", "cost_usd", "savings_vs_large", "large_share",
               *[f"mix_{p}" for p in POLICIES]]
    meta = {
        **{k: v for k, v in figures.items() if v is not None and not isinstance(v, dict)},
        "why": report.why,
        "release_evidence": dg.MetadataValue.json(choice.record),
        "policy_mix": dg.MetadataValue.json(figures["policy_mix"]),
        "label_mix": dg.MetadataValue.json(metrics.policy_mix(report.per_query["oracle_policy"])),
        "test_questions_ungraded": len(test_questions) - len(test),
        **{k: metrics.plain(summary.loc[chosen, k]) for k in ("cost_usd", "savings_vs_large", "large_share")},
        "parse_failures": round(figures["parse_failure_rate"] * len(test)),
        "summary": table(report.summary.reindex(columns=columns).round(4)),
        "intervals": table(report.intervals.round(4)),
        "confusion_matrix": table(report.confusion),
        "cost_quality_curve": dg.MetadataValue.md(markdown_image(plot, "cost-quality curves")),
        "cost_quality_png": dg.MetadataValue.path(str(plot)),
        "calibration": dg.MetadataValue.json(report.calibration),
        "compute": compute.where,
        "mean_latency_ms": metrics.plain(decided[chosen][0]["latency_ms"].mean()),
    }
    if gpu_seconds:
        meta["gpu_seconds"] = round(gpu_seconds, 1)
        meta["estimated_cost_usd"] = round(gpu_seconds / 3600 * compute.t4_usd_per_hour, 4)
    return meta


@dg.asset(group_name=EVALUATION_GROUP)
def released_router(artifacts: ArtifactStore, router_evaluation: pd.DataFrame) -> dg.MaterializeResult:
    """The chosen candidate (an LM adapter or a head router), its calibration and
    figures, copied to <artifacts>/router/: what `router-pipeline route` and `serve` run
    by default. Runs only when router_evaluation's blocking checks pass."""
    layout = artifacts.layout()
    chosen = set(router_evaluation["candidate"])
    if len(chosen) != 1:
        raise dg.Failure(f"router_evaluation names {sorted(chosen)} as its chosen router; expected exactly one")
    name = chosen.pop()
    _router_dir(layout, name)
    try:
        released = release.publish(layout, name)
    except release.ReleaseError as exc:
        raise dg.Failure(str(exc)) from None
    figures = released.pop("figures")
    return dg.MaterializeResult(metadata={
        **released, "router_dir": dg.MetadataValue.path(str(released["router_dir"])),
        **{k: v for k, v in figures.items() if v is not None and not isinstance(v, dict)}})


evaluation_job = dg.define_asset_job(
    "evaluation_job", selection=dg.AssetSelection.groups(EVALUATION_GROUP),
    description="Evaluate every candidate router on the test split; release the one chosen on validation if its "
                "checks pass.")
