"""The data half of the graph: thin Dagster wrappers around the stage modules."""

from typing import Literal, Optional

import dagster as dg
import pandas as pd
from pydantic import Field

from router_pipeline.defs import plots
from router_pipeline.defs.config import derived
from router_pipeline.defs.metadata import distribution, preview, table
from router_pipeline.defs.resources import ArtifactStore, LLMRoles, RouterFormat, TrainingCompute
from router_pipeline.labels import analysis, answering, judging, oracle, questions, split
from router_pipeline.labels import quality as label_quality_module
from router_pipeline.policies import GRADES, POLICIES
from router_pipeline.settings import SOURCES
from router_pipeline.text import MAX_QUERY_CHARS, query_hash
from router_pipeline.training import examples

DATA_GROUP = "data"


SourceName = Literal[SOURCES]  # type: ignore[valid-type]  # the one list of sources


class SourceConfig(dg.Config):
    source: SourceName = "bundled"
    path: Optional[str] = None
    required: bool = True  # False: a file that does not exist yet is skipped (noted in the metadata)


class QuestionsConfig(dg.Config):
    # Several sources at once (their order is the precedence for a query in more than
    # one); when given, `source` and `path` are not used.
    sources: Optional[list[SourceConfig]] = None
    source: SourceName = "bundled"
    path: Optional[str] = None  # jsonl / outcomes / traffic file (or a replacement bundled CSV)
    url: str = questions.OPENAI_SIMPLEQA_URL
    hf_dataset: str = questions.DEFAULT_HF_DATASET
    hf_split: str = "test"
    sample_size: int = 24  # 0 = every question; small so the offline run (training included) takes minutes
    sample_seed: int = 0
    max_query_chars: int = MAX_QUERY_CHARS


@dg.asset(name="questions", group_name=DATA_GROUP, kinds={"pandas"})
def questions_(context: dg.AssetExecutionContext, config: QuestionsConfig) -> dg.Output[pd.DataFrame]:
    """SimpleQA (or the configured sources), normalised, validated, merged and sampled;
    each row keeps its provenance."""
    specs = [questions.SourceSpec(s.source, s.path, s.required) for s in config.sources or []] or \
        [questions.SourceSpec(config.source, config.path)]
    merged = questions.load_sources(specs, sample_size=config.sample_size, sample_seed=config.sample_seed,
                                    max_query_chars=config.max_query_chars, url=config.url,
                                    hf_dataset=config.hf_dataset, hf_split=config.hf_split)
    frame, rejected = merged.frame, merged.rejected
    for r in rejected[:20]:
        context.log.warning(f"rejected row {r.row}: {r.reason}")
    meta = {
        "rows": len(frame),
        "rejected_rows": len(rejected),
        "source": ", ".join(frame["provenance"].unique()),
        "sample_size": config.sample_size,
        "preview": preview(frame[["qid", "query", "gold_answer", "provenance"]]),
    }
    meta.update(sources=table(merged.per_source), duplicates=int(merged.per_source["duplicates"].sum()),
                conflicts=int(merged.per_source["conflicts"].sum()))
    if merged.skipped:
        meta["skipped_sources"] = ", ".join(merged.skipped)
    if merged.cascade:  # the cascades' own traffic: graded by agreement, no judge call
        meta.update(_cascade_metadata(merged.cascade))
    if rejected:
        meta["rejected"] = table(pd.DataFrame([{"row": r.row, "reason": r.reason} for r in rejected[:200]]))
    if frame["topic"].notna().any():
        meta["topics"] = table(frame["topic"].value_counts().rename_axis("topic").reset_index())
    return dg.Output(frame, metadata=meta)


def _cascade_metadata(cascades: list[dict]) -> dict:
    """Counts of the cascade sources' rows (read, graded by agreement, left ungraded,
    rejected), per source and in all, and the grades agreement gave each model."""
    counts = ["rows_read", "graded_by_agreement", "left_ungraded", "rejected"]
    grades: dict[str, dict[str, int]] = {}
    for c in cascades:
        for model, by_grade in c["grades_by_model"].items():
            for grade, n in by_grade.items():
                grades.setdefault(model, {}).setdefault(grade, 0)
                grades[model][grade] += n
    return {**{f"cascade_{k}": sum(c[k] for c in cascades) for k in counts},
            "cascade_sources": table(pd.DataFrame(cascades, columns=["source", *counts])),
            "cascade_grades_by_model": dg.MetadataValue.json(grades)}


SplitConfig = derived(split.SplitSpec, name="SplitConfig")


SPLIT_CHECKS = ["split_disjoint", "split_ratio", "no_empty_queries"]


@dg.multi_asset(
    group_name=DATA_GROUP,
    outs={"train_questions": dg.AssetOut(kinds={"pandas"}), "test_questions": dg.AssetOut(kinds={"pandas"})},
    check_specs=[dg.AssetCheckSpec(name, asset="train_questions", blocking=True) for name in SPLIT_CHECKS],
)
def split_questions(config: SplitConfig, questions: pd.DataFrame):
    """80/20 split by a seeded hash of each normalised query (adding rows never moves old
    ones), or by domain: whole topics held out, so the test split is unseen subjects."""
    try:
        train, test = split.split_questions(questions, config.test_fraction, config.seed, config.by)
    except split.SplitError as exc:
        raise dg.Failure(str(exc)) from None
    n = len(train) + len(test)
    share = len(test) / n if n else 0.0
    tolerance = split.ratio_tolerance(n, config.test_fraction)
    by_domain = config.by == "domain"
    if by_domain:  # whole domains move together: the share can miss by up to the largest domain's
        tolerance = max(tolerance, float(questions["topic"].value_counts(normalize=True).max()))
    domain = (lambda f: f["topic"]) if by_domain else None
    meta = {"split_by": config.by, "test_share": share}
    if by_domain:
        meta["test_domains"] = dg.MetadataValue.json(sorted(test["topic"].unique().tolist()))
    yield dg.Output(train.assign(split=split.TRAIN, holdout_domain=domain), "train_questions",
                    metadata={"rows": len(train), **meta})
    yield dg.Output(test.assign(split=split.TEST, holdout_domain=domain), "test_questions",
                    metadata={"rows": len(test), **meta})
    overlap = set(train["qid"]) & set(test["qid"])
    yield dg.AssetCheckResult(check_name="split_disjoint", asset_key="train_questions", passed=not overlap,
                              metadata={"overlap": len(overlap)})
    yield dg.AssetCheckResult(check_name="split_ratio", asset_key="train_questions",
                              passed=abs(share - config.test_fraction) <= tolerance,
                              metadata={"test_share": share, "target": config.test_fraction, "tolerance": tolerance})
    empty = int((pd.concat([train, test])["query"].str.strip() == "").sum())
    yield dg.AssetCheckResult(check_name="no_empty_queries", asset_key="train_questions", passed=empty == 0,
                              metadata={"empty": empty})


def _stats_table(stats: dict) -> dg.TableMetadataValue:
    return table(pd.DataFrame([{"role": role, **s.as_dict()} for role, s in stats.items()]).round(6))


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"}, check_specs=[dg.AssetCheckSpec("no_failed_calls", asset="answers")])
def answers(llm: LLMRoles, artifacts: ArtifactStore, compute: TrainingCompute,
            train_questions: pd.DataFrame, test_questions: pd.DataFrame):
    """Medium and large answers to every question of both splits (test answers are only
    used to score routing). Cached: a re-run makes no new model call."""
    both = pd.concat([train_questions, test_questions], ignore_index=True)
    roles = llm.roles()
    tiers = {"medium": roles.medium, "large": roles.large}
    clients = {tier: roles.client(tier) for tier in tiers}
    with artifacts.llm_cache() as cache:
        frame, stats = answering.generate_answers(both, tiers, clients, cache, concurrency=roles.concurrency,
                                                  retry=roles.retry(), progress=compute.progress)
    yield from answered(frame, stats, roles.describe())


def answered(frame: pd.DataFrame, stats: dict, models: dict):
    """The Output and the no_failed_calls check of an answers asset (``models``: who answered)."""
    calls = sum(s.calls for s in stats.values())
    errors = frame[frame["status"] == "error"]
    status = frame.groupby(["tier", "status"]).size().rename("count").reset_index()
    yield dg.Output(frame, metadata={
        "rows": len(frame),
        "model_calls": calls,
        "cache_hits": sum(s.cache_hits for s in stats.values()),
        "retries": sum(s.retries for s in stats.values()),
        "possibly_billed_retries": sum(s.possibly_billed_retries for s in stats.values()),
        "waited_for_other_runs": sum(s.waited_for_other_runs for s in stats.values()),
        "errors": len(errors),
        "recorded_without_cost": int((~frame["cost_known"]).sum()),
        "input_tokens": int(frame["input_tokens"].sum()),
        "output_tokens": int(frame["output_tokens"].sum()),
        "cost_usd_total": round(float(frame["cost_usd"].sum()), 6),
        "cost_usd_this_run": round(sum(s.cost_usd for s in stats.values()), 6),
        "cost_by_tier": table(frame.groupby("tier")[["input_tokens", "output_tokens", "cost_usd"]].sum().round(6)),
        "status": table(status),
        "runs": _stats_table(stats),
        "models": dg.MetadataValue.json(models),
    })
    yield dg.AssetCheckResult(
        check_name="no_failed_calls", passed=errors.empty,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"failed": len(errors), "first_errors": dg.MetadataValue.md(
            errors[["qid", "tier", "error"]].head(10).to_markdown(index=False) if not errors.empty else "none")},
    )


class JudgeConfig(dg.Config):
    seed: int = 0  # which answer the judge sees first when it grades both of a question
    # Answers with a reference also graded against the rubric (an LLM judge only): how far
    # labels made without references agree with reference-based ones (label_quality).
    rubric_check: int = 0


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"})
def judgments(config: JudgeConfig, llm: LLMRoles, artifacts: ArtifactStore, compute: TrainingCompute,
              answers: pd.DataFrame, train_questions: pd.DataFrame, test_questions: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Blind grades (Correct / Incorrect / IDK), one per answer: the judge sees the
    question, the reference and that answer only."""
    both = pd.concat([train_questions, test_questions], ignore_index=True)
    roles = llm.roles()
    with artifacts.llm_cache() as cache:
        frame, stats = judging.judge_answers(answers, both, judge=roles.judge, client=roles.client("judge"),
                                             cache=cache, seed=config.seed, concurrency=roles.concurrency,
                                             retry=roles.retry(), progress=compute.progress,
                                             rubric_check=config.rubric_check)
    labels = pd.crosstab(frame["label"].fillna("ungraded"), frame["tier"]).reindex(
        list(GRADES) + ["ungraded"], fill_value=0).rename_axis("label")
    return dg.Output(frame, metadata={
        "rows": len(frame),
        "labels_by_tier": table(labels),
        "judges": table(frame["judge"].value_counts().rename_axis("judge").reset_index()),
        "judge_calls": stats.calls,
        "judge_cache_hits": stats.cache_hits,
        "judge_possibly_billed_retries": stats.possibly_billed_retries,
        "judge_cost_usd_this_run": round(stats.cost_usd, 6),
    })


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"})
def label_quality(artifacts: ArtifactStore, questions: pd.DataFrame, judgments: pd.DataFrame,
                  oracle_labels: pd.DataFrame, council_labels: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Per source: the policy mix of its labels, what they were graded against, how often
    the rubric agrees with the reference (judgments.rubric_check), conflicting copies; and
    how often the llm-council agrees with the oracle on the same query."""
    frame, council = label_quality_module.label_quality(questions, judgments, oracle_labels, council_labels)
    plot = plots.label_mix(frame, artifacts.layout().plots / "label_mix.png")
    return dg.Output(frame, metadata={"sources": table(frame), **council,
                                      "label_mix": dg.MetadataValue.md(plots.markdown_image(plot, "label mix"))})


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"})
def oracle_labels(judgments: pd.DataFrame, train_questions: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """The 9-cell matrix applied to the train split's grades, with each cell's rationale."""
    frame, excluded = oracle.build_oracle_labels(judgments, train_questions)
    return dg.Output(frame, metadata={
        "rows": len(frame),
        "excluded": len(excluded),
        "matrix_counts": table(oracle.matrix_counts(frame).rename_axis("medium \\ large")),
        "policy_distribution": distribution(frame["policy"], POLICIES),
    })


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"})
def query_analyses(llm: LLMRoles, artifacts: ArtifactStore, compute: TrainingCompute, train_questions: pd.DataFrame,
                   answers: pd.DataFrame, council_labels: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """One sentence per train (and council) query from the query alone: the router's
    reasoning. An analysis that reveals the reference or an answer is replaced by the
    rules analyser's (the count is in the metadata)."""
    queries = pd.concat([train_questions[["qid", "query"]], council_labels[["qid", "query"]]], ignore_index=True)
    roles = llm.roles()
    with artifacts.llm_cache() as cache:
        frame, stats = analysis.analyse_queries(queries, analyser=roles.analyser, client=roles.client("analyser"),
                                                cache=cache, concurrency=roles.concurrency, retry=roles.retry(),
                                                progress=compute.progress)
    frame, replaced = analysis.scrub_leaks(frame, analysis.answer_secrets(train_questions, answers))
    return dg.Output(frame, metadata={
        "rows": len(frame),
        "analysers": table(frame["analyser"].value_counts().rename_axis("analyser").reset_index()),
        "replaced_for_leaks": replaced,
        "analyser_calls": stats.calls,
        "preview": preview(frame[["query", "analysis"]]),
    })


ExamplesConfig = derived(examples.ExampleSpec, name="ExamplesConfig")


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("no_test_queries", asset="training_examples", blocking=True,
                                         additional_deps=["test_questions"],
                                         description="No training example has the query of a test question "
                                                     "(normalised), whichever source labelled it.")])
def training_examples(config: ExamplesConfig, oracle_labels: pd.DataFrame, query_analyses: pd.DataFrame,
                      council_labels: pd.DataFrame, train_questions: pd.DataFrame, test_questions: pd.DataFrame):
    """Oracle and council labels joined with analyses, deduplicated by normalised query,
    with `source`, and a seeded validation slice held out from training (calibration and
    the choice between routers): whole domains when the split is by domain."""
    extra = council_labels[["qid", "query", "policy", "rationale", "source"]]
    domains = None
    if "holdout_domain" in train_questions and train_questions["holdout_domain"].notna().any():
        domains = dict(zip(train_questions["qid"], train_questions["holdout_domain"]))
    frame, dropped = examples.build_training_examples(
        oracle_labels, query_analyses, extra, precedence="oracle" if config.precedence == "oracle" else "extra",
        validation_fraction=config.validation_fraction, seed=config.seed, domains=domains)
    conflicts = examples.label_conflicts(oracle_labels, extra)
    meta = {
        "rows": len(frame),
        "duplicates_dropped": dropped,
        "oracle_council_conflicts": len(conflicts),
        "precedence": config.precedence,
        "by_source": table(frame["source"].value_counts().rename_axis("source").reset_index()),
        "by_split": table(frame["split"].value_counts().rename_axis("split").reset_index()),
        "policy_distribution": distribution(frame["policy"], POLICIES),
    }
    if not conflicts.empty:
        meta["conflicts"] = table(conflicts.head(100))
    yield dg.Output(frame, metadata=meta)
    in_test = frame[frame["query"].map(query_hash).isin(set(test_questions["query"].map(query_hash)))]
    yield dg.AssetCheckResult(check_name="no_test_queries", passed=in_test.empty, metadata={
        "test_queries_in_training": len(in_test),
        "by_source": dg.MetadataValue.json(in_test["source"].value_counts().to_dict())})


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("sft_round_trip", asset="sft_dataset", blocking=True)])
def sft_dataset(router_format: RouterFormat, training_examples: pd.DataFrame):
    """TRL prompt-completion rows for supervised fine-tuning, in the configured format."""
    mode = router_format.mode
    frame = examples.build_sft_dataset(training_examples, mode)
    yield dg.Output(frame, metadata={
        "rows": len(frame),
        "mode": mode,
        "policy_distribution": distribution(frame["policy"], POLICIES),
        "example": dg.MetadataValue.md(f"```\n{frame['prompt'].iloc[0]}{frame['completion'].iloc[0]}\n```" if len(frame) else "empty"),
    })
    bad_prompts = examples.prompt_failures(frame, training_examples)
    bad_completions = examples.completion_failures(frame, "completion", "policy", mode)
    yield dg.AssetCheckResult(check_name="sft_round_trip", passed=not (bad_prompts or bad_completions),
                              metadata={"bad_prompts": len(bad_prompts), "bad_completions": len(bad_completions)})


class DPODatasetConfig(dg.Config):
    rejected_per_example: int = Field(1, ge=1, le=2, description="2: every wrong policy as its own pair")


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("dpo_pairs_valid", asset="dpo_dataset", blocking=True)])
def dpo_dataset(config: DPODatasetConfig, router_format: RouterFormat, training_examples: pd.DataFrame):
    """TRL preference rows (prompt, chosen, rejected): each wrong policy is a rejection."""
    mode = router_format.mode
    frame = examples.build_dpo_dataset(training_examples, mode, config.rejected_per_example)
    yield dg.Output(frame, metadata={
        "rows": len(frame),
        "examples": int(frame["qid"].nunique()),
        "mode": mode,
        "pairs": table(frame.groupby(["chosen_policy", "rejected_policy"]).size().rename("count").reset_index()),
    })
    same = int((frame["chosen"] == frame["rejected"]).sum())
    bad_chosen = examples.completion_failures(frame, "chosen", "chosen_policy", mode)
    bad_rejected = examples.completion_failures(frame, "rejected", "rejected_policy", mode)
    bad_prompts = examples.prompt_failures(frame, training_examples)
    yield dg.AssetCheckResult(
        check_name="dpo_pairs_valid", passed=not (same or bad_chosen or bad_rejected or bad_prompts),
        metadata={"chosen_equals_rejected": same, "bad_chosen": len(bad_chosen),
                  "bad_rejected": len(bad_rejected), "bad_prompts": len(bad_prompts)})


data_job = dg.define_asset_job("data_job", selection=dg.AssetSelection.groups(DATA_GROUP),
                               description="Questions to SFT/DPO datasets.")
