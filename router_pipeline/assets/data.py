"""The data half of the graph: thin Dagster wrappers around the stage modules."""


from typing import Optional

import dagster as dg
import pandas as pd

from router_pipeline import analysis, answering, judging, oracle, questions, split, training_data
from router_pipeline.assets.council import council_labels
from router_pipeline.assets.metadata import distribution, preview, table
from router_pipeline.policies import LABELS, POLICIES
from router_pipeline.resources import LLMRoles
from router_pipeline.router_format import DEFAULT_MODE, MODES, parse_completion, query_from_prompt, router_query

DATA_GROUP = "data"


class QuestionsConfig(dg.Config):
    source: str = "bundled"  # bundled | hf | url | jsonl | outcomes
    path: Optional[str] = None  # jsonl / outcomes file (or a replacement bundled CSV)
    url: str = questions.OPENAI_SIMPLEQA_URL
    hf_dataset: str = questions.DEFAULT_HF_DATASET
    hf_split: str = "test"
    sample_size: int = 24  # 0 = every question; small so the offline run (training included) takes minutes
    sample_seed: int = 0
    max_query_chars: int = 4000


@dg.asset(name="questions", group_name=DATA_GROUP, kinds={"pandas"})
def questions_(context: dg.AssetExecutionContext, config: QuestionsConfig) -> dg.Output[pd.DataFrame]:
    """SimpleQA (or the configured source), normalised, validated and sampled."""
    frame, rejected = questions.load_questions(
        config.source, path=config.path, url=config.url, hf_dataset=config.hf_dataset,
        hf_split=config.hf_split, sample_size=config.sample_size, sample_seed=config.sample_seed,
        max_query_chars=config.max_query_chars,
    )
    for r in rejected[:20]:
        context.log.warning(f"rejected row {r.row}: {r.reason}")
    meta = {
        "rows": len(frame),
        "rejected_rows": len(rejected),
        "source": config.source,
        "sample_size": config.sample_size,
        "preview": preview(frame[["qid", "query", "gold_answer"]]),
    }
    if rejected:
        meta["rejected"] = table(pd.DataFrame([{"row": r.row, "reason": r.reason} for r in rejected[:200]]))
    if frame["topic"].notna().any():
        meta["topics"] = table(frame["topic"].value_counts().rename_axis("topic").reset_index())
    return dg.Output(frame, metadata=meta)


class SplitConfig(dg.Config):
    test_fraction: float = 0.2
    seed: int = 42


SPLIT_CHECKS = ["split_disjoint", "split_ratio", "no_empty_queries"]


@dg.multi_asset(
    group_name=DATA_GROUP,
    outs={"train_questions": dg.AssetOut(kinds={"pandas"}), "test_questions": dg.AssetOut(kinds={"pandas"})},
    check_specs=[dg.AssetCheckSpec(name, asset="train_questions", blocking=True) for name in SPLIT_CHECKS],
)
def split_questions(config: SplitConfig, questions: pd.DataFrame):
    """80/20 split by a seeded hash of each normalised query: adding rows never moves old ones."""
    train, test = split.split_questions(questions, config.test_fraction, config.seed)
    n = len(train) + len(test)
    share = len(test) / n if n else 0.0
    tolerance = split.ratio_tolerance(n, config.test_fraction)
    yield dg.Output(train.assign(split=split.TRAIN), "train_questions", metadata={"rows": len(train), "test_share": share})
    yield dg.Output(test.assign(split=split.TEST), "test_questions", metadata={"rows": len(test), "test_share": share})
    overlap = set(train["qid"]) & set(test["qid"])
    yield dg.AssetCheckResult(check_name="split_disjoint", asset_key="train_questions", passed=not overlap,
                              metadata={"overlap": len(overlap)})
    yield dg.AssetCheckResult(check_name="split_ratio", asset_key="train_questions",
                              passed=abs(share - config.test_fraction) <= tolerance,
                              metadata={"test_share": share, "target": config.test_fraction, "tolerance": tolerance})
    empty = int((pd.concat([train, test])["query"].str.strip() == "").sum())
    yield dg.AssetCheckResult(check_name="no_empty_queries", asset_key="train_questions", passed=empty == 0,
                              metadata={"empty": empty})


class ProgressConfig(dg.Config):
    progress: bool = True  # tqdm bars in the compute logs


def _stats_table(stats: dict) -> dg.TableMetadataValue:
    return table(pd.DataFrame([{"role": role, **s.as_dict()} for role, s in stats.items()]).round(6))


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"}, check_specs=[dg.AssetCheckSpec("no_failed_calls", asset="answers")])
def answers(context: dg.AssetExecutionContext, config: ProgressConfig, llm: LLMRoles,
            train_questions: pd.DataFrame, test_questions: pd.DataFrame):
    """Medium and large answers to every question of both splits (test answers are only
    used to score routing). Cached: a re-run makes no new model call."""
    both = pd.concat([train_questions, test_questions], ignore_index=True)
    roles = {"medium": llm.spec("medium"), "large": llm.spec("large")}
    clients = {tier: llm.client(tier) for tier in roles}
    cache = llm.cache()
    try:
        frame, stats = answering.generate_answers(both, roles, clients, cache, concurrency=llm.concurrency,
                                                  retry=llm.retry(), progress=config.progress)
    finally:
        cache.close()
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
        "models": dg.MetadataValue.json(llm.describe()),
    })
    yield dg.AssetCheckResult(
        check_name="no_failed_calls", passed=errors.empty,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"failed": len(errors), "first_errors": dg.MetadataValue.md(
            errors[["qid", "tier", "error"]].head(10).to_markdown(index=False) if not errors.empty else "none")},
    )


class JudgeConfig(dg.Config):
    seed: int = 0
    progress: bool = True


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"})
def judgments(context: dg.AssetExecutionContext, config: JudgeConfig, llm: LLMRoles, answers: pd.DataFrame,
              train_questions: pd.DataFrame, test_questions: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Blind grades (Correct / Incorrect / IDK), one per answer: the judge sees the
    question, the reference and that answer only."""
    both = pd.concat([train_questions, test_questions], ignore_index=True)
    cache = llm.cache()
    try:
        frame, stats = judging.judge_answers(answers, both, judge=llm.spec("judge"), client=llm.client("judge"),
                                             cache=cache, seed=config.seed, concurrency=llm.concurrency,
                                             retry=llm.retry(), progress=config.progress)
    finally:
        cache.close()
    labels = pd.crosstab(frame["label"].fillna("ungraded"), frame["tier"]).reindex(
        list(LABELS) + ["ungraded"], fill_value=0).rename_axis("label")
    return dg.Output(frame, metadata={
        "rows": len(frame),
        "labels_by_tier": table(labels),
        "judges": table(frame["judge"].value_counts().rename_axis("judge").reset_index()),
        "judge_calls": stats.calls,
        "judge_cache_hits": stats.cache_hits,
        "judge_possibly_billed_retries": stats.possibly_billed_retries,
        "judge_cost_usd_this_run": round(stats.cost_usd, 6),
    })


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("oracle_train_only", asset="oracle_labels", blocking=True,
                                         additional_deps=["test_questions"])])
def oracle_labels(judgments: pd.DataFrame, train_questions: pd.DataFrame, test_questions: pd.DataFrame):
    """The 9-cell matrix applied to the train split's grades, with each cell's rationale."""
    frame, excluded = oracle.build_oracle_labels(judgments, train_questions)
    yield dg.Output(frame, metadata={
        "rows": len(frame),
        "excluded": len(excluded),
        "matrix_counts": table(oracle.matrix_counts(frame).rename_axis("medium \\ large")),
        "policy_distribution": distribution(frame["policy"], POLICIES),
    })
    leaked = frame["qid"].isin(test_questions["qid"]).sum()
    yield dg.AssetCheckResult(check_name="oracle_train_only", passed=bool(leaked == 0), metadata={"test_rows": int(leaked)})


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("analyses_leak_free", asset="query_analyses", blocking=True)])
def query_analyses(context: dg.AssetExecutionContext, config: ProgressConfig, llm: LLMRoles,
                   train_questions: pd.DataFrame, answers: pd.DataFrame, council_labels: pd.DataFrame):
    """One sentence per train (and council) query from the query alone: the router's
    reasoning. Answers are read only to verify that no analysis reveals one."""
    queries = pd.concat([train_questions[["qid", "query"]], council_labels[["qid", "query"]]], ignore_index=True)
    cache = llm.cache()
    try:
        frame, stats = analysis.analyse_queries(queries, analyser=llm.spec("analyser"), client=llm.client("analyser"),
                                                cache=cache, concurrency=llm.concurrency, retry=llm.retry(),
                                                progress=config.progress)
    finally:
        cache.close()
    secrets = _secrets(train_questions, answers)
    frame, replaced = analysis.scrub_leaks(frame, secrets)
    yield dg.Output(frame, metadata={
        "rows": len(frame),
        "analysers": table(frame["analyser"].value_counts().rename_axis("analyser").reset_index()),
        "replaced_for_leaks": replaced,
        "analyser_calls": stats.calls,
        "preview": preview(frame[["query", "analysis"]]),
    })
    leaks = [(q, analysis.find_leaks(a, t, secrets.get(q, {}))) for q, a, t in zip(frame["qid"], frame["analysis"], frame["query"])]
    leaks = [(q, names) for q, names in leaks if names]
    yield dg.AssetCheckResult(check_name="analyses_leak_free", passed=not leaks,
                              metadata={"leaking": len(leaks), "examples": dg.MetadataValue.json(leaks[:10])})


def _secrets(questions_frame: pd.DataFrame, answers_frame: pd.DataFrame) -> dict[str, dict]:
    """qid -> {"gold": ..., "medium_answer": ..., "large_answer": ...}, abstentions left out."""
    out = {q: {"gold": g} for q, g in zip(questions_frame["qid"], questions_frame["gold_answer"])}
    for row in answers_frame.itertuples(index=False):
        if row.qid in out and row.status in ("ok", "recorded") and not judging.is_abstention(row.answer):
            out[row.qid][f"{row.tier}_answer"] = row.answer
    return out


class ExamplesConfig(dg.Config):
    precedence: str = "oracle"  # which label wins when oracle and council label the same query: oracle | council
    validation_fraction: float = 0.1  # held out from training; router_evaluation calibrates its threshold on it
    seed: int = 42


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"})
def training_examples(config: ExamplesConfig, oracle_labels: pd.DataFrame, query_analyses: pd.DataFrame,
                      council_labels: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Oracle and council labels joined with analyses, deduplicated by normalised query,
    with `source`, and a seeded validation slice held out from training (calibration)."""
    if config.precedence not in ("oracle", "council"):
        raise dg.Failure(f"precedence must be 'oracle' or 'council', got {config.precedence!r}")
    extra = council_labels[["qid", "query", "policy", "rationale", "source"]]
    frame, dropped = training_data.build_training_examples(
        oracle_labels, query_analyses, extra, precedence="oracle" if config.precedence == "oracle" else "extra",
        validation_fraction=config.validation_fraction, seed=config.seed)
    conflicts = training_data.label_conflicts(oracle_labels, extra)
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
    return dg.Output(frame, metadata=meta)


class DatasetConfig(dg.Config):
    mode: str = DEFAULT_MODE  # fast (decision only) | explained (decision, then why) | reasoning (why, then decision)
    rejected_per_example: int = 1  # up to 2: every wrong policy as its own pair


def _parse_failures(frame: pd.DataFrame, completion_col: str, policy_col: str, mode: str) -> list:
    bad = []
    for i, (c, p) in enumerate(zip(frame[completion_col], frame[policy_col])):
        parsed = parse_completion(c, mode)
        if parsed.policy != p:
            bad.append({"row": i, "expected": p, "got": parsed.policy, "error": parsed.error})
    return bad


def _prompt_failures(frame: pd.DataFrame, examples: pd.DataFrame) -> list:
    query = dict(zip(examples["qid"], examples["query"]))
    bad = []
    for i, (qid, prompt) in enumerate(zip(frame["qid"], frame["prompt"])):
        try:
            ok = query_from_prompt(prompt) == router_query(query[qid])
        except ValueError:
            ok = False
        if not ok:
            bad.append({"row": i, "qid": qid})
    return bad


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("sft_round_trip", asset="sft_dataset", blocking=True)])
def sft_dataset(config: DatasetConfig, training_examples: pd.DataFrame):
    """TRL prompt-completion rows for supervised fine-tuning."""
    if config.mode not in MODES:
        raise dg.Failure(f"mode must be one of {MODES}, got {config.mode!r}")
    frame = training_data.build_sft_dataset(training_examples, config.mode)
    yield dg.Output(frame, metadata={
        "rows": len(frame),
        "mode": config.mode,
        "policy_distribution": distribution(frame["policy"], POLICIES),
        "example": dg.MetadataValue.md(f"```\n{frame['prompt'].iloc[0]}{frame['completion'].iloc[0]}\n```" if len(frame) else "empty"),
    })
    bad_prompts = _prompt_failures(frame, training_examples)
    bad_completions = _parse_failures(frame, "completion", "policy", config.mode)
    yield dg.AssetCheckResult(check_name="sft_round_trip", passed=not (bad_prompts or bad_completions),
                              metadata={"bad_prompts": len(bad_prompts), "bad_completions": len(bad_completions)})


@dg.asset(group_name=DATA_GROUP, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("dpo_pairs_valid", asset="dpo_dataset", blocking=True)])
def dpo_dataset(config: DatasetConfig, training_examples: pd.DataFrame):
    """TRL preference rows (prompt, chosen, rejected): each wrong policy is a rejection."""
    if config.mode not in MODES:
        raise dg.Failure(f"mode must be one of {MODES}, got {config.mode!r}")
    frame = training_data.build_dpo_dataset(training_examples, config.mode, config.rejected_per_example)
    yield dg.Output(frame, metadata={
        "rows": len(frame),
        "examples": int(frame["qid"].nunique()),
        "mode": config.mode,
        "pairs": table(frame.groupby(["chosen_policy", "rejected_policy"]).size().rename("count").reset_index()),
    })
    same = int((frame["chosen"] == frame["rejected"]).sum())
    bad_chosen = _parse_failures(frame, "chosen", "chosen_policy", config.mode)
    bad_rejected = _parse_failures(frame, "rejected", "rejected_policy", config.mode)
    bad_prompts = _prompt_failures(frame, training_examples)
    yield dg.AssetCheckResult(
        check_name="dpo_pairs_valid", passed=not (same or bad_chosen or bad_rejected or bad_prompts),
        metadata={"chosen_equals_rejected": same, "bad_chosen": len(bad_chosen),
                  "bad_rejected": len(bad_rejected), "bad_prompts": len(bad_prompts)})


DATA_ASSETS = [questions_, split_questions, answers, judgments, oracle_labels, council_labels, query_analyses,
               training_examples, sft_dataset, dpo_dataset]
