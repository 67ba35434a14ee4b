"""Evaluation assets: score every candidate router on the test split, release the best.

``router_evaluation`` routes the test split and the validation slice (held out from
every candidate's training rows) with each candidate: the head routers (frozen Gemma
states; MiniLM LDA / logistic / k-NN) and the fine-tuned LM adapter, then replays the
graded answers (no new model calls). It chooses the candidate by cross-validated
evidence (release.py: the heads' out-of-fold scores on the training rows plus the
validation slice; never test rows), calibrates each candidate's threshold on the
validation slice, and reports every candidate's test figures with paired-bootstrap
intervals.
Its blocking checks guard ``released_router``: a chosen router that loses to random,
regresses against the released router, fails to decide, or decides one policy for
almost every query never replaces the router that is served.
"""

import json
import shutil
import time
from typing import Literal, Optional

import dagster as dg
import pandas as pd
from pydantic import field_validator

from router_pipeline import compute as compute_module
from router_pipeline import evaluation, release
from router_pipeline.artifacts import (
    ADAPTER_CONFIG, CALIBRATION_FILE, EVALUATION_FILE, HEADS, INTERVALS_FILE, OOF_FILE, ROUTER_FILE, STAGES,
    SUMMARY_FILE, Artifacts, check_names,
)
from router_pipeline.defs.metadata import table
from router_pipeline.defs.resources import ArtifactStore, TrainingCompute
from router_pipeline.defs.training import dpo_adapter, head_routers
from router_pipeline.heads import export_head_router
from router_pipeline.plots import cost_quality_curves, markdown_image
from router_pipeline.policies import POLICIES
from router_pipeline.routing import RouteDecision, RouterConfig, decisions_frame
from router_pipeline.serve.mapper import evaluated_spec
from router_pipeline.split import VALIDATION

EVALUATION_GROUP = "evaluation"
REGRESSION_METRICS = ("served_correct", "policy_accuracy")
MAX_PARSE_FAILURE_RATE = 0.05  # a router that fails to decide more often than this is never released
# Below this many test rows, one policy for every query is no evidence of a collapse: the check warns.
MIN_ROWS_FOR_COLLAPSE = 30
CANDIDATES = (*HEADS, *STAGES)
_R = RouterConfig()  # the one source of the routing defaults


class EvaluationConfig(dg.Config):
    # In this order: the first is preferred when the validation rows cannot tell them apart.
    candidates: list[str] = ["gemma", "minilm_lda", "logistic", "knn", "sft"]  # any of CANDIDATES
    fallback: Literal["Standard_Query", "Complex_Query", "Ambiguous_Query"] = _R.fallback  # when an output does not parse
    min_policy_mass: float = _R.min_policy_mass  # fast mode: below it the output counts as unparsed
    ambiguous: Literal["medium", "large", "abstain"] = "medium"  # what Ambiguous_Query routes to here
    random_seeds: int = 20
    bootstrap_resamples: int = 1000
    target_share: Optional[float] = None  # calibrate to this share of large calls ...
    target_pgr: float = 0.9  # ... or else to the cheapest threshold recovering this much of the gap
    regression_tolerance: float = 0.05  # allowed drop in served accuracy / policy accuracy vs the released router
    batch_size: int = _R.batch_size
    max_new_tokens: int = _R.max_new_tokens  # reasoning mode: room for the analysis and the decision

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, value: list[str]) -> list[str]:
        return check_names(value, CANDIDATES, "candidates")


def _route(config: EvaluationConfig, compute: TrainingCompute, name: str, router_dir, queries: list[str]):
    """(decision dicts, GPU seconds or None). LM adapters route on the configured compute;
    head routers always here (they decide in milliseconds)."""
    router_config = RouterConfig(fallback=config.fallback, batch_size=config.batch_size,
                                 max_new_tokens=config.max_new_tokens, min_policy_mass=config.min_policy_mass).__dict__
    if compute.where == "modal" and name in STAGES:
        return compute_module.launch_modal_route(router_dir, queries, router_config)
    return compute_module.route_queries(router_dir, queries, router_config, progress=compute.progress), None


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


def _router_dir(layout: Artifacts, name: str):
    path = layout.candidate(name)
    marker = ADAPTER_CONFIG if name in STAGES else ROUTER_FILE
    if not (path / marker).exists():
        asset = f"{name}_adapter" if name in STAGES else "head_routers"
        raise dg.Failure(f"no {name} router at {path}: materialise {asset} first, or drop {name!r} from candidates")
    return path


def _figures(report: evaluation.Report, name: str, test, validation, parse_rate: float, mode) -> dict:
    row = report.summary.set_index("router").loc[name]
    return {
        "candidate": name,
        "mode": mode,
        "test_questions": len(test),
        "validation_questions": len(validation),
        "threshold": report.calibrations[name].get("threshold"),
        "served_correct": evaluation.plain(row["served_correct"]),
        "served_large_share": evaluation.plain(row["served_large_share"]),
        "served_savings_vs_large": evaluation.plain(row["served_savings_vs_large"]),
        "correct": evaluation.plain(row["correct"]),
        "policy_accuracy": evaluation.plain(row["policy_accuracy"]),
        "apgr": evaluation.plain(row["apgr"]),
        "validation_apgr": evaluation.plain(row["validation_apgr"]),
        "random_apgr": evaluation.plain(report.random_apgr),
        "cpt50": evaluation.plain(row["cpt50"]),
        "cpt80": evaluation.plain(row["cpt80"]),
        "ece_p_complex": evaluation.plain(row["ece_p_complex"]),
        "parse_failure_rate": round(parse_rate, 4),
        "policy_mix": {p: evaluation.plain(row[f"mix_{p}"]) for p in POLICIES},
    }


@dg.asset(
    group_name=EVALUATION_GROUP, kinds={"pytorch"}, deps=[dpo_adapter, head_routers],
    check_specs=[
        dg.AssetCheckSpec("beats_random", asset="router_evaluation", blocking=True,
                          description="The chosen router's APGR exceeds the mean APGR of random routers on the same data."),
        dg.AssetCheckSpec("no_regression", asset="router_evaluation", blocking=True,
                          description="Served accuracy and policy accuracy are not worse than the released router's "
                                      "beyond the tolerance."),
        dg.AssetCheckSpec("parse_failures_within_limit", asset="router_evaluation", blocking=True,
                          description=f"At most {MAX_PARSE_FAILURE_RATE:.0%} of the test decisions are parse failures."),
        dg.AssetCheckSpec("no_policy_collapse", asset="router_evaluation", blocking=True,
                          description=f"The chosen router decides no single policy for more than "
                                      f"{evaluation.COLLAPSE_SHARE:.0%} of the test queries while the labels have at "
                                      f"least two policies above {evaluation.MIN_LABEL_SHARE:.0%} each."),
    ],
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
        raise dg.Failure(f"no candidates configured: name at least one of {', '.join(CANDIDATES)}")
    dirs = {name: _router_dir(layout, name) for name in dict.fromkeys(config.candidates)}
    test = evaluation.outcome_table(test_questions, answers, judgments)
    if test.empty:
        raise dg.Failure("no test question has both grades: nothing to evaluate (check answers/judgments)")
    held_out = set(training_examples.loc[training_examples["split"] == VALIDATION, "qid"])
    validation = evaluation.outcome_table(train_questions[train_questions["qid"].isin(held_out)], answers, judgments)
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
    trained = evaluation.outcome_table(train_questions[~train_questions["qid"].isin(held_out)], answers, judgments)
    oof = {name: pd.read_csv(path / OOF_FILE, dtype={"qid": str}) for name, path in dirs.items()
           if (path / OOF_FILE).is_file()}
    choice = release.from_evaluation(validation, {name: val for name, (_, val) in decided.items()}, oof, trained,
                                     resamples=config.bootstrap_resamples)
    report = evaluation.evaluate(test, validation, decided, chosen=choice.name, why=choice.why,
                                 ambiguous=config.ambiguous, random_seeds=config.random_seeds,
                                 target_share=config.target_share, target_pgr=config.target_pgr,
                                 resamples=config.bootstrap_resamples)
    chosen = report.chosen
    context.log.info(f"chosen: {chosen} ({report.why})")
    plot = cost_quality_curves(
        {name: (c.share, c.accuracy) for name, c in report.curves.items()},
        {name: (row["large_share"], row["correct"]) for name, row in report.summary.set_index("router").iterrows()
         if name in ("always-medium", "always-large")} | {
            f"{chosen} @ calibrated threshold": tuple(report.summary.set_index("router").loc[
                chosen, ["served_large_share", "served_correct"]])},
        layout.plots / "cost_quality.png")
    for name in dirs:
        out = layout.evaluation(name)
        out.mkdir(parents=True, exist_ok=True)
        (out / CALIBRATION_FILE).write_text(json.dumps(
            {**report.calibrations[name], "score": "P(Complex_Query)", "split": "validation",
             "mapping": evaluated_spec(report.calibrations[name])}, indent=2))
        figures = _figures(report, name, test, validation, parse_rates[name], modes[name])
        (out / EVALUATION_FILE).write_text(json.dumps({**figures, "chosen": name == chosen, "why": report.why,
                                                       "release_evidence": choice.record}, indent=2))
    report.summary.to_csv(layout.root / "evaluation" / SUMMARY_FILE, index=False)
    report.intervals.to_csv(layout.root / "evaluation" / INTERVALS_FILE, index=False)
    figures = _figures(report, chosen, test, validation, parse_rates[chosen], modes[chosen])
    parse_failures = round(parse_rates[chosen] * len(test))
    columns = ["router", "apgr", "validation_apgr", "cpt50", "cpt80", "policy_accuracy", "ece_p_complex", "correct",
               "served_correct", "served_large_share", "cost_usd", "savings_vs_large", "large_share",
               *[f"mix_{p}" for p in POLICIES]]
    meta = {
        **{k: v for k, v in figures.items() if v is not None and not isinstance(v, dict)},
        "why": report.why,
        "release_evidence": dg.MetadataValue.json(choice.record),
        "policy_mix": dg.MetadataValue.json(figures["policy_mix"]),
        "label_mix": dg.MetadataValue.json(evaluation.policy_mix(report.per_query["oracle_policy"])),
        "test_questions_ungraded": len(test_questions) - len(test),
        **{k: evaluation.plain(report.summary.set_index("router").loc[chosen, k]) for k in ("cost_usd", "savings_vs_large",
                                                                                   "large_share")},
        "parse_failures": parse_failures,
        "summary": table(report.summary.reindex(columns=columns).round(4)),
        "intervals": table(report.intervals.round(4)),
        "confusion_matrix": table(report.confusion),
        "cost_quality_curve": dg.MetadataValue.md(markdown_image(plot, "cost-quality curves")),
        "cost_quality_png": dg.MetadataValue.path(str(plot)),
        "calibration": dg.MetadataValue.json(report.calibration),
        "compute": compute.where,
        "mean_latency_ms": evaluation.plain(decided[chosen][0]["latency_ms"].mean()),
    }
    if gpu_seconds:
        meta["gpu_seconds"] = round(gpu_seconds, 1)
        meta["estimated_cost_usd"] = round(gpu_seconds / 3600 * compute.t4_usd_per_hour, 4)
    # The candidate column tells released_router which router these figures are for.
    yield dg.Output(report.per_query, metadata=meta)

    apgr, rand = figures["apgr"], report.random_apgr
    gap = test["large_label"].eq("Correct").mean() - test["medium_label"].eq("Correct").mean()
    if apgr is None:
        # No quality gap between the tiers on this test split: APGR is undefined, so
        # the router cannot be shown to beat random. Say so; do not block on it.
        yield dg.AssetCheckResult(check_name="beats_random", passed=False, severity=dg.AssetCheckSeverity.WARN,
                                  description=f"undefined: always-large is not more accurate than always-medium "
                                              f"on these {len(test)} test questions (gap {gap:+.3f})",
                                  metadata={"apgr": None, "random_apgr": None, "accuracy_gap": float(gap)})
    else:
        yield dg.AssetCheckResult(check_name="beats_random", passed=bool(apgr > rand),
                                  metadata={"candidate": chosen, "apgr": float(apgr), "random_apgr": float(rand),
                                            "accuracy_gap": float(gap)})

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
    yield dg.AssetCheckResult(check_name="parse_failures_within_limit",
                              passed=parse_rates[chosen] <= MAX_PARSE_FAILURE_RATE,
                              metadata={"parse_failures": parse_failures, "rate": round(parse_rates[chosen], 4),
                                        "limit": MAX_PARSE_FAILURE_RATE})
    is_collapsed = evaluation.collapsed(report.per_query["policy"], report.per_query["oracle_policy"])
    few = len(test) < MIN_ROWS_FOR_COLLAPSE
    yield dg.AssetCheckResult(
        check_name="no_policy_collapse", passed=not is_collapsed,
        severity=dg.AssetCheckSeverity.WARN if few else dg.AssetCheckSeverity.ERROR,
        description=(f"only {len(test)} test rows (< {MIN_ROWS_FOR_COLLAPSE}): a warning, not a verdict" if few
                     and is_collapsed else None),
        metadata={"candidate": chosen, "decided": dg.MetadataValue.json(figures["policy_mix"]),
                  "labels": dg.MetadataValue.json(evaluation.policy_mix(report.per_query["oracle_policy"]))})


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
    src, evaluated = _router_dir(layout, name), layout.evaluation(name)
    if not (evaluated / EVALUATION_FILE).exists():
        raise dg.Failure(f"no evaluation of {name} at {evaluated}: materialise router_evaluation first")
    staging = layout.root / "release-staging"
    compute_module.install_adapter(src, staging)
    for file in (CALIBRATION_FILE, EVALUATION_FILE):
        shutil.copy2(evaluated / file, staging / file)
    t0 = time.perf_counter()
    export = export_head_router(staging)  # the fast path's encoder, built once here
    exported = {} if export is None else {
        "export_sha256": export["sha256"], "export_s": round(time.perf_counter() - t0, 1),
        "export_mb": round(sum(f.stat().st_size for f in (staging / export["dir"]).iterdir()) / 1e6, 1)}
    dest = compute_module.install_adapter(staging, layout.release)
    shutil.rmtree(staging, ignore_errors=True)
    figures = json.loads((dest / EVALUATION_FILE).read_text())
    return dg.MaterializeResult(metadata={"router_dir": dg.MetadataValue.path(str(dest)), "from": str(src), **exported,
                                          **{k: v for k, v in figures.items() if v is not None
                                             and not isinstance(v, dict)}})


evaluation_job = dg.define_asset_job(
    "evaluation_job", selection=dg.AssetSelection.groups(EVALUATION_GROUP),
    description="Evaluate every candidate router on the test split; release the one chosen on validation if its "
                "checks pass.")
