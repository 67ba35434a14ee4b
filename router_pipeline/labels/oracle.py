"""Oracle labels: the 9-cell matrix applied to the two blind grades of each TRAIN question."""

from __future__ import annotations

import pandas as pd

from router_pipeline.policies import GRADES, TIERS, oracle_cell

ORACLE_COLUMNS = ["qid", "query", "medium_label", "large_label", "policy", "rationale"]


def build_oracle_labels(judgments: pd.DataFrame, train_questions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labels, excluded): a question without both grades (a failed answer call) is
    excluded with the reason, never guessed."""
    train = judgments[judgments["qid"].isin(train_questions["qid"])]
    grades = train.pivot_table(index="qid", columns="tier", values="label", aggfunc="first")
    grades = grades.reindex(columns=list(TIERS))
    rows, excluded = [], []
    for _, q in train_questions.iterrows():
        g = grades.loc[q["qid"]] if q["qid"] in grades.index else None
        medium = g["medium"] if g is not None else None
        large = g["large"] if g is not None else None
        if not isinstance(medium, str) or not isinstance(large, str):
            missing = [t for t, v in (("medium", medium), ("large", large)) if not isinstance(v, str)]
            excluded.append({"qid": q["qid"], "reason": f"no grade for {', '.join(missing)}"})
            continue
        cell = oracle_cell(medium, large)
        rows.append({"qid": q["qid"], "query": q["query"], "medium_label": medium, "large_label": large,
                     "policy": cell.policy, "rationale": cell.rationale})
    return pd.DataFrame(rows, columns=ORACLE_COLUMNS), pd.DataFrame(excluded, columns=["qid", "reason"])


def matrix_counts(labels: pd.DataFrame) -> pd.DataFrame:
    """3x3 counts, medium grade (rows) x large grade (columns), all cells present."""
    counts = pd.crosstab(labels["medium_label"], labels["large_label"])
    return counts.reindex(index=list(GRADES), columns=list(GRADES), fill_value=0)

