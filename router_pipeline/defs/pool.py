"""The N-model half of the graph: every model of the pool answers and is judged, the
outcomes become a row per question, pool routers learn P(correct) per model, the one
with the best validation evidence is scored on the test split by its cost-accuracy
frontier and released when its checks pass. Thin wrappers around labels/outcomes.py,
training/pool.py and evaluation/pool.py.
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from router_pipeline.artifacts import CASCADE_FILE, CASCADE_HEADS_FILE, EVALUATION_FILE
from router_pipeline.defs.config import derived, plain
from router_pipeline.defs.council import CouncilConfig
from router_pipeline.defs.data import JudgeConfig, answered
from router_pipeline.defs.metadata import table
from router_pipeline.defs.plots import cost_accuracy_frontiers, markdown_image
from router_pipeline.defs.resources import ArtifactStore, CouncilInbox, LLMRoles, ModelPool, TrainingCompute
from router_pipeline.evaluation import pool as pool_eval
from router_pipeline.evaluation.release import ReleaseError, install_release
from router_pipeline.labels import answering, council, judging
from router_pipeline.labels.outcomes import GRADE, OutcomesError, outcomes_table, read_outcomes
from router_pipeline.labels.split import TEST, TRAIN, VALIDATION
from router_pipeline.llm.pool import client_for
from router_pipeline.policies import CORRECT, GRADES, IDK
from router_pipeline.routers.pool import PoolRouter
from router_pipeline.text import unit_interval
from router_pipeline.training.heads import HeadConfig
from router_pipeline.training.pool import POOL_CANDIDATES, POOL_ENSEMBLES, PoolSpec, train_pool_routers

POOL_GROUP = "pool_routing"
MIN_VALIDATION_ROWS = 2  # when training_examples holds no validation slice out (a run of a few questions)


@dg.asset(group_name=POOL_GROUP, kinds={"pandas"})
def pool_questions(context: dg.AssetExecutionContext, config: CouncilConfig, council_inbox: CouncilInbox,
                   pool: ModelPool, train_questions: pd.DataFrame,
                   test_questions: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """The questions the pool's models are graded on: both splits, and (as training rows)
    the llm-council sessions in the council folder whose first stage holds pool models'
    answers: the council's final answer is the reference, the models' answers are
    recorded (labels/council.py). Sessions about a train or test question are left out."""
    result = council.read_folder(council_inbox.path(), config.rules())
    known = set(train_questions["qid"]) | set(test_questions["qid"])
    sessions, rejected = council.pool_question_rows(result.sessions, council.pool_names(pool.pool().models), known)
    for r in rejected[:20]:
        context.log.info(f"council {r['file']} {r['session']}: {r['reason']}")
    frame = pd.concat([train_questions, test_questions, sessions.assign(split=TRAIN)], ignore_index=True)
    answered_by = {n: int(sessions[f"{n}_answer"].notna().sum()) for n in pool.pool().names}
    meta = {"rows": len(frame), "council_rows": len(sessions), "council_answers_by_model": dg.MetadataValue.json(answered_by),
            "council_sessions_left_out": len(rejected)}
    if rejected:
        meta["council_left_out"] = table(pd.DataFrame(rejected[:200]))
    return dg.Output(frame, metadata=meta)


@dg.asset(group_name=POOL_GROUP, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("no_failed_calls", asset="pool_answers")])
def pool_answers(llm: LLMRoles, pool: ModelPool, artifacts: ArtifactStore, compute: TrainingCompute,
                 pool_questions: pd.DataFrame):
    """Every model of the pool answers every pool question (``tier``: the model's pool
    name). Through the same cache as ``answers``: a model already recorded for a question
    (the medium and large roles' calls, a council session's answers) is never paid again."""
    both = pool_questions
    roles, models = llm.roles(), pool.pool().models
    specs = {m.name: m.role() for m in models}
    clients = {m.name: client_for(m, gemini_base_url=roles.gemini_base_url, timeout_s=roles.timeout_s,
                                  batch_size=roles.local_batch_size) for m in models}
    with artifacts.llm_cache() as cache:
        frame, stats = answering.generate_answers(both, specs, clients, cache, concurrency=roles.concurrency,
                                                  retry=roles.retry(), progress=compute.progress)
    yield from answered(frame, stats, {m.name: f"{m.backend}:{m.model}" for m in models})


@dg.asset(group_name=POOL_GROUP, kinds={"pandas"})
def pool_judgments(config: JudgeConfig, llm: LLMRoles, artifacts: ArtifactStore, compute: TrainingCompute,
                   pool_answers: pd.DataFrame, pool_questions: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Blind grades of every pool model's answers, by the judge that grades ``answers``."""
    both = pool_questions
    roles = llm.roles()
    with artifacts.llm_cache() as cache:
        frame, stats = judging.judge_answers(pool_answers, both, judge=roles.judge, client=roles.client("judge"),
                                             cache=cache, seed=config.seed, concurrency=roles.concurrency,
                                             retry=roles.retry(), progress=compute.progress)
    labels = pd.crosstab(frame["label"].fillna("ungraded"), frame["tier"]).reindex(
        list(GRADES) + ["ungraded"], fill_value=0).rename_axis("label")
    return dg.Output(frame, metadata={"rows": len(frame), "labels_by_model": table(labels),
                                      "judge_calls": stats.calls, "judge_cache_hits": stats.cache_hits,
                                      "judge_cost_usd_this_run": round(stats.cost_usd, 6)})


@dg.asset(group_name=POOL_GROUP, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("every_model_graded", asset="pool_outcomes",
                                         description="Every model of the pool has a grade on every question.")])
def pool_outcomes(pool: ModelPool, pool_answers: pd.DataFrame, pool_judgments: pd.DataFrame,
                  pool_questions: pd.DataFrame, training_examples: pd.DataFrame):
    """A row per question: ``<model>_grade``, ``_answer``, ``_cost_usd`` and tokens for every
    model of the pool (the outcomes-file format), with ``split``: train, validation (the
    slice ``training_examples`` holds out, so both kinds of router are chosen on the same
    rows) or test. Per model: accuracy, abstentions, cost and ungraded rows."""
    models = pool.pool().names
    try:
        frame = outcomes_table(pool_questions, pool_answers, pool_judgments, models)
    except OutcomesError as exc:
        raise dg.Failure(f"{exc}: rematerialise pool_answers after changing the pool") from None
    held_out = set(training_examples.loc[training_examples["split"] == VALIDATION, "qid"])
    frame.loc[frame["qid"].isin(held_out) & (frame["split"] == TRAIN), "split"] = VALIDATION
    slice_from = "training_examples"
    if not (frame["split"] == VALIDATION).any():  # a small run: the knob still needs rows it was not fitted on
        train = frame[frame["split"] == TRAIN]
        rank = train["qid"].map(lambda q: unit_interval("pool-validation", q)).sort_values(kind="stable")
        frame.loc[rank.index[:MIN_VALIDATION_ROWS], "split"] = VALIDATION
        slice_from = f"the {MIN_VALIDATION_ROWS} training rows of smallest seeded hash (training_examples holds none out)"
    per_model = pd.DataFrame([{
        "model": m, "correct": float((frame[m + GRADE] == CORRECT).mean()),
        "idk": float((frame[m + GRADE] == IDK).mean()), "ungraded": int(frame[m + GRADE].isna().sum()),
        "usd_per_1000": float(frame[m + "_cost_usd"].mean() * 1000)} for m in models])
    oracle = frame[[m + GRADE for m in models]].eq(CORRECT).any(axis=1).mean()
    yield dg.Output(frame, metadata={
        "rows": len(frame), "models": dg.MetadataValue.json(models), "per_model": table(per_model.round(4)),
        "some_model_right": float(oracle), "validation_slice": slice_from,
        "by_split": table(frame["split"].value_counts().rename_axis("split").reset_index())})
    ungraded = per_model.set_index("model")["ungraded"]
    yield dg.AssetCheckResult(check_name="every_model_graded", passed=bool((ungraded == 0).all()),
                              severity=dg.AssetCheckSeverity.WARN,
                              metadata={"ungraded_by_model": dg.MetadataValue.json(ungraded.to_dict())})


class _PoolRouters(dg.Config):
    """Every field and default is training.pool.PoolSpec's."""


PoolRoutersConfig = derived(PoolSpec, _PoolRouters, name="PoolRoutersConfig")


def _outcomes(frame: pd.DataFrame, split: str, models: list[str], what: str):
    try:
        return read_outcomes(frame[frame["split"] == split].drop(columns=["split"]), models)
    except OutcomesError as exc:
        raise dg.Failure(f"{what}: {exc}") from None


@dg.asset(group_name=POOL_GROUP, kinds={"pytorch", "scikitlearn"})
def pool_routers(context: dg.AssetExecutionContext, config: PoolRoutersConfig, artifacts: ArtifactStore,
                 compute: TrainingCompute, pool: ModelPool, pool_outcomes: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Pool routers (P(correct) of each model from a frozen encoder's features: a head per
    model, hyper-parameters by cross-validation on the training rows), each with its knob
    (a budget, a share of the best model's accuracy, or lambda) set on the validation
    slice. A row with a model ungraded is left out of training (its reason is listed)."""
    spec, models, layout = plain(config, PoolSpec), pool.pool().names, artifacts.layout()
    train = _outcomes(pool_outcomes, TRAIN, models, "training rows")
    validation = _outcomes(pool_outcomes, VALIDATION, models, "validation rows")
    try:
        results = train_pool_routers(train, validation, spec, HeadConfig(), pool.pool().to_dict(),
                                     {name: layout.pool_candidate(name) for name in spec.candidates},
                                     progress=compute.progress, log=context.log.info)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from None
    for r in results:  # what pool_cascade reads as the query-only router's P on the training rows
        np.savez(_training_p_path(r.path), qid=train.frame["qid"].astype(str).to_numpy(dtype=str), p=r.training_p)
    summary = pd.DataFrame([{"candidate": r.name, "params": json.dumps(r.params), "cv_auc": r.cv_auc,
                             "lambda": r.calibration["lambda"], "validation_accuracy": r.calibration["validation_accuracy"],
                             "validation_usd_per_1000": r.calibration["validation_usd_per_1000"], "path": str(r.path)}
                            for r in results])
    rejected = train.rejected + validation.rejected
    meta = {"training_rows": len(train.frame), "validation_rows": len(validation.frame),
            "knob": f"{spec.knob} {spec.knob_value}", "candidates": table(summary.drop(columns=["path"]).round(4)),
            "rows_left_out": len(rejected)}
    if rejected:
        meta["left_out"] = table(pd.DataFrame(rejected[:100], columns=["row", "reason"]))
    return dg.Output(summary, metadata=meta)


def _training_p_path(router_path) -> Path:
    """Beside a pool candidate's folder: its out-of-fold P(correct) on its training rows."""
    return Path(router_path).with_name(Path(router_path).name + ".training_p.npz")


class PoolEvaluationConfig(dg.Config):
    bootstrap_resamples: int = 1000


@dg.asset(group_name=POOL_GROUP, kinds={"pytorch"},
          check_specs=[dg.AssetCheckSpec(rule, asset="pool_evaluation", blocking=True, description=description)
                       for rule, description in pool_eval.POOL_RULES.items()])
def pool_evaluation(context: dg.AssetExecutionContext, config: PoolEvaluationConfig, artifacts: ArtifactStore,
                    pool: ModelPool, pool_outcomes: pd.DataFrame, pool_routers: pd.DataFrame):
    """Every pool router on the test split: its cost-accuracy frontier as the knob sweeps,
    AIQ, accuracy at the cheapest model's cost, cost at the best model's accuracy, beside
    each single model, the random mix and the oracle, with paired intervals. The candidate
    with the best AIQ on the validation slice is chosen (never on test rows)."""
    models, layout = pool.pool().names, artifacts.layout()
    test = _outcomes(pool_outcomes, TEST, models, "test rows")
    validation = _outcomes(pool_outcomes, VALIDATION, models, "validation rows")
    routers = {name: PoolRouter(path) for name, path in zip(pool_routers["candidate"], pool_routers["path"])}
    p_test, p_val = {}, {}
    for name, router in routers.items():
        if router.models != models:
            raise dg.Failure(f"pool router {name} routes among {router.models}, the pool is {models}: "
                             "rematerialise pool_routers")
        p = router.proba(list(test.frame["query"]) + list(validation.frame["query"]))
        p_test[name], p_val[name] = p[:len(test.frame)], p[len(test.frame):]
    validation_aiq = {name: pool_eval.sweep_aiq(p_val[name], validation.correct, validation.cost,
                                                routers[name].costs) for name in routers}
    chosen, why = pool_eval.choose(validation_aiq, list(routers))
    context.log.info(f"chosen: {chosen} ({why})")
    report = pool_eval.evaluate(p_test, {n: r.costs for n, r in routers.items()},
                                {n: r.lam for n, r in routers.items()}, test.correct, test.cost, models, chosen, why,
                                resamples=config.bootstrap_resamples)
    figures = report.table.set_index("router").loc[chosen].to_dict()
    for name in routers:
        out = layout.pool_evaluation(name)
        out.mkdir(parents=True, exist_ok=True)
        row = report.table.set_index("router").loc[name].to_dict()
        (out / EVALUATION_FILE).write_text(json.dumps(
            {**{k: _plain(v) for k, v in row.items()}, "validation_aiq": _plain(validation_aiq[name]),
             "chosen": name == chosen, "why": why, "test_rows": len(test.frame), "models": models,
             "test_shares": report.shares if name == chosen else None}, indent=2))
    plot = cost_accuracy_frontiers(
        {n: (c.frontier().cost * 1000, c.frontier().accuracy) for n, c in report.curves.items()
         if n in routers or n in ("random mix", "oracle")},
        {m: (float(test.cost[:, i].mean() * 1000), float(test.correct[:, i].mean())) for i, m in enumerate(models)},
        layout.plots / "pool_frontier.png")
    out_frame = pd.DataFrame({"qid": test.frame["qid"], "candidate": chosen})
    yield dg.Output(out_frame, metadata={
        "chosen": chosen, "why": why, "test_rows": len(test.frame),
        **{k: _plain(v) for k, v in figures.items()},
        "frontier_table": table(report.table.round(4)), "intervals": table(report.intervals.round(4)),
        "test_shares": dg.MetadataValue.json(report.shares), "oracle_shares": dg.MetadataValue.json(report.oracle_shares),
        "validation_aiq": dg.MetadataValue.json({k: _plain(v) for k, v in validation_aiq.items()}),
        "frontier": dg.MetadataValue.md(markdown_image(plot, "cost-accuracy frontier")),
        "frontier_png": dg.MetadataValue.path(str(plot))})
    for rule, passed, blocking, note in report.verdicts:
        yield dg.AssetCheckResult(check_name=rule, passed=passed, description=note or None,
                                  severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
                                  metadata={"candidate": chosen, "test_shares": dg.MetadataValue.json(report.shares)})


def _plain(v):
    v = float(v) if isinstance(v, (np.floating, float, int)) and not isinstance(v, bool) else v
    return None if isinstance(v, float) and not np.isfinite(v) else v


@dg.asset(group_name=POOL_GROUP, deps=["pool_cascade"])
def released_pool_router(artifacts: ArtifactStore, pool_evaluation: pd.DataFrame) -> dg.MaterializeResult:
    """The chosen pool router with its calibration and test figures, at <artifacts>/pool_router/
    (what ``route``, ``answer`` and ``serve`` run with ``--pool``), and the cascade
    ``pool_cascade`` released to serve with it, if any. Runs only when pool_evaluation's
    blocking checks pass."""
    layout = artifacts.layout()
    chosen = set(pool_evaluation["candidate"])
    if len(chosen) != 1 or (name := chosen.pop()) not in {**POOL_CANDIDATES, **POOL_ENSEMBLES}:
        raise dg.Failure(f"pool_evaluation names {sorted(set(pool_evaluation['candidate']))}; expected one candidate")
    cascade = layout.root / "pool_cascade" / CASCADE_FILE
    shipped = [f for f in (cascade, cascade.with_name(CASCADE_HEADS_FILE)) if f.is_file()]
    try:
        released = install_release(layout.pool_candidate(name), [layout.pool_evaluation(name) / EVALUATION_FILE,
                                                                 *shipped],
                                   layout.pool_release, layout.root / "pool-release-staging")
    except (OSError, ReleaseError) as exc:
        raise dg.Failure(f"cannot release pool router {name}: {exc}") from None
    figures = released.pop("figures")
    served = json.loads(cascade.read_text()) if cascade.is_file() else None
    return dg.MaterializeResult(metadata={
        "cascade": " -> ".join("+".join(step) for step in served["plan"]) if served else "none (pool_cascade chose none)",
        "cascade_by_default": bool(served and served.get("default")),
        "cascade_kind": served.get("kind", "fixed") if served else "none",
        **{k: v for k, v in released.items() if k != "router_dir"},
        "router_dir": dg.MetadataValue.path(str(released["router_dir"])),
        **{k: v for k, v in figures.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}})


pool_job = dg.define_asset_job("pool_job", selection=dg.AssetSelection.groups(POOL_GROUP),
                               description="Answers and grades of every pool model to a released N-model router.")
