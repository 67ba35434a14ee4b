"""The pool router: P(correct | query) for every model of a pool, from a frozen encoder's
features, and the decision ``argmax_m P_m - lambda * cost_m``.

One small head per model on the features the head routers use (``features.py``):
shrinkage LDA or logistic regression (a linear score per model, then a Platt map fitted
on out-of-fold scores so that P_m is a frequency and comparable across models), or
k-NN (P_m: the distance-weighted share of the nearest training queries model m got
right). ``cost_m`` is the model's mean cost per query on the training rows (USD).
``lambda`` (USD^-1) is the single knob: 0 picks the model most likely to be right, a
large value the cheapest; ``knob`` sets it on validation rows from what the user asks
for (a budget per 1,000 queries, a share of the best model's accuracy, or lambda itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

POOL_HEAD_FILE = "pool_head.npz"
POOL_KIND = "pool"
KNOBS = ("budget", "quality", "lambda")


@dataclass
class PoolHead:
    """Per-model heads as arrays: ``proba`` gives P(correct) per (row, model)."""

    models: list[str]
    classifier: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    k: int = 15

    @property
    def costs(self) -> np.ndarray:
        """Each model's expected cost per query (USD), from the training rows."""
        return self.arrays["costs"]

    def scores(self, x: np.ndarray) -> np.ndarray:
        """A log-odds score per (row, model), increasing in P(correct): linear heads' own;
        k-NN's share of right neighbours as log-odds."""
        x = np.asarray(x, dtype=np.float64)
        if self.classifier == "knn":
            share = np.clip(self._knn(x), 1e-3, 1 - 1e-3)
            return np.log(share / (1 - share))
        z = (x - self.arrays["mean"]) / self.arrays["scale"]
        return z @ self.arrays["coef"].T + self.arrays["intercept"]

    def proba(self, x: np.ndarray) -> np.ndarray:
        return self.calibrated(self.scores(x))

    def calibrated(self, scores: np.ndarray) -> np.ndarray:
        """P(correct) from ``scores``: each model's Platt map when fitted, else the sigmoid."""
        z = self.arrays["platt_a"] * scores + self.arrays["platt_b"] if "platt_a" in self.arrays else scores
        return np.exp(-np.logaddexp(0.0, -z))

    def _knn(self, x: np.ndarray) -> np.ndarray:
        train, correct = self.arrays["train"], self.arrays["correct"].astype(float)
        k = min(self.k, len(train))
        dist = 1 - _unit(x) @ _unit(train).T
        near = np.argsort(dist, axis=1, kind="stable")[:, :k]
        w = 1 / np.maximum(np.take_along_axis(dist, near, axis=1), 1e-6)
        return np.einsum("nk,nkm->nm", w, correct[near]) / w.sum(axis=1, keepdims=True)

    def save(self, path: Path) -> None:
        np.savez(path, **self.arrays)

    @classmethod
    def load(cls, path: Path, models: list[str], classifier: str, k: int) -> "PoolHead":
        with np.load(path, allow_pickle=False) as z:
            return cls(models, classifier, {name: z[name] for name in z.files}, k)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def decide(p: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    """The model index per row: argmax P(correct) - lam * cost (ties: the cheaper model)."""
    if math.isinf(lam):
        return np.full(len(p), int(np.argmin(costs)))
    utility = p - lam * np.asarray(costs)[None, :]
    order = np.argsort(costs, kind="stable")  # scan cheapest first so a tie goes to the cheaper model
    return order[np.argmax(utility[:, order], axis=1)]


def lambdas(costs: np.ndarray, points: int = 200) -> np.ndarray:
    """The knob's sweep: 0, a log grid wide enough that its ends pick the most likely and
    the cheapest model for every row (P differences in [1e-4, 1] against the costs'
    differences), and infinity."""
    spread = np.diff(np.sort(np.asarray(costs, float)))
    spread = spread[spread > 0]
    if not len(spread):
        return np.array([0.0, math.inf])
    lo, hi = 1e-4 / spread.max(), 1.0 / spread.min()
    return np.concatenate([[0.0], np.geomspace(lo, hi * 10, points), [math.inf]])


@dataclass(frozen=True)
class Knob:
    """What the user asks the router for; ``knob`` turns it into lambda on validation rows."""

    kind: str = "quality"  # budget | quality | lambda
    value: float = 0.95  # USD per 1,000 queries | share of the best model's accuracy | lambda

    def __post_init__(self):
        if self.kind not in KNOBS:
            raise ValueError(f"unknown knob {self.kind!r}; expected one of {KNOBS}")
        if not math.isfinite(self.value) or self.value < 0 or (self.kind == "quality" and self.value > 1):
            raise ValueError(f"knob {self.kind} needs a finite value >= 0 (a share <= 1 for quality), got {self.value!r}")


def knob(p: np.ndarray, correct: np.ndarray, cost: np.ndarray, costs: np.ndarray, want: Knob) -> dict:
    """lambda from validation rows only (``p``: the router's P(correct); ``correct``,
    ``cost``: what each model did and cost on those rows), with the validation figures
    at that lambda. budget: the best accuracy whose spend per 1,000 queries stays within
    the budget (the cheapest model's spend when none does); quality: the cheapest lambda
    reaching that share of the best single model's accuracy (the most accurate one when
    none does); lambda: as given."""
    rows = np.arange(len(p))
    figures = []
    for lam in ([want.value] if want.kind == "lambda" else lambdas(costs)):
        pick = decide(p, costs, lam)
        figures.append({"lambda": float(lam), "accuracy": float(correct[rows, pick].mean()),
                        "usd_per_1000": float(cost[rows, pick].mean() * 1000)})
    if want.kind == "budget":
        within = [f for f in figures if f["usd_per_1000"] <= want.value + 1e-12]
        chosen = max(within, key=lambda f: (f["accuracy"], -f["usd_per_1000"])) if within else \
            min(figures, key=lambda f: f["usd_per_1000"])
    elif want.kind == "quality":
        target = want.value * float(correct.mean(axis=0).max())
        reaching = [f for f in figures if f["accuracy"] >= target - 1e-12]
        chosen = min(reaching, key=lambda f: f["usd_per_1000"]) if reaching else max(figures, key=lambda f: f["accuracy"])
    else:
        chosen = figures[0]
    return {**chosen, "knob": want.kind, "value": want.value, "validation_rows": len(p)}


class PoolRouter:
    """A saved pool router, loaded once: ``choose`` gives each query's P(correct) per model
    and the model chosen at the router's lambda."""

    mode = POOL_KIND

    def __init__(self, path: str | Path, encoder=None, precision: str = "fast"):
        from router_pipeline.routers.contract import read_calibration, read_router_folder
        from router_pipeline.routers.features import folder_encoder

        self.path = Path(path)
        self.meta, head_file = read_router_folder(self.path, POOL_KIND, POOL_HEAD_FILE)
        self.head = PoolHead.load(head_file, self.meta["models"], self.meta["classifier"], self.meta.get("k", 15))
        self.encoder = encoder or folder_encoder(self.meta, self.path, precision)
        self.calibration = read_calibration(self.path)
        self.lam = float(self.calibration.get("lambda", 0.0))

    def choose(self, queries: list[str], lam: float | None = None) -> tuple[np.ndarray, list[str]]:
        p = self.head.proba(self.encoder.encode(queries))
        pick = decide(p, self.head.costs, self.lam if lam is None else lam)
        return p, [self.head.models[i] for i in pick]


def save_pool_router(path: Path, encoder: dict, head: PoolHead, **about) -> Path:
    """Write a pool router folder (replacing an older one at ``path``)."""
    from router_pipeline.routers.contract import write_router_folder

    return write_router_folder(path, POOL_KIND, POOL_HEAD_FILE, head.save,
                               {"models": head.models, "encoder": encoder, "classifier": head.classifier,
                                "k": head.k, **about})
