"""Training examples and the TRL datasets built from them.

- training_examples: oracle labels (+ council labels later) joined with the query
  analyses, one row per normalised query, with a ``source`` column.
- sft_dataset: TRL prompt-completion rows.
- dpo_dataset: TRL preference rows (prompt, chosen, rejected); every wrong policy
  can serve as a rejected completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd

from router_pipeline.policies import POLICIES
from router_pipeline.routers.prompt import (
    DEFAULT_MODE, build_completion, build_prompt, parse_completion, query_from_prompt, router_query,
)
from router_pipeline.labels.split import TRAIN, VALIDATION, SplitSpec, validation_mask
from router_pipeline.text import query_hash

PRECEDENCE = ("oracle", "extra")


@dataclass(frozen=True)
class ExampleSpec:
    """How the examples are made (the one owner of these defaults)."""

    precedence: Literal["oracle", "council"] = "oracle"  # which label wins when oracle and council label a query
    validation_fraction: float = 0.1  # held out from training; router_evaluation chooses and calibrates on it
    seed: int = SplitSpec.seed
OTHER_DOMAIN = "no domain"
CONFLICT_COLUMNS = ("query", "oracle_policy", "extra_policy")
EXAMPLE_COLUMNS = ["qid", "query_hash", "query", "policy", "analysis", "rationale", "source", "split"]


def build_training_examples(
    oracle_labels: pd.DataFrame,
    analyses: pd.DataFrame,
    extra: pd.DataFrame | None = None,
    precedence: str = "oracle",
    validation_fraction: float = 0.0,
    seed: int = SplitSpec.seed,
    domains: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, int]:
    """(examples, duplicates dropped). ``extra`` (e.g. council labels) needs qid,
    query, policy, rationale, source; on the same normalised query the
    ``precedence`` source ("oracle" or "extra") wins. ``split`` is ``train``, or
    ``validation`` for the seeded slice held out from training (calibration, choosing
    between routers). With ``domains`` (qid -> domain, a domain split), whole domains
    are held out; rows without one (council labels) count as one domain of their own."""
    if precedence not in PRECEDENCE:
        raise ValueError(f"precedence must be one of {PRECEDENCE}, got {precedence!r}")
    by_qid = analyses.set_index("qid")["analysis"]
    oracle = oracle_labels.assign(source="oracle")
    frames = [oracle] + ([extra] if extra is not None and not extra.empty else [])
    if precedence == "extra":
        frames.reverse()
    rows = pd.concat(frames, ignore_index=True)
    missing = ~rows["qid"].isin(by_qid.index)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} labelled queries have no analysis (qids {list(rows.loc[missing, 'qid'])[:5]})")
    rows["analysis"] = rows["qid"].map(by_qid)
    rows["query_hash"] = rows["query"].map(query_hash)
    before = len(rows)
    rows = rows.drop_duplicates("query_hash", keep="first")
    grouped = rows["qid"].map(domains).fillna(f"({OTHER_DOMAIN})") if domains else None
    rows["split"] = validation_mask(rows["qid"], validation_fraction, seed, grouped).map({True: VALIDATION, False: TRAIN})
    return rows[EXAMPLE_COLUMNS].reset_index(drop=True), before - len(rows)


def label_conflicts(oracle_labels: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """Queries labelled by both sources with different policies."""
    if extra is None or extra.empty or oracle_labels.empty:
        return pd.DataFrame(columns=CONFLICT_COLUMNS)
    a = oracle_labels.assign(query_hash=oracle_labels["query"].map(query_hash))[["query_hash", "query", "policy"]]
    b = extra.assign(query_hash=extra["query"].map(query_hash))[["query_hash", "policy"]]
    both = a.merge(b, on="query_hash", suffixes=("_oracle", "_extra"))
    both = both[both["policy_oracle"] != both["policy_extra"]]
    return both.rename(columns={"policy_oracle": "oracle_policy", "policy_extra": "extra_policy"})[
        list(CONFLICT_COLUMNS)].reset_index(drop=True)


def training_rows(examples: pd.DataFrame) -> pd.DataFrame:
    """The examples training may see: the validation slice is held out."""
    return examples[examples["split"] != VALIDATION] if "split" in examples else examples


def build_sft_dataset(examples: pd.DataFrame, mode: str = DEFAULT_MODE) -> pd.DataFrame:
    examples = training_rows(examples)
    return pd.DataFrame({
        "qid": examples["qid"],
        "prompt": examples["query"].map(build_prompt),
        "completion": [build_completion(p, a, mode) for p, a in zip(examples["policy"], examples["analysis"])],
        "policy": examples["policy"],
        "mode": mode,
    }).reset_index(drop=True)


def build_dpo_dataset(examples: pd.DataFrame, mode: str = DEFAULT_MODE, rejected_per_example: int = 2) -> pd.DataFrame:
    """One row per (example, wrong policy): the chosen completion carries the labelled
    policy, the rejected one the same analysis with a wrong policy."""
    if not 1 <= rejected_per_example <= len(POLICIES) - 1:
        raise ValueError(f"rejected_per_example must be 1..{len(POLICIES) - 1}")
    rows = []
    for ex in training_rows(examples).itertuples(index=False):
        prompt = build_prompt(ex.query)
        chosen = build_completion(ex.policy, ex.analysis, mode)
        wrong = [p for p in POLICIES if p != ex.policy]
        # Rotate the starting wrong policy so that with one rejection per example both kinds appear.
        start = int(ex.query_hash, 16) % len(wrong)
        for p in (wrong[start:] + wrong[:start])[:rejected_per_example]:
            rows.append({"qid": ex.qid, "prompt": prompt, "chosen": chosen,
                         "rejected": build_completion(p, ex.analysis, mode),
                         "chosen_policy": ex.policy, "rejected_policy": p, "mode": mode})
    return pd.DataFrame(rows, columns=["qid", "prompt", "chosen", "rejected", "chosen_policy", "rejected_policy", "mode"])


def completion_failures(frame: pd.DataFrame, completion_col: str, policy_col: str, mode: str) -> list[dict]:
    """Rows whose completion does not parse back to their policy."""
    bad = []
    for i, (c, p) in enumerate(zip(frame[completion_col], frame[policy_col])):
        parsed = parse_completion(c, mode)
        if parsed.policy != p:
            bad.append({"row": i, "expected": p, "got": parsed.policy, "error": parsed.error})
    return bad


def prompt_failures(frame: pd.DataFrame, examples: pd.DataFrame) -> list[dict]:
    """Rows whose prompt does not hold their example's query as the router sees it."""
    query = dict(zip(examples["qid"], examples["query"]))
    bad = []
    for i, (qid, prompt) in enumerate(zip(frame["qid"], frame["prompt"])):
        try:
            ok = qid in query and query_from_prompt(prompt) == router_query(query[qid])
        except ValueError:
            ok = False
        if not ok:
            bad.append({"row": i, "qid": qid})
    return bad
