"""Seeded, stable 80/20 train/test split, by question (default) or by domain.

By question, a question's side depends only on (seed, its normalised-query hash),
never on the other rows, so adding or removing rows never moves an existing question.
By domain (the questions' ``topic``), whole domains are held out: domains are taken
in the order of a seeded hash of their name until the held-out rows come closest to
the fraction, so the router is scored on subjects it never saw. The validation slice
of the training rows follows the same rule as the test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pandas as pd

from router_pipeline.text import unit_interval

TRAIN, TEST, VALIDATION = "train", "test", "validation"
SplitBy = Literal["question", "domain"]
SPLIT_BY = get_args(SplitBy)


@dataclass(frozen=True)
class SplitSpec:
    """How the questions are split (the one owner of these defaults)."""

    test_fraction: float = 0.2
    seed: int = 42
    # domain: whole domains (the questions' topic) held out for test, and for the validation
    # slice too (training_examples follows the split it finds on train_questions).
    by: SplitBy = "question"


class SplitError(ValueError):
    """The questions cannot be split the way the configuration asks."""


def held_out(qids: pd.Series, domains: pd.Series | None, fraction: float, seed: int, salt: str) -> pd.Series:
    """True for the rows held out: each question by its own hash (``domains`` None), or
    whole domains, taken in seeded-hash order until the share held out is closest to
    ``fraction`` (at least one domain held out, at least one kept)."""
    if domains is None:
        return qids.map(lambda q: unit_interval(salt, seed, q) < fraction)
    if domains.isna().any():
        raise SplitError(f"{int(domains.isna().sum())} questions have no domain (topic): a domain split needs one "
                         "per question (a 'topic' or 'domain' column)")
    sizes = domains.value_counts()
    if len(sizes) < 2:
        raise SplitError(f"a domain split needs at least two domains; found {len(sizes)}")
    order = sorted(sizes.index, key=lambda d: unit_interval(salt, seed, str(d)))
    shares = sizes[order].cumsum() / len(domains)
    take = int(np.argmin(np.abs(shares.to_numpy()[:-1] - fraction))) + 1
    return domains.isin(set(order[:take]))


def assign_split(questions: pd.DataFrame, test_fraction: float = SplitSpec.test_fraction, seed: int = SplitSpec.seed,
                 by: str = SplitSpec.by) -> pd.Series:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    test = held_out(questions["qid"], _domains(questions, by), test_fraction, seed, "split")
    return test.map({True: TEST, False: TRAIN})


def _domains(questions: pd.DataFrame, by: str) -> pd.Series | None:
    if by not in SPLIT_BY:
        raise ValueError(f"unknown split {by!r}; expected one of {SPLIT_BY}")
    if by == "question":
        return None
    if "topic" not in questions:
        raise SplitError("a domain split needs the questions' topic column")
    return questions["topic"]


def split_questions(questions: pd.DataFrame, test_fraction: float = SplitSpec.test_fraction,
                    seed: int = SplitSpec.seed, by: str = SplitSpec.by):
    side = assign_split(questions, test_fraction, seed, by)
    train = questions[side == TRAIN].reset_index(drop=True)
    test = questions[side == TEST].reset_index(drop=True)
    return train, test


def validation_mask(qids: pd.Series, fraction: float, seed: int = SplitSpec.seed, domains: pd.Series | None = None) -> pd.Series:
    """True for the training rows held out as the validation slice (calibration and the
    choice between candidate routers): by question, a seeded hash of the qid, so a row's
    side never depends on the others; with ``domains``, whole domains."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return pd.Series(False, index=qids.index)
    return held_out(qids, domains, fraction, seed, "validation")


def outer_folds(questions: pd.DataFrame, folds: int = 5, seed: int = SplitSpec.seed,
                by: str = SplitSpec.by) -> np.ndarray:
    """The fold (0..folds-1) of every question for cross-fitting, where each question is a
    test row once: by question, a seeded hash of the qid; by domain, whole domains, the
    largest first, each to the fold with the fewest rows so far (ties by a seeded hash).
    With fewer domains than ``folds``, one fold per domain: a fold without rows would
    leave nothing to score. Callers iterate over ``np.unique`` of the result."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    domains = _domains(questions, by)
    if domains is None:
        return questions["qid"].map(lambda q: int(unit_interval("fold", seed, q) * folds)).to_numpy()
    if domains.isna().any():
        raise SplitError(f"{int(domains.isna().sum())} questions have no domain (topic): a domain split needs one "
                         "per question")
    sizes = domains.value_counts()
    if len(sizes) < 2:
        raise SplitError(f"cross-fitting by domain needs at least two domains; found {len(sizes)}")
    folds = min(folds, len(sizes))
    rows, fold_of = np.zeros(folds), {}
    for d in sorted(sizes.index, key=lambda d: (-sizes[d], unit_interval("fold", seed, str(d)))):
        fold_of[d] = int(np.argmin(rows))
        rows[fold_of[d]] += sizes[d]
    return domains.map(fold_of).to_numpy()


def ratio_tolerance(n: int, test_fraction: float) -> float:
    """Allowed deviation of the observed test share: 4 binomial standard errors, at
    least 2 points (a hash split is random, not exact, on small samples)."""
    if n == 0:
        return 1.0
    return max(0.02, 4 * math.sqrt(test_fraction * (1 - test_fraction) / n))
