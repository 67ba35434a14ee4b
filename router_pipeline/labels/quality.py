"""How far the labels can be trusted, per source: what they say (the policy mix), how
they were graded (against a reference, against the rubric, recorded), how often a
rubric grade agrees with the reference-based grade of the same answer, how often the
llm-council agrees with the oracle on the same query, and how many queries came with
conflicting copies from another source."""

from __future__ import annotations

import pandas as pd

from router_pipeline.labels.judging import GOLD, RUBRIC
from router_pipeline.policies import POLICIES

UNKNOWN = "(unknown)"  # questions materialised before rows carried their provenance


def label_quality(questions: pd.DataFrame, judgments: pd.DataFrame, oracle_labels: pd.DataFrame,
                  council_labels: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """One row per source, and the council-versus-oracle agreement (over all sources)."""
    q = questions.set_index("qid")
    source = q["provenance"] if "provenance" in q.columns else pd.Series(UNKNOWN, index=q.index)
    conflicts = q["conflicts"] if "conflicts" in q.columns else pd.Series(0, index=q.index)
    judged = judgments.assign(source=judgments["qid"].map(source).fillna(UNKNOWN))
    labelled = oracle_labels.assign(source=oracle_labels["qid"].map(source).fillna(UNKNOWN))
    rows = []
    for name in sorted(set(source)):
        j = judged[judged["source"] == name]
        both = j.dropna(subset=["label", "rubric_label"]) if "rubric_label" in j.columns else j.iloc[:0]
        mix = labelled.loc[labelled["source"] == name, "policy"].value_counts(normalize=True)
        rows.append({
            "source": name, "questions": int((source == name).sum()), "labelled": int((labelled["source"] == name).sum()),
            **{f"share_{p}": round(float(mix.get(p, 0.0)), 3) for p in POLICIES},
            "graded_against_gold": int((j["reference"] == GOLD).sum()),
            "graded_against_rubric": int((j["reference"] == RUBRIC).sum()),
            "grades_recorded": int((j["judge"] == "recorded").sum()),
            "ungraded": int(j["label"].isna().sum()),
            "rubric_vs_gold_n": len(both),
            "rubric_vs_gold_agreement": round(float((both["label"] == both["rubric_label"]).mean()), 3) if len(both) else None,
            "conflicting_queries": int(((source == name) & (conflicts > 0)).sum()),
        })
    overlap = council_labels[["qid", "policy"]].merge(oracle_labels[["qid", "policy"]], on="qid",
                                                      suffixes=("_council", "_oracle"))
    council = {"council_vs_oracle_n": len(overlap),
               "council_vs_oracle_agreement": round(float((overlap["policy_council"] == overlap["policy_oracle"]).mean()), 3)
               if len(overlap) else None}
    return pd.DataFrame(rows), council
