"""Seeded, stable 80/20 train/test split.

A question's side depends only on (seed, its normalised-query hash), never on the
other rows, so adding or removing rows never moves an existing question.
"""

from __future__ import annotations

import math

import pandas as pd

from router_pipeline.text import unit_interval

TRAIN, TEST, VALIDATION = "train", "test", "validation"


def assign_split(questions: pd.DataFrame, test_fraction: float = 0.2, seed: int = 42) -> pd.Series:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    u = questions["qid"].map(lambda q: unit_interval("split", seed, q))
    return u.lt(test_fraction).map({True: TEST, False: TRAIN})


def split_questions(questions: pd.DataFrame, test_fraction: float = 0.2, seed: int = 42):
    side = assign_split(questions, test_fraction, seed)
    train = questions[side == TRAIN].reset_index(drop=True)
    test = questions[side == TEST].reset_index(drop=True)
    return train, test


def validation_mask(qids: pd.Series, fraction: float, seed: int = 42) -> pd.Series:
    """True for the training rows held out as the validation slice (threshold
    calibration): a seeded hash of the qid, so a row's side never depends on the others."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    return qids.map(lambda q: unit_interval("validation", seed, q) < fraction)


def ratio_tolerance(n: int, test_fraction: float) -> float:
    """Allowed deviation of the observed test share: 4 binomial standard errors, at
    least 2 points (a hash split is random, not exact, on small samples)."""
    if n == 0:
        return 1.0
    return max(0.02, 4 * math.sqrt(test_fraction * (1 - test_fraction) / n))
