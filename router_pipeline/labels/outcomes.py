"""Recorded outcomes of any number of models on the same questions: a row per
question with ``query`` and, for each model, ``<model>_grade`` and ``<model>_cost_usd``
(``<model>_input_tokens`` / ``_output_tokens`` are read when present).

A row missing a grade or a cost for a model of the pool is rejected, with the reason
naming the model: every router is scored on the same rows, and a row where the chosen
model has no outcome could not be scored. Rows are kept whole or not at all, and one
bad row never loses the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from router_pipeline.policies import CORRECT, GRADES
from router_pipeline.text import MAX_QUERY_CHARS, check_query, query_hash

GRADE, COST = "_grade", "_cost_usd"


class OutcomesError(ValueError):
    """An outcomes file the pool cannot be read from."""


@dataclass
class Outcomes:
    frame: pd.DataFrame  # the kept rows: qid, query, domain (when given), the models' columns
    models: list[str]
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (file row, reason)

    @property
    def correct(self) -> np.ndarray:
        """(rows, models) booleans."""
        return np.stack([(self.frame[m + GRADE] == CORRECT).to_numpy() for m in self.models], axis=1)

    @property
    def cost(self) -> np.ndarray:
        """(rows, models) USD per call."""
        return np.stack([self.frame[m + COST].to_numpy(float) for m in self.models], axis=1)


def models_of(columns) -> list[str]:
    """The models a frame records: those with both a grade and a cost column, in column order."""
    return [c[:-len(GRADE)] for c in columns if c.endswith(GRADE) and c[:-len(GRADE)] + COST in columns]


def read_outcomes(source: str | Path | pd.DataFrame, models: list[str] | None = None, *,
                  max_query_chars: int = MAX_QUERY_CHARS) -> Outcomes:
    """The rows of ``source`` (a CSV path or a frame) with a grade and a cost for every
    model of ``models`` (default: every model the file records)."""
    frame = source if isinstance(source, pd.DataFrame) else _read_csv(Path(source))
    found = models_of(frame.columns)
    models = list(models) if models is not None else found
    missing = [m for m in models if m not in found]
    if missing:
        raise OutcomesError(f"no {GRADE} and {COST} columns for {missing}; the file records {found}")
    if len(models) < 2:
        raise OutcomesError(f"a pool needs at least two models; the file records {found}")
    if "query" not in frame:
        raise OutcomesError("no 'query' column")
    keep, rejected, queries, seen = [], [], [], {}
    for i, (_, row) in enumerate(frame.iterrows()):
        line = i + 2  # the file's line: a header, then the rows
        reason = _problem(row, models)
        if reason is None:
            try:
                query = check_query(row["query"], max_query_chars)
                if query_hash(query) in seen:
                    reason = f"duplicate of line {seen[query_hash(query)]} (the same normalised query)"
            except ValueError as exc:
                reason = f"query: {exc}"
        if reason is None:
            keep.append(i)
            queries.append(query)
            seen[query_hash(query)] = line
        else:
            rejected.append((line, reason))
    kept = frame.iloc[keep].reset_index(drop=True).assign(query=queries)
    if "qid" not in kept:  # as the questions' loaders make it, so splits and folds agree with theirs
        kept.insert(0, "qid", [query_hash(q) for q in queries])
    kept["qid"] = kept["qid"].astype(str)
    if kept.empty:
        raise OutcomesError(f"no usable row; the first problems: {rejected[:3]}")
    return Outcomes(kept, models, rejected)


def _problem(row: pd.Series, models: list[str]) -> str | None:
    for m in models:
        grade, cost = row[m + GRADE], row[m + COST]
        if not isinstance(grade, str) or grade not in GRADES:
            return f"{m}: grade {grade!r} is not one of {GRADES}"
        if isinstance(cost, bool) or not isinstance(cost, (int, float, np.number)) or not math.isfinite(cost) or cost < 0:
            return f"{m}: cost {cost!r} is not a finite number >= 0"
    return None


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"qid": str})
    except FileNotFoundError:
        raise OutcomesError(f"{path}: no such file") from None
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise OutcomesError(f"{path}: not a readable CSV ({exc})") from None


def outcomes_table(questions: pd.DataFrame, answers: pd.DataFrame, judgments: pd.DataFrame,
                   models: list[str]) -> pd.DataFrame:
    """The pipeline's answers and grades of every model of a pool as an outcomes frame
    (what ``read_outcomes`` reads): a row per question with qid, query, split, domain and
    ``<model>_grade`` / ``_answer`` / ``_cost_usd`` / ``_input_tokens`` / ``_output_tokens``
    (a grade left blank where the judge gave none). A recorded answer whose cost is not
    known (a council session's) counts at that model's mean cost on the other rows: as a
    free call it would pull the router towards the model."""
    keep = ["qid", "query", "split"] + [c for c in ("topic", "holdout_domain") if c in questions]
    frame = questions[keep].rename(columns={"topic": "domain"}).drop_duplicates("qid").set_index("qid")
    grades = judgments.drop_duplicates(["qid", "tier"]).set_index(["qid", "tier"])["label"]
    calls = answers.drop_duplicates(["qid", "tier"]).set_index(["qid", "tier"])
    for m in models:
        if m not in set(answers["tier"]):
            raise OutcomesError(f"no answers of model {m!r}; the answers hold {sorted(set(answers['tier']))}")
        frame[m + GRADE] = grades.xs(m, level="tier").reindex(frame.index) if m in set(judgments["tier"]) else None
        mine = calls.xs(m, level="tier").reindex(frame.index)
        frame[m + "_answer"] = mine["answer"]
        cost = mine["cost_usd"].astype(float)
        if "cost_known" in mine:
            unknown = mine["cost_known"].eq(False)
            if unknown.any() and (~unknown & cost.notna()).any():
                cost = cost.mask(unknown, cost[~unknown].mean())
        frame[m + COST] = cost
        frame[m + "_input_tokens"], frame[m + "_output_tokens"] = mine["input_tokens"], mine["output_tokens"]
    return frame.reset_index()
