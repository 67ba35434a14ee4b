"""Cascades in the pool_routing group: where the pool outcomes record what the models
answered, a cascade (ask cheaper models first, escalate on what they answered) is fitted
on the training rows, chosen per knob value on the validation rows, and scored on the
test rows against the chosen query-only pool router; the cascade to serve (fixed, or
learned with its heads) is the one chosen at the released knob (``cascade.json``,
shipped by ``released_pool_router``). A thin wrapper around evaluation/cascade.py;
without answers of two models it records why it skipped.
"""

import json

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from router_pipeline.artifacts import CASCADE_FILE, CASCADE_HEADS_FILE
from router_pipeline.defs.metadata import table
from router_pipeline.defs.plots import cost_accuracy_frontiers, markdown_image
from router_pipeline.defs.pool import POOL_GROUP, _outcomes, _plain, _training_p_path
from router_pipeline.defs.resources import ArtifactStore, LLMRoles, ModelPool, TrainingCompute
from router_pipeline.evaluation import cascade as cascade_eval
from router_pipeline.labels.judging import SameAnswerJudge
from router_pipeline.labels.split import TEST, TRAIN, VALIDATION
from router_pipeline.routers.cascade import read_answers, save_cascade
from router_pipeline.routers.pool import Knob


class PoolCascadeConfig(dg.Config):
    alphas: list[float] = Field(default_factory=lambda: [10.0, 100.0, 1000.0])  # the go-on heads' ridge strengths
    folds: int = 5  # the learned cascade's cross-fitting folds on the training rows
    bootstrap_resamples: int = 1000
    # How two free-text answers agree: auto or text (normalised match), or judge (the llm
    # resource's judge role decides pairs that differ once normalised: paid, counted, cached).
    # Choice letters are compared exactly whatever this says.
    comparator: str = "auto"


def query_only_p(router_path: str, queries: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """The query-only pool router's P(correct) per (query, model), its expected costs and
    its calibration (the knob the cascade's lambda is read with)."""
    from router_pipeline.routers.pool import PoolRouter

    router = PoolRouter(router_path)
    return router.proba(list(queries)), np.asarray(router.costs, float), dict(router.calibration)


def _training_p(router_path, train: pd.DataFrame, in_sample: np.ndarray) -> tuple[np.ndarray, str]:
    """The query-only router's P on the training rows as pool_routers recorded it (out of
    fold: the cascade's heads must not read P fitted on their own rows), else in-sample."""
    recorded = _training_p_path(router_path)
    if recorded.is_file():
        with np.load(recorded, allow_pickle=False) as z:
            by_qid = dict(zip(z["qid"].tolist(), z["p"]))
        qids = train["qid"].astype(str).tolist()
        if all(q in by_qid for q in qids):
            return np.stack([by_qid[q] for q in qids]) if qids else in_sample, "out-of-fold"
    return in_sample, "in-sample (pool_routers recorded no out-of-fold P for these rows)"


def _rows(context, configured: str, comparator: str, judged: bool, how: str, splits: dict, p_split: list,
          models: list[str], llm: LLMRoles, artifacts: ArtifactStore, compute: TrainingCompute):
    """Every split as the cascades read it, and the comparator's metadata: what compared
    the answers, the judge's calls and what they cost in this run (0 without a judge, or
    where every pair was decided by an earlier run), and the agreement on the training
    rows (with a judge, beside the agreement by normalised text alone)."""
    judge, normalised = None, None
    if judged:
        roles = llm.roles()
        if roles.judge is None:
            raise dg.Failure("pool_cascade: comparator 'judge' needs an LLM judge role (llm.judge: the gemini "
                             "profile, or a judge configured on the llm resource); the offline profile grades by "
                             "rules. Use comparator 'auto' or 'text' to compare by normalised text.")
        with artifacts.llm_cache() as cache:
            judge = SameAnswerJudge(roles.judge, roles.client("judge"), cache, concurrency=roles.concurrency,
                                    retry=roles.retry(), progress=compute.progress)
            rows = [cascade_eval.rows_of(splits[s], part, models, comparator, judge) for s, part in zip(splits, p_split)]
        normalised = read_answers(cascade_eval.raw_answers(splits[TRAIN], models), "text")
        context.log.info(f"answers compared by {roles.judge.model}: {judge.stats.calls} calls, "
                         f"{judge.stats.cache_hits} cached, ${judge.stats.cost_usd:.4f}")
    else:
        rows = [cascade_eval.rows_of(splits[s], part, models, comparator) for s, part in zip(splits, p_split)]
    meta = {"comparator": "judge" if judged else comparator, "comparator_configured": configured,
            "comparator_why": how, "served_comparator": comparator,
            "judge_calls": judge.stats.calls if judge else 0,
            "judge_cache_hits": judge.stats.cache_hits if judge else 0,
            "judge_pairs": len(judge.verdicts) if judge else 0,
            "judge_unreadable_or_failed": judge.unreadable if judge else 0,
            "comparator_cost_usd": round(judge.stats.cost_usd, 6) if judge else 0.0,
            "agreement_on_training_rows": table(cascade_eval.agreement(rows[0], models, normalised).round(4))}
    if judge:
        meta["judge_model"] = f"{judge.judge.provider}:{judge.judge.model}"
    return rows, meta


@dg.asset(group_name=POOL_GROUP, kinds={"scikitlearn"},
          check_specs=[dg.AssetCheckSpec(cascade_eval.CASCADE_RULE, asset="pool_cascade", blocking=False,
                                         description=cascade_eval.CASCADE_RULE_DESCRIPTION),
                       dg.AssetCheckSpec(cascade_eval.RELEASE_RULE, asset="pool_cascade", blocking=False,
                                         description=cascade_eval.RELEASE_RULE_DESCRIPTION)])
def pool_cascade(context: dg.AssetExecutionContext, config: PoolCascadeConfig, artifacts: ArtifactStore,
                 llm: LLMRoles, compute: TrainingCompute, pool: ModelPool, pool_outcomes: pd.DataFrame,
                 pool_routers: pd.DataFrame, pool_evaluation: pd.DataFrame):
    """A cascade against the query-only pool router chosen by ``pool_evaluation``: the
    learned cascade (calibrated heads on the query-only log-odds and the answers'
    agreement, abstention and length), two fixed ones (accept on agreement) and the
    router itself as candidates, one chosen per knob value on the validation rows; a
    query's cost the sum over every model it called. Test AIQ, accuracy at the best single
    model's cost, paired intervals and both frontiers side by side. Skipped, saying why,
    when the outcomes hold no ``<model>_answer`` of two models or a split has fewer than
    two rows. The candidate chosen at the
    released knob is released (``release``); with too few training rows for a learned
    cascade, among the router and the fixed ones. Answers agree as ``config.comparator``
    says; with ``judge``, free-text pairs are put to the judge role on every row of every
    split before anything is fitted (its calls and cost in the metadata); the cascade is
    served comparing by normalised text (serving calls no judge)."""
    try:
        cascade_eval.check_comparator(config.comparator)  # before anything, even a run that skips
    except ValueError as exc:
        raise dg.Failure(f"pool_cascade: {exc}") from None
    models = pool.pool().names
    splits = {s: _outcomes(pool_outcomes, s, models, f"{s} rows") for s in (TRAIN, VALIDATION, TEST)}
    layout = artifacts.layout()
    out = layout.root / "pool_cascade"
    out.mkdir(parents=True, exist_ok=True)
    for old in (CASCADE_FILE, CASCADE_HEADS_FILE):
        (out / old).unlink(missing_ok=True)  # never a cascade of an earlier run
    if reason := cascade_eval.release_skip_reason(splits[TRAIN], splits[VALIDATION], splits[TEST], models):
        context.log.info(f"cascade skipped: {reason}")
        yield dg.Output(pd.DataFrame(columns=["router", "aiq"]), metadata={"skipped": reason})
        for rule in (cascade_eval.CASCADE_RULE, cascade_eval.RELEASE_RULE):
            yield dg.AssetCheckResult(check_name=rule, passed=True, severity=dg.AssetCheckSeverity.WARN,
                                      description=f"no cascade: {reason}")
        return
    chosen = set(pool_evaluation["candidate"])
    if len(chosen) != 1:
        raise dg.Failure(f"pool_evaluation names {sorted(chosen)}; expected one candidate")
    candidate = chosen.pop()
    path = pool_routers.set_index("candidate").loc[candidate, "path"]
    queries = [list(splits[s].frame["query"]) for s in (TRAIN, VALIDATION, TEST)]
    p, costs, calibration = query_only_p(str(path), [q for qs in queries for q in qs])
    cut = np.cumsum([len(q) for q in queries])[:-1]
    p_split = np.split(p, cut)
    p_split[0], training_p = _training_p(path, splits[TRAIN].frame, p_split[0])
    comparator, judged, compared_how = cascade_eval.choose_comparator(
        config.comparator, [splits[s].frame for s in splits], models)
    rows, comparator_meta = _rows(context, config.comparator, comparator, judged, compared_how, splits, p_split,
                                  models, llm, artifacts, compute)
    knob = Knob(calibration.get("knob", "quality"), float(calibration.get("knob_value", 0.95)))
    lam = calibration.get("lambda")
    learned_skip = cascade_eval.skip_reason(splits[TRAIN], splits[VALIDATION], splits[TEST], models)
    policies, validation_aiq = cascade_eval.candidates(
        rows[0], rows[1], models, costs, comparator=comparator, learned=learned_skip is None, alphas=config.alphas,
        folds=config.folds, log=context.log.info)
    release = cascade_eval.release(policies, rows[1], rows[2], models, costs, np.inf if lam is None else float(lam),
                                   knob.value if knob.kind == "budget" else None, resamples=config.bootstrap_resamples)
    save_cascade(release.pop("policy"), out, default=release["default"], about={
        "query_only_router": candidate, "candidate": release["candidate"], "why": release["why"],
        "lambda": release["lambda"], "validation": release["validation"], "test": release["test"],
        "fitted_with_comparator": comparator_meta["comparator"]})
    release_meta = {"served_cascade": release["describe"], "served_cascade_kind": release["kind"],
                    "served_by_default": release["default"], "served_cascade_why": release["why"],
                    "served_cascade_evidence": dg.MetadataValue.json({k: release[k] for k in ("validation", "test")})}
    release_check = dg.AssetCheckResult(
        check_name=cascade_eval.RELEASE_RULE, passed=not release["worse_on_test"], severity=dg.AssetCheckSeverity.WARN,
        description=(f"{release['describe']}: test accuracy minus the query-only router's "
                     f"{release['test']['accuracy_difference']:+.4f} [{release['test']['accuracy_difference_lo']:+.4f}, "
                     f"{release['test']['accuracy_difference_hi']:+.4f}]; {release['why']}"))
    if learned_skip:
        context.log.info(f"learned cascade skipped: {learned_skip}")
        yield dg.Output(pd.DataFrame(columns=["router", "aiq"]), metadata={
            "skipped": f"learned cascade: {learned_skip}", "query_only_router": candidate, **comparator_meta,
            **release_meta})
        yield dg.AssetCheckResult(check_name=cascade_eval.CASCADE_RULE, passed=True,
                                  severity=dg.AssetCheckSeverity.WARN, description=f"no learned cascade: {learned_skip}")
        yield release_check
        return
    choice = cascade_eval.choose(policies, rows[1], costs)
    report = cascade_eval.evaluate_cascade(policies, choice, rows[2], models, costs,
                                           resamples=config.bootstrap_resamples)
    keep = ("cascade", cascade_eval.QUERY_ONLY, "random mix", "oracle")
    plot = cost_accuracy_frontiers(
        {n: (c.frontier().cost * 1000, c.frontier().accuracy) for n, c in report.curves.items() if n in keep},
        {m: (float(rows[2].cost[:, i].mean() * 1000), float(rows[2].correct[:, i].mean()))
         for i, m in enumerate(models)},
        layout.plots / "pool_cascade_frontier.png", title="Cascade and query-only router on the test split")
    (out / "report.json").write_text(json.dumps(
        {"query_only_router": candidate, "comparator": comparator_meta["comparator"],
         "comparator_cost_usd": comparator_meta["comparator_cost_usd"], "chosen": report.chosen, "served": release,
         "figures": {k: _plain(v) for k, v in report.figures.items()},
         "validation_aiq": {k: _plain(v) for k, v in validation_aiq.items()}}, indent=1))
    answered = cascade_eval.answer_columns(pd.concat([splits[s].frame for s in splits]), models)
    yield dg.Output(report.table, metadata={
        "query_only_router": candidate, "query_only_p_on_training_rows": training_p, **comparator_meta,
        "answers_of": dg.MetadataValue.json(answered), "knob": f"{knob.kind} {knob.value}",
        "training_rows": len(rows[0].correct), "validation_rows": len(rows[1].correct),
        "test_rows": len(rows[2].correct), "chosen": dg.MetadataValue.json(report.chosen),
        **{k: _plain(v) for k, v in report.figures.items()},
        "frontier_table": table(report.table.round(4)), "intervals": table(report.intervals.round(4)),
        "validation_aiq": dg.MetadataValue.json({k: _plain(v) for k, v in validation_aiq.items()}),
        "frontier": dg.MetadataValue.md(markdown_image(plot, "cascade and query-only frontiers")),
        "frontier_png": dg.MetadataValue.path(str(plot)), **release_meta})
    passed, note = report.verdict
    yield dg.AssetCheckResult(check_name=cascade_eval.CASCADE_RULE, passed=passed,
                              severity=dg.AssetCheckSeverity.WARN, description=note or None,
                              metadata={k: _plain(report.figures[k]) for k in (
                                  "cascade_minus_query_only_aiq", "cascade_minus_query_only_aiq_lo",
                                  "cascade_minus_query_only_aiq_hi")})
    yield release_check
