"""The cost-accuracy frontier of a router over a pool, on recorded outcomes.

A router's knob sweep gives one (cost per query, accuracy) point per lambda. Mixing two
points at random gives every cost between them, so what a router offers is the upper
concave hull of its points, made non-decreasing (more money never buys less). Every
router may also send every query to the cheapest model, so that point is on every hull.
AIQ (RouterBench's average improvement in quality) is the area under the hull between the
cheapest and the dearest single model's cost, divided by that range: the router's mean
accuracy over the budgets a team could choose. ``accuracy_at(c)`` reads the hull at a
cost; ``cost_at(a)`` is the least cost reaching an accuracy (NaN when it never does).

Intervals are paired bootstraps of the rows (within folds when cross-fitted): a
resample re-weights the same per-row outcomes of every router's every lambda.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frontier:
    cost: np.ndarray  # the hull's vertices, increasing cost (USD per query)
    accuracy: np.ndarray  # non-decreasing

    def accuracy_at(self, c: float) -> float:
        if c < self.cost[0] - 1e-15:
            return math.nan
        return float(np.interp(c, self.cost, self.accuracy))

    def cost_at(self, a: float) -> float:
        reach = np.nonzero(self.accuracy >= a - 1e-12)[0]
        if not len(reach):
            return math.nan
        i = int(reach[0])
        if i == 0:
            return float(self.cost[0])
        (c0, c1), (a0, a1) = self.cost[i - 1:i + 1], self.accuracy[i - 1:i + 1]
        return float(c0 + (a - a0) / (a1 - a0) * (c1 - c0))

    def aiq(self, lo: float, hi: float) -> float:
        grid = np.unique(np.concatenate([[lo, hi], self.cost[(self.cost > lo) & (self.cost < hi)]]))
        values = np.interp(grid, self.cost, self.accuracy, left=np.nan)
        if np.isnan(values).any():
            return math.nan
        return float(np.trapezoid(values, grid) / (hi - lo)) if hi > lo else float(values[0])


def frontier(cost: np.ndarray, accuracy: np.ndarray) -> Frontier:
    """The non-decreasing upper concave hull of the points (cost_i, accuracy_i)."""
    order = np.lexsort((-np.asarray(accuracy), np.asarray(cost)))
    pts = [(float(cost[i]), float(accuracy[i])) for i in order]
    hull: list[tuple[float, float]] = []
    for c, a in pts:
        if hull and a <= hull[-1][1]:  # costs more, not more accurate: never on a non-decreasing hull
            continue
        while len(hull) >= 2:
            (c1, a1), (c2, a2) = hull[-2], hull[-1]
            if (a2 - a1) * (c - c1) <= (a - a1) * (c2 - c1):  # the middle point is on or below the chord
                hull.pop()
            else:
                break
        hull.append((c, a))
    return Frontier(np.array([h[0] for h in hull]), np.array([h[1] for h in hull]))


def outcomes_of(choice: np.ndarray, correct: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right (rows, points), cost (rows, points)) of a (rows, points) matrix of model indices."""
    rows = np.arange(len(choice))[:, None]
    return correct[rows, choice].astype(float), cost[rows, choice]


@dataclass
class Curve:
    """A router's per-row outcomes at each point of its sweep (the cheapest model's point added)."""

    right: np.ndarray  # (rows, points)
    cost: np.ndarray  # (rows, points)

    def frontier(self, weights: np.ndarray | None = None) -> Frontier:
        if weights is None:
            return frontier(self.cost.mean(axis=0), self.right.mean(axis=0))
        total = weights.sum()
        return frontier(weights @ self.cost / total, weights @ self.right / total)


def curve(choice: np.ndarray, correct: np.ndarray, cost: np.ndarray) -> Curve:
    """A router's Curve from its choices per (row, point), with the all-cheapest point added."""
    cheapest = int(np.argmin(cost.mean(axis=0)))
    choice = np.concatenate([choice, np.full((len(choice), 1), cheapest)], axis=1)
    return Curve(*outcomes_of(choice, correct, cost))


def singles(correct: np.ndarray, cost: np.ndarray) -> list[Curve]:
    """Each single model as a one-point Curve (plus the cheapest model's point)."""
    return [curve(np.full((len(correct), 1), m), correct, cost) for m in range(correct.shape[1])]


def random_mix(correct: np.ndarray, cost: np.ndarray) -> Curve:
    """Every single model's point: their hull is what mixing models at random gives."""
    n, m = correct.shape
    return curve(np.tile(np.arange(m), (n, 1)), correct, cost)


def oracle(correct: np.ndarray, cost: np.ndarray, lambdas: np.ndarray) -> Curve:
    """The router that knows the outcomes: argmax right - lambda * cost per row."""
    choice = np.stack([np.argmax(correct - lam * cost if math.isfinite(lam) else -cost, axis=1)
                       for lam in lambdas], axis=1)
    return curve(choice, correct, cost)


@dataclass(frozen=True)
class Range:
    lo: float  # the cheapest single model's cost per query
    hi: float  # the dearest single model's


def cost_range(cost: np.ndarray, weights: np.ndarray | None = None) -> Range:
    means = cost.mean(axis=0) if weights is None else weights @ cost / weights.sum()
    return Range(float(means.min()), float(means.max()))


def resample_weights(n: int, resamples: int, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """(resamples, rows) bootstrap counts, rows drawn with replacement within each stratum."""
    rng = np.random.default_rng(seed)
    strata = np.zeros(n, dtype=int) if strata is None else np.asarray(strata)
    weights = np.zeros((resamples, n))
    for s in np.unique(strata):
        idx = np.nonzero(strata == s)[0]
        draws = rng.integers(0, len(idx), size=(resamples, len(idx)))
        for b in range(resamples):
            weights[b, idx] = np.bincount(draws[b], minlength=len(idx))
    return weights


def interval(stat, weights: np.ndarray) -> dict:
    """``stat(None)`` (a figure on the rows as they are) with the 95% percentile interval of
    ``stat(w)`` over the bootstrap weights; a difference of two routers' figures computed
    on the same weights is a paired interval."""
    draws = np.array([stat(w) for w in weights])
    draws = draws[~np.isnan(draws)]
    point = stat(None)
    if not len(draws):
        return {"diff": point, "lo": math.nan, "hi": math.nan}
    return {"diff": point, "lo": float(np.percentile(draws, 2.5)), "hi": float(np.percentile(draws, 97.5))}


def aiq(c: Curve, cost: np.ndarray, w: np.ndarray | None = None) -> float:
    """A curve's AIQ on the range of the single models' costs (both on the rows weighted by ``w``)."""
    r = cost_range(cost, w)
    return c.frontier(w).aiq(r.lo, r.hi)
